"""Load PortraitBooth Model: the UNet patch goes through ComfyUI's own LoRA machinery."""
from __future__ import annotations

import pytest
import torch

from stea_fixtures import identity, lora_patch, write_model
from portraitbooth_core.weights.file import PortraitBoothModel, load_portraitbooth
from portraitbooth_core.weights.meta import FROM_FILE, CorruptWeightFileError


@pytest.fixture(scope="module")
def pb_folder(tmp_path_factory, pack_nodes):
    """A models/portraitbooth folder registered the way extra_model_paths.yaml would."""
    import folder_paths

    folder = tmp_path_factory.mktemp("portraitbooth")
    folder_paths.add_model_folder_path("portraitbooth", str(folder))
    write_model(folder / "pb_patch.safetensors", patch=lora_patch(0))
    write_model(folder / "pb_text_only.safetensors")
    # What FastComposer's importer stores: delayed identity and its CFG.
    write_model(folder / "pb_delayed.safetensors", defaults={"start_percent": 0.3, "cfg": 5.0})
    return folder


@pytest.fixture(scope="module")
def load(pack_nodes, pb_folder):
    node = pack_nodes["PortraitBoothLoadModel"]
    return lambda model, name, strength=1.0: node.execute(model, name, strength).args


def unet_out(patcher) -> torch.Tensor:
    """One UNet evaluation with the patcher's patches applied, ComfyUI-style."""
    import comfy.model_management

    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 768, generator=gen)
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([5.0]), c_crossattn=context).clone()


def test_folder_is_registered_and_listed(pack_nodes, pb_folder):
    schema = pack_nodes["PortraitBoothLoadModel"].define_schema()
    combo = next(i for i in schema.inputs if i.id == "portraitbooth_name")
    assert {"pb_patch.safetensors", "pb_text_only.safetensors"} <= set(combo.options)


def test_patch_changes_the_model_and_strength_zero_does_not(tiny_model, load):
    base = unet_out(tiny_model)
    patched, projector = load(tiny_model, "pb_patch.safetensors")
    assert isinstance(projector, PortraitBoothModel) and projector.info.base == "sd15"
    assert patched is not tiny_model and not torch.allclose(unet_out(patched), base, atol=1e-4)
    assert torch.equal(unet_out(tiny_model), base)  # the input MODEL was cloned, not modified
    untouched, _ = load(tiny_model, "pb_patch.safetensors", 0.0)
    assert torch.equal(unet_out(untouched), base)
    text_only, _ = load(tiny_model, "pb_text_only.safetensors")
    assert torch.equal(unet_out(text_only), base)


def test_patch_composes_with_another_lora(tiny_model, load):
    import comfy.sd

    other = lora_patch(seed=7)
    pb_only, _ = load(tiny_model, "pb_patch.safetensors")
    lora_only = comfy.sd.load_lora_for_models(tiny_model, None, other, 1.0, 0)[0]
    pb_then_lora = comfy.sd.load_lora_for_models(pb_only, None, other, 1.0, 0)[0]
    lora_then_pb, _ = load(lora_only, "pb_patch.safetensors")
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    assert len(pb_then_lora.patches[key]) == 2  # both patches stacked on the same weight
    both = unet_out(pb_then_lora)
    assert not torch.allclose(both, unet_out(pb_only), atol=1e-4)
    assert not torch.allclose(both, unet_out(lora_only), atol=1e-4)
    torch.testing.assert_close(unet_out(lora_then_pb), both, atol=1e-4, rtol=1e-4)


def test_stock_lora_loader_reads_the_same_unet_patch(tiny_model, load, pb_folder):
    """The file's UNet part is a plain ComfyUI LoRA: a stock LoRA loader gives the same model."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(pb_folder / "pb_patch.safetensors"), safe_load=True)
    stock = comfy.sd.load_lora_for_models(tiny_model, None, sd, 0.7, 0)[0]
    ours, _ = load(tiny_model, "pb_patch.safetensors", 0.7)
    torch.testing.assert_close(unet_out(ours), unet_out(stock))


def test_patch_that_does_not_fit_the_model_fails_clearly(tiny_model, pack_nodes, pb_folder):
    key = "lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_k"  # not in the one-level UNet
    write_model(pb_folder / "pb_other.safetensors",
                patch={f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(320, 4)})
    with pytest.raises(ValueError, match="does not fit this MODEL"):
        pack_nodes["PortraitBoothLoadModel"].execute(tiny_model, "pb_other.safetensors", 1.0)


def test_missing_file_names_the_folder(tiny_model, pack_nodes, pb_folder):
    with pytest.raises(FileNotFoundError, match="put PortraitBooth .safetensors files in"):
        pack_nodes["PortraitBoothLoadModel"].execute(tiny_model, "gone.safetensors", 1.0)


def test_projector_only_file_on_a_non_sd15_model_is_refused_at_load(tiny_model, load):
    """The SD1.5 check runs for a file without a UNet patch too; before, an SD2 MODEL went
    through and KSampler failed later with a bare shape error."""
    from portraitbooth_core.weights.family import NotSD15Error
    from standins.sd15 import tiny_model_patcher

    # A model of its own, loaded as ComfyUI loads one, that reports SD2's text width: no copy
    # of ComfyUI's objects (their classes need not support copying; 0.8.0's SD15 does not).
    sd2 = tiny_model_patcher(seed=0)
    sd2.model.model_config.unet_config = {**sd2.model.model_config.unet_config, "context_dim": 1024}
    with pytest.raises(NotSD15Error, match=r"the MODEL input is SD2 \(text context 1024\), but pb_text_only"
                                           r"\.safetensors is made for SD1\.5"):
        load(sd2, "pb_text_only.safetensors")
    with pytest.raises(NotSD15Error, match="SD2"):
        load(sd2, "pb_patch.safetensors")
    patched, _ = load(tiny_model, "pb_text_only.safetensors")
    assert patched is tiny_model


# File defaults reach Apply STEA: start_percent below 0 (the node's default) takes the file's start.

def _schema_input(pack_nodes, node_id, name):
    return next(i for i in pack_nodes[node_id].define_schema().inputs if i.id == name)


def _apply(pack_nodes, clip, projector, start_percent, end_percent=1.0):
    """(conditioning ranges sorted, the node's UI text) of Apply STEA with one face."""
    out = pack_nodes["PortraitBoothApplySTEA"].execute(clip, projector, identity(1), "a photo of a man", "", 0, 1.0,
                                                       start_percent, end_percent)
    (cond,) = out.args
    ranges = sorted((e.get("start_percent", 0.0), e.get("end_percent", 1.0), "portraitbooth" in e) for _c, e in cond)
    (text,) = out.ui["text"]
    return ranges, text


def test_a_fresh_apply_stea_takes_its_start_from_the_file(pack_nodes):
    spec = _schema_input(pack_nodes, "PortraitBoothApplySTEA", "start_percent")
    assert spec.default == spec.min == FROM_FILE == -1.0 and spec.max == 1.0
    assert "from the file" in spec.tooltip and "0.0 (the paper's)" in spec.tooltip


def test_file_defaults_reach_apply_stea(pack_nodes, pb_folder, tiny_model, sd15_parts):
    clip = sd15_parts[1]
    load = pack_nodes["PortraitBoothLoadModel"]
    loaded = load.execute(tiny_model, "pb_delayed.safetensors", 1.0)
    projector = loaded.args[1]
    assert loaded.ui["text"] == ["pb_delayed.safetensors: identity arcface:standin/w600k_r50.onnx; start 0.30, CFG 5"]

    ranges, text = _apply(pack_nodes, clip, projector, FROM_FILE)
    assert ranges == [(0.0, 0.3, False), (0.3, 1.0, True)]
    assert text == ("identity from start 0.30 (from the file) to end 1.00; pb_delayed.safetensors suggests CFG 5 "
                    "in the sampler")
    assert _apply(pack_nodes, clip, projector, -0.25)[0] == ranges  # any value below 0 means "from the file"
    # A saved workflow's explicit value is kept, 0.0 included.
    ranges, text = _apply(pack_nodes, clip, projector, 0.0)
    assert ranges == [(0.0, 1.0, True)] and text.startswith("identity from start 0.00 (set on the node)")
    assert _apply(pack_nodes, clip, projector, 0.5)[0] == [(0.0, 0.5, False), (0.5, 1.0, True)]
    # The file's start is checked against end_percent like a start set on the node.
    with pytest.raises(ValueError, match=r"start_percent 0\.3 \(from the file\) and end_percent 0\.2"):
        _apply(pack_nodes, clip, projector, FROM_FILE, end_percent=0.2)


def test_a_file_without_defaults_falls_back_to_the_papers_start(pack_nodes, pb_folder, tiny_model, sd15_parts):
    loaded = pack_nodes["PortraitBoothLoadModel"].execute(tiny_model, "pb_text_only.safetensors", 1.0)
    assert loaded.ui["text"] == ["pb_text_only.safetensors: identity arcface:standin/w600k_r50.onnx; no start "
                                 "stored (0.00, the paper's)"]
    ranges, text = _apply(pack_nodes, sd15_parts[1], loaded.args[1], FROM_FILE)
    assert ranges == [(0.0, 1.0, True)]
    assert text == "identity from start 0.00 (the paper's default; the file stores none) to end 1.00"


@pytest.mark.parametrize("defaults, problem", [
    ({"start_percent": 1.5}, "defaults.start_percent is 1.5, expected 0 <= start_percent < 1"),
    ({"start_percent": 1.0}, "defaults.start_percent is 1, expected 0 <= start_percent < 1"),
    ({"start_percent": "0.3"}, "defaults.start_percent is '0.3', expected a number"),
    ({"cfg": 0}, "defaults.cfg is 0, expected a positive number"),
])
def test_a_bad_default_in_the_file_is_refused_at_load(tmp_path, defaults, problem):
    path = write_model(tmp_path / "bad.safetensors", defaults=defaults)
    with pytest.raises(CorruptWeightFileError, match="bad.safetensors: its metadata's " + problem.replace(".", r"\.")):
        load_portraitbooth(path)
