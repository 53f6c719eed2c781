"""What identity conditioning costs on top of plain ComfyUI.

1. Apply STEA Conditioning vs CLIPTextEncode on the same CLIP (random SD1.5 CLIP-L),
   plain and with a weighted class word (its unweighted output for the projector comes
   from the same single encode as ComfyUI's weighting: target no cost over CLIPTextEncode).
2. One sampling step (a batch-2 UNet evaluation, as with CFG) of the MODEL patched by
   Load PortraitBooth Model vs the unpatched MODEL. ComfyUI merges LoRA patches into the
   weights when it loads the model, so the target is "no cost": within 5%.

Quick mode (default): the one-level stand-in UNet at a 32x32 latent. --full: a full-size
SD1.5 UNet (random weights) at 64x64, minutes per figure on a CPU.

    python benchmarks/stea_cost.py [--full] [--pairs N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

from benchmarks.harness import REPO, compare, header  # noqa: E402
from headless import comfyui as host  # noqa: E402

import torch  # noqa: E402

# SD1.5's UNet layout (ComfyUI's model_detection SD15 config) for --full.
SD15_FULL_UNET = dict(
    image_size=64, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
)
PROMPT = ("a photo of a man in a leather jacket standing on a rooftop at dusk, city lights, "
          "shallow depth of field, 85mm, highly detailed")


def random_lora(unet_sd: dict, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA on every attention and proj_in/proj_out weight: what a PortraitBooth
    UNet patch touches when the UNet's transformer blocks are fine-tuned."""
    gen = torch.Generator().manual_seed(seed)
    patch = {}
    for name, w in unet_sd.items():
        if not name.endswith(".weight") or not any(s in name for s in (".attn1.", ".attn2.", "proj_in", "proj_out")):
            continue
        if w.ndim not in (2, 4):
            continue
        key = "lora_unet_" + name[:-len(".weight")].replace(".", "_")
        tail = tuple(w.shape[2:])
        patch[f"{key}.lora_down.weight"] = torch.randn(rank, w.shape[1], *tail, generator=gen) * 0.01
        patch[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *[1] * len(tail), generator=gen) * 0.01
        patch[f"{key}.alpha"] = torch.tensor(float(rank))
    return patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 UNet at a 64x64 latent")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--rank", type=int, default=64, help="rank of the UNet patch")
    args = parser.parse_args()

    host.import_comfyui(cpu=not torch.cuda.is_available())
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import comfy.model_management
    import comfy.sd
    import nodes as comfy_nodes  # ComfyUI's nodes.py (sys.path puts ComfyUI first)

    from standins.sd15 import build_sd15_checkpoint, tiny_unet_state_dict
    apply_unet_patch = pack_module("nodes.stea").apply_unet_patch
    encode_with_identity = pack_module("nodes.stea_encode").encode_with_identity
    from portraitbooth_core.face.types import Identity
    from portraitbooth_core.stea.projector import STEAProjector
    from portraitbooth_core.weights.file import load_portraitbooth, save_portraitbooth
    from portraitbooth_core.weights.meta import FaceEncoderSpec

    mode = "full" if args.full else "quick"
    header("PortraitBooth STEA cost", mode=mode, rank=args.rank)
    work = Path(tempfile.mkdtemp(prefix="pb_bench_"))
    ckpt = build_sd15_checkpoint(work / "sd15.safetensors")
    _, clip, _, *_ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=True)

    unet_sd = tiny_unet_state_dict(0, **(SD15_FULL_UNET if args.full else {}))
    projector = STEAProjector()
    torch.nn.init.normal_(projector.fc2.weight, std=0.02)
    pb_path = save_portraitbooth(work / "pb.safetensors", projector, FaceEncoderSpec("arcface:bench", 512),
                                 random_lora(unet_sd, args.rank))
    pb = load_portraitbooth(pb_path)
    face = torch.nn.functional.normalize(torch.randn(512), dim=0)
    faces = [Identity(face[None], face, "arcface:bench")]

    encode = comfy_nodes.CLIPTextEncode()
    for name, text in (("stea_vs_clip_text_encode", PROMPT),
                       ("stea_weighted_class_word_vs_clip_text_encode", PROMPT.replace("man", "(man:1.2)", 1))):
        compare(name, lambda: encode.encode(clip, text),
                lambda: encode_with_identity(clip, text, faces, pb), pairs=args.pairs, warmup=2,
                config={"mode": mode, "prompt_tokens": sum(len(c) for c in clip.tokenize(text)["l"])})

    # Two independent models (not clones): each keeps its own weights loaded, so the
    # timing is the per-step cost, not ComfyUI re-patching when switching between them.
    base = comfy.sd.load_diffusion_model_state_dict(dict(unet_sd))
    patched = apply_unet_patch(comfy.sd.load_diffusion_model_state_dict(dict(unet_sd)), pb.unet_patch, 1.0)
    comfy.model_management.load_models_gpu([base, patched])
    size = 64 if args.full else 32
    device = comfy.model_management.get_torch_device()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=gen).to(device)
    context = torch.randn(2, 77, 768, generator=gen).to(device)
    sigma = torch.tensor([5.0, 5.0], device=device)

    def step(model):
        with torch.no_grad():
            return model.model.apply_model(x, sigma, c_crossattn=context)

    diff = (step(patched) - step(base)).abs().max().item()
    compare("patched_unet_step_vs_unpatched", lambda: step(base), lambda: step(patched), pairs=args.pairs,
            warmup=1, target=1.05, config={"mode": mode, "latent": f"{size}x{size}", "batch": 2,
                                          "patch_tensors": len(pb.unet_patch), "output_max_diff": round(diff, 5)})


def pack_module(name: str):
    """A module of the pack, imported as ComfyUI does (the pack folder as a package), so
    its `nodes` package does not clash with ComfyUI's own `nodes.py`."""
    import importlib
    import importlib.util

    pkg = "portraitbooth_pack_bench"
    if pkg not in sys.modules:
        spec = importlib.util.spec_from_file_location(pkg, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        sys.modules[pkg] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[pkg])
    return importlib.import_module(f"{pkg}.{name}")


if __name__ == "__main__":
    main()
