"""What PhotoMaker identity conditioning costs on SDXL, against plain ComfyUI in the same run.

1. Apply STEA Conditioning with a PhotoMaker v2 head vs CLIPTextEncode on the same SDXL CLIP
   (full-size CLIP-L + bigG, random weights): one photo, three photos (six stacked class
   tokens), and with the file's delayed start (0.2: a second, text-only encode for the
   first steps, as PhotoMaker's pipeline does).
2. One sampling step (a batch-2 UNet evaluation, as with CFG) of the MODEL with PhotoMaker's
   LoRA (rank 64 on every attention projection) applied by Load PortraitBooth Model vs
   the plain MODEL. ComfyUI merges LoRA patches at load: the target is "no cost", 1.05.
3. Two subjects vs one: the Multi-Subject Region Sampler ('regional attention') with two
   stacked PhotoMaker subjects vs one subject through ComfyUI's KSampler, same steps;
   goal <= 1.3x.

Quick mode (default, a CPU): the SDXL-family stand-in (standins/sdxl.py: KOALA-like UNet,
95 M parameters) at an 8x8 latent (64 px), 2 steps. --full: a full-size SDXL UNet (random
weights) at a 128x128 latent (1024 px), 4 steps: a GPU's job.

    OMP_NUM_THREADS=1 python benchmarks/photomaker_cost.py [--full] [--pairs N]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

from benchmarks.harness import compare, header  # noqa: E402
from headless import comfyui as host  # noqa: E402

import torch  # noqa: E402

PROMPT = ("a photo of a man img in a leather jacket standing on a rooftop at dusk, city lights, "
          "shallow depth of field, 85mm, highly detailed")
TWO = "a man img and a woman img standing side by side on a rooftop at dusk, city lights"


def v2_identity(photos: int, seed: int):
    from portraitbooth_core.face.photomaker_photos import PHOTOMAKER_V2_KIND
    from portraitbooth_core.face.types import Identity

    gen = torch.Generator().manual_seed(seed)
    faces = 20 * torch.nn.functional.normalize(torch.randn(photos, 512, generator=gen), dim=-1)
    return Identity(embeddings=faces, vector=faces.mean(0), kind=PHOTOMAKER_V2_KIND, normalized=False,
                    clip_hidden=torch.randn(photos, 257, 1024, generator=gen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size SDXL UNet at a 128x128 latent")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=64, help="rank of the LoRA (PhotoMaker's: 64)")
    args = parser.parse_args()

    host.import_comfyui(cpu=not torch.cuda.is_available())
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import comfy.model_management
    import comfy.sd
    import nodes as comfy_nodes

    from benchmarks.stea_cost import pack_module, random_lora
    from portraitbooth_core.stea.photomaker import PhotoMakerV2Head, photomaker_v2_config
    from portraitbooth_core.weights.file import load_portraitbooth, save_portraitbooth
    from portraitbooth_core.weights.formats import photomaker as pm
    from standins.sdxl import CHECKPOINT_NAME, build_sdxl_checkpoint, standin_unet_state_dict

    mode = "full" if args.full else "quick"
    header("PortraitBooth PhotoMaker (SDXL) cost", mode=mode, rank=args.rank)
    work = Path(tempfile.mkdtemp(prefix="pb_bench_pm_"))
    ckpt = build_sdxl_checkpoint(host.host_dir() / "cache" / "standins" / CHECKPOINT_NAME)
    _, clip, _, *_ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=True)

    if args.full:
        from portraitbooth_core.weights.formats.photomaker import SDXL_UNET_CONFIG
        from standins.sd15 import randomize
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        unet = UNetModel(**SDXL_UNET_CONFIG, dtype=torch.float16, device="cpu", operations=comfy.ops.disable_weight_init)
        randomize(unet, 0)
        unet_sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
        del unet
    else:
        unet_sd = standin_unet_state_dict(0)

    torch.manual_seed(0)
    head = PhotoMakerV2Head(photomaker_v2_config())  # full size: PhotoMaker v2's head as released
    pb_path = save_portraitbooth(work / "pm_v2.safetensors", head, pm.face_encoder_spec("v2", head, dict(pm.VIT_L14)),
                                 random_lora(unet_sd, args.rank), defaults={"start_percent": 0.2, "cfg": 5.0})
    pb = load_portraitbooth(pb_path)
    encode_stacked = pack_module("nodes.stea_photomaker").encode_stacked
    apply_unet_patch = pack_module("nodes.stea").apply_unet_patch

    encode = comfy_nodes.CLIPTextEncode()
    one, three = [v2_identity(1, 1)], [v2_identity(3, 2)]
    cases = (("photomaker_v2_stea_vs_clip_text_encode_sdxl", one, 0.0),
             ("photomaker_v2_three_photos_vs_clip_text_encode_sdxl", three, 0.0),
             ("photomaker_v2_delayed_start_vs_clip_text_encode_sdxl", one, 0.2))
    for name, faces, start in cases:
        compare(name, lambda: encode.encode(clip, PROMPT),
                lambda: encode_stacked(clip, PROMPT, faces, pb, start_percent=start), pairs=args.pairs, warmup=1,
                config={"mode": mode, "photos": faces[0].count, "start_percent": start,
                        "class_token_copies": 2 * faces[0].count})

    base = comfy.sd.load_diffusion_model_state_dict(dict(unet_sd))
    patched = apply_unet_patch(comfy.sd.load_diffusion_model_state_dict(dict(unet_sd)), pb.unet_patch, 1.0, "sdxl")
    comfy.model_management.load_models_gpu([base, patched])
    size = 128 if args.full else 8
    device = comfy.model_management.get_torch_device()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=gen).to(device)
    context = torch.randn(2, 77, 2048, generator=gen).to(device)
    y = torch.randn(2, 2816, generator=gen).to(device)
    sigma = torch.tensor([5.0, 5.0], device=device)

    def step(model):
        with torch.no_grad():
            return model.model.apply_model(x, sigma, c_crossattn=context, y=y)

    diff = (step(patched) - step(base)).abs().max().item()
    compare("photomaker_lora_sdxl_step_vs_plain", lambda: step(base), lambda: step(patched), pairs=args.pairs,
            warmup=1, target=1.05, config={"mode": mode, "latent": f"{size}x{size}", "batch": 2,
                                          "patch_tensors": len(pb.unet_patch), "output_max_diff": round(diff, 5)})

    # Two subjects vs one, whole generations of the same steps on the patched MODEL.
    regions_node = pack_module("nodes.regions")
    sample_regions = pack_module("nodes.region_sampling").sample_regions
    steps = 4 if args.full else 2
    latent = {"samples": torch.zeros(1, 4, size, size * 2)}
    negative = encode.encode(clip, "blurry, lowres")[0]
    single = encode_stacked(clip, "a photo of a man img", one, pb)
    glob = encode_stacked(clip, TWO, [one[0], v2_identity(1, 3)], pb)
    left = regions_node.PortraitBoothRegion.execute(single, 1.0, 0.0, 0.0, 0.5, 1.0).args[0]
    both = regions_node.PortraitBoothRegion.execute(
        encode_stacked(clip, "a photo of a woman img", [v2_identity(1, 3)], pb), 1.0, 0.5, 0.0, 0.5, 1.0,
        previous=left).args[0]

    def one_subject():
        with torch.no_grad():
            return comfy_nodes.common_ksampler(patched, 0, steps, 5.0, "euler", "normal", single, negative, latent)

    def two_subjects():
        with torch.no_grad():
            return sample_regions(patched, glob, negative, both, latent, 0, steps, 5.0, "euler", "normal", 1.0,
                                  "regional attention")

    compare("photomaker_two_subjects_vs_one_sdxl", one_subject, two_subjects, pairs=args.pairs, warmup=1,
            target=1.3, config={"mode": mode, "latent": f"{size}x{size * 2}", "steps": steps,
                                "sampler": "regional attention"})


if __name__ == "__main__":
    main()
