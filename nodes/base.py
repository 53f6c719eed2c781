"""The base class of the pack's nodes: every input checked before anything runs.

A graph posted over HTTP can hold any value, so each node checks its inputs with
`paths.check_inputs` on entry to execute (which also covers values that arrive through links
or a direct call), before it does anything. At queue time ComfyUI checks number min/max
itself, each refusal once, under its input, but only for inputs the node's validate_inputs
does not take: it files a validate_inputs refusal under every input that method takes (a
`**kwargs` one takes them all, so one bad value was reported once per widget). So
validate_inputs takes just one input, the node's model-file combo (FILE_COMBOS), whose
refusal says where such files go; what ComfyUI does not check at queue time (a V3 combo's
choices, NUL bytes, non-finite numbers, paths) is refused on entry to execute, once, naming
the input. Called directly, validate_inputs checks whatever it is given.
Subclasses write `define_schema` and `execute` as for `io.ComfyNode`.
"""
from __future__ import annotations

import inspect
from typing import Callable

from comfy_api.latest import io

from .paths import checked_inputs, validate_widget_inputs


class CheckedNode(io.ComfyNode):
    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        return validate_widget_inputs(cls, **kwargs)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("execute")
        # ComfyUI runs each prompt on a clone built from the class's own dict (already
        # wrapped): wrapping again would check every input twice.
        if isinstance(own, classmethod) and not getattr(own.__func__, "inputs_checked", False):
            cls.execute = classmethod(checked_inputs(own.__func__))
        if "validate_inputs" not in cls.__dict__:
            files = list(getattr(cls, "FILE_COMBOS", {}))
            if len(files) > 1:
                raise TypeError(f"{cls.__name__}: at most one FILE_COMBOS input (ComfyUI would report a refusal of "
                                f"one under each of {', '.join(files)})")
            cls.validate_inputs = classmethod(_queue_check(files))


def _queue_check(names: list[str]) -> Callable[..., bool | str]:
    """validate_inputs for a node whose queue-time check takes `names` (see the module
    docstring). ComfyUI reads which inputs to pass from the signature
    (inspect.getfullargspec, which follows __signature__)."""
    def validate_inputs(cls, **values) -> bool | str:
        return validate_widget_inputs(cls, **values)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    validate_inputs.__signature__ = inspect.Signature(
        [inspect.Parameter("cls", kind), *(inspect.Parameter(name, kind, default=None) for name in names)])
    return validate_inputs
