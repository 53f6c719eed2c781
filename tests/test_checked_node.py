"""CheckedNode, the base class of every node of the pack: inputs checked at queue time
(validate_inputs, which ComfyUI finds) and once on entry to execute, on the class and on the
clone ComfyUI runs each prompt on."""
from __future__ import annotations

import importlib

import pytest

from portraitbooth_core.paths import BadInputError


def _pack_module(pack_nodes, name: str):
    """A module of the pack as ComfyUI imported it (under the pack's folder name)."""
    package = pack_nodes["PortraitBoothMixIdentities"].__module__.rsplit(".", 1)[0]
    return importlib.import_module(f"{package}.{name}")


def test_every_node_is_a_checked_node_that_comfyui_validates(pack_nodes):
    from comfy_api.internal import first_real_override

    base = _pack_module(pack_nodes, "base").CheckedNode
    for node_id, cls in pack_nodes.items():
        assert issubclass(cls, base), node_id
        assert first_real_override(cls, "validate_inputs") is not None, node_id
        assert getattr(cls.execute.__func__, "inputs_checked", False), node_id


def test_queue_time_check_names_the_input(pack_nodes):
    mix = pack_nodes["PortraitBoothMixIdentities"]
    assert mix.validate_inputs(weight=0.5) is True
    assert mix.validate_inputs(weight=None) is True  # a linked input: known only when it runs
    message = mix.validate_inputs(weight=7.0)
    assert message.startswith("weight: 7.0 is outside 0.0..1.0"), message


@pytest.mark.parametrize("clone", [False, True], ids=["class", "comfyui clone"])
def test_execute_checks_its_inputs_once(pack_nodes, monkeypatch, clone):
    paths = _pack_module(pack_nodes, "paths")
    mix = pack_nodes["PortraitBoothMixIdentities"]
    cls = mix.PREPARE_CLASS_CLONE({}) if clone else mix
    with pytest.raises(BadInputError, match=r"^weight: 7\.0 is outside"):
        cls.execute(identity_a=None, identity_b=None, weight=7.0)
    calls = []
    real = paths.check_inputs
    monkeypatch.setattr(paths, "check_inputs", lambda node, values: (calls.append(values), real(node, values)))
    # Values that pass the check: the node itself then fails on the missing identities.
    with pytest.raises(Exception) as info:
        cls.execute(identity_a=None, identity_b=None, weight=0.5)
    assert not isinstance(info.value, BadInputError), info.value
    assert calls == [{"identity_a": None, "identity_b": None, "weight": 0.5}]
