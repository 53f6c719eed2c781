"""PortraitBooth for ComfyUI: identity-preserving portraits from one photo, no fine-tuning.

ComfyUI imports this file; it must stay light. Node modules import their heavy or
optional dependencies (onnxruntime, facexlib, dlib, ...) only when a node runs, so a
missing optional package disables one node with a clear message instead of the pack.

Nothing here touches `sys.path`: the pack's folders (`training`, `evaluation`, ...) would
otherwise become top-level modules of every ComfyUI process and collide with other packs'
modules of the same name. Nodes reach `training` relatively (as `<this pack>.training`).
The one global name is the ComfyUI-free core, `portraitbooth_core`, registered under
that unique name so that nodes, training and the command line share one copy of it.
"""
import importlib.util
import logging
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
CORE = "portraitbooth_core"


def _register_core() -> None:
    core_dir = os.path.join(_PACK_DIR, CORE)
    loaded = sys.modules.get(CORE)
    if loaded is not None:
        where = os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or ""))
        if os.path.realpath(where) != os.path.realpath(core_dir):
            logging.getLogger("portraitbooth").warning(
                "another copy of %s is already loaded from %s; this pack (%s) uses that one. "
                "Remove the duplicate PortraitBooth folder from custom_nodes.", CORE, where, _PACK_DIR)
        return
    spec = importlib.util.spec_from_file_location(CORE, os.path.join(core_dir, "__init__.py"),
                                                  submodule_search_locations=[core_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[CORE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[CORE]
        raise


_register_core()


async def comfy_entrypoint():
    from .nodes import PortraitBoothExtension

    return PortraitBoothExtension()
