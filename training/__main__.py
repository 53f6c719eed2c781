"""Command line: `python -m training {build,train,export,import-fastcomposer,import-photomaker} ...` (train under torchrun for DDP).

    python -m training build photos/ data/ --pack models/insightface/models/antelopev2 --workers 8
    python -m training build photos/ part0/ --pack ... --part 0/2   (part 1/2 on another machine)
    python -m training merge data/ part0/ part1/
    python -m training train --config train.toml --set steps=2000 --set mode=full
    torchrun --nproc_per_node 8 -m training train --config train.toml
    python -m training export --config train.toml --out model.safetensors
    python -m training precompute data/ --model v1-5-pruned-emaonly.safetensors
    python -m training import-fastcomposer pytorch_model.bin --models ComfyUI/models
    python -m training import-photomaker photomaker-v2.bin --models ComfyUI/models
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _build(args) -> int:
    from portraitbooth_core.face.errors import IncompletePackError

    from .build.settings import BuildSettings, BuildStateError, EncoderSpec
    from .build.builder import DatasetBuilder, format_report
    from .build.face_crops import CropSettings

    try:
        captions = _caption_options(args)
    except (ValueError, ImportError) as exc:  # a synonyms file, captioner or CelebV-Text folder that cannot be used
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Worker processes make their own encoder from this (onnxruntime sessions cannot be sent to them).
    encoder = EncoderSpec(kwargs={"pack_dir": args.pack, "detector": args.detector, "recognizer": args.recognizer,
                                  "provider": args.provider, "parsing_weights": args.parsing_weights})
    crops = CropSettings(args.resolution, args.crop_scale, args.det_threshold, args.min_face, args.several_faces)
    try:
        settings = BuildSettings(crops, args.caption_template, args.default_word, shard_size=args.shard_size,
                                 video_stride=args.video_stride, video_fps=args.video_fps,
                                 video_reference_gap=args.video_reference_gap, **captions["settings"]).validate()
        builder = DatasetBuilder(args.source, args.output, encoder, settings, captioner=captions["captioner"],
                                 workers=args.workers, part=args.part)
        refused = _train_refuses(builder.encoder)
        if refused:  # now, before hours of building (it stays above the progress bar)
            print(f"warning: {refused}", file=sys.stderr)
        report = builder.build()
    except IncompletePackError as exc:  # the pack's message, and what this command can do without the missing file
        print(f"error: {exc}{_without_pack_file(exc.missing)}", file=sys.stderr)
        return 2
    except (BuildStateError, ValueError) as exc:  # settings, --part, or a folder built otherwise: the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report["samples"] else 1


def _without_pack_file(missing: tuple[str, ...]) -> str:
    """The build options that do without a pack file that is missing (added to the pack's message)."""
    if missing == ("detector",):  # its recognizer is there: only the detector needs another source
        return ("\nOr keep this pack's recognizer and find faces with the zero-download RetinaFace detector: "
                "add --detector retinaface.")
    if "recognizer" in missing:  # dlib needs no download, but its dataset cannot feed the identity loss
        return ("\n(--recognizer dlib needs no download, but `python -m training train` refuses a dataset built "
                "with it unless it trains without the identity loss, --set id_weight=0.)")
    return ""


def _train_refuses(encoder) -> str:
    """Why `train` will refuse the dataset this encoder makes ("" when it will not).

    The same test as train's (run/dip_check.identity_recognizer): the identity loss needs
    the ArcFace recognizer of a pack, run as torch; dlib's embeddings have no such twin."""
    kind = str(getattr(encoder, "kind", ""))
    if kind.startswith("arcface"):
        return ""
    dim = getattr(getattr(encoder, "recognizer", None), "dim", "?")
    return (f"this dataset's faces are encoded by the {kind} recognizer ({dim}-d embeddings), and `python -m "
            f"training train` refuses such a dataset: its identity loss (DIP) needs the ArcFace recognizer of an "
            f"insightface pack. To train with the identity loss, build into a new folder with --pack "
            f"models/insightface/models/antelopev2 (--detector retinaface keeps the zero-download detector); to "
            f"train this dataset as it is, give train --set id_weight=0 (no identity loss).")


def _merge(args) -> int:
    from .build.builder import format_report
    from .build.merge import MergeError, merge_parts

    try:
        report = merge_parts(args.output, args.parts, overwrite=args.overwrite)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(report["precomputed"]["message"])
    return 0


def _caption_options(args) -> dict:
    """Class-word table, caption source and captioner of a build, checked before any face
    is analyzed (a wrong folder fails now, not after hours)."""
    from .build.captioner import check_captioner_spec
    from .build.captions import load_class_synonyms
    from .build.celebv_text import SOURCE_PREFIX, is_celebv_text_root, load_caption_source

    settings: dict = {}
    if args.class_synonyms:
        settings["synonyms"] = load_class_synonyms(args.class_synonyms)
    captions = args.captions or (f"{SOURCE_PREFIX}{args.source}" if is_celebv_text_root(args.source) else "")
    if captions:
        load_caption_source(captions)
        settings["captions"] = captions
    if args.captioner:  # checked here; loaded by the process (or each worker) that builds, GPU when present
        check_captioner_spec(args.captioner)
        settings["captioner"] = args.captioner
    return {"settings": settings, "captioner": None}


def _config_overrides(args) -> list[str]:
    overrides = list(args.set or [])
    for name in ("checkpoint", "dataset", "output"):
        if getattr(args, name, None):
            overrides.append(f"{name}={json.dumps(getattr(args, name))}")
    return overrides


def _config(args):
    from .config import load_config

    return load_config(args.config, _config_overrides(args))


def _command(args) -> str:
    """This command as the user typed it (for the run lock's record and the Ctrl-C hint)."""
    import shlex

    return shlex.join(["python", "-m", "training", *args.argv])


def _train(args) -> int:
    import torch

    from .run import distributed as D
    from portraitbooth_core.weights.finite import NonFiniteWeightsError

    from .dataset.shards import check_dataset
    from .models.load import check_checkpoint
    from .run.dip_check import IdentityLossError
    from .run.lifecycle import RunLockedError, remove_stale_temps
    from .run.ownership import hold_run, inspect_run
    from .run.trainer import Trainer
    from .models.warm_start import WarmStartError
    from .run.health import TrainingCollapsedError
    from .run.stage0 import check_settings

    config = _config(args)
    try:
        check_settings(config)  # warm-start files, before SD1.5 loads
    except WarmStartError as exc:
        _error(str(exc))
        return 2
    # The inputs, before the ranks are set up and the run folder is made: a wrong path fails now.
    check_checkpoint(config.checkpoint)
    check_dataset(config.dataset)
    dist = D.setup(args.device)
    lock, trainer, interrupted = None, None, False
    try:
        # One run per folder: rank 0 holds <output>/run.lock until the run ends (the kernel drops
        # it if the run is killed); the other ranks learn from one all-reduce whether it could.
        held_elsewhere = None
        if dist.main:
            try:
                lock = hold_run(config.output, _command(args), "cli")
            except RunLockedError as exc:
                held_elsewhere = str(exc)
        if D.all_sum(torch.tensor([float(held_elsewhere is not None)], dtype=torch.float64), dist).item():
            if dist.enabled:  # every rank's error (torchrun's summary) names the holder, not only rank 0's
                said = [held_elsewhere]
                torch.distributed.broadcast_object_list(said, src=0)
                held_elsewhere = said[0]
            _error(f"--output {held_elsewhere}")
            return 2
        # An existing run continues only with its own settings (run/ownership.py). Every rank
        # reads the folder before rank 0 changes it, so all refuse or all go on.
        claim = inspect_run(config, world=dist.world)
        D.barrier(dist)
        refusal = claim.refusal(args.overwrite, "cli")
        if refusal:
            _error(f"--output {config.output}: {refusal}")
            return 2
        if dist.main:
            for note in claim.apply(args.overwrite):
                print(f"[train] {note}")
            remove_stale_temps(config.output)  # a killed run's half-written checkpoint: nobody else writes here
        D.barrier(dist)
        try:
            trainer = Trainer(config, dist)
        except (IdentityLossError, WarmStartError) as exc:  # the dataset cannot feed L_id, ...: the fix, not a traceback
            _error(str(exc))
            return 2
        if dist.main:
            claim.record()
        try:
            path = trainer.run()
        except (WarmStartError, NonFiniteWeightsError, TrainingCollapsedError) as exc:  # stage 0's data (e.g. a
            # CLIP vision file of another width), weights that diverged (export names them and the setting),
            # or on_collapse=stop (the checkpoint is saved; the message says what to change)
            _error(str(exc))
            trainer.close()
            return 2
        if path is not None:
            print(f"[train] exported {path}")
        trainer.close()
    except KeyboardInterrupt:  # Ctrl-C (torchrun passes it on to every rank): where the run stands, how to go on
        interrupted = True
        if dist.main:
            _error(_interrupted(args, config, trainer))
        return 130
    finally:
        try:
            D.teardown(dist, wait=not interrupted)
        finally:
            if lock is not None:
                lock.release()
    return 0


def _interrupted(args, config, trainer) -> str:
    """What Ctrl-C left: the step reached, the newest checkpoint, the command that resumes."""
    from .run.checkpoint import PATTERN, list_checkpoints
    from .run.lifecycle import under_torchrun

    at = f" at step {trainer.step} of {config.steps}" if trainer is not None else ""
    command = _command(args)
    if under_torchrun():
        import shlex

        command = f"the same torchrun command (torchrun <its options> -m training {shlex.join(args.argv)})"
    found = list_checkpoints(Path(config.output) / "checkpoints")
    if not found:
        return (f"interrupted (Ctrl-C){at}, before the run in {config.output} saved a checkpoint "
                f"(save_every={config.save_every}); to start it again run: {command}")
    saved = int(PATTERN.match(found[-1].name).group(1))
    lost = ""
    if trainer is not None and trainer.step > saved:
        lost = f"; steps {saved + 1}-{trainer.step} are trained again"
    return (f"interrupted (Ctrl-C){at}. The run in {config.output} keeps its checkpoints; the newest is "
            f"{found[-1]} (step {saved}){lost}. Resume it with: {command}")


def _export(args) -> int:
    from portraitbooth_core.weights.finite import NonFiniteWeightsError

    from .run.checkpoint import load_latest
    from .config import apply_overrides
    from .run.export import export
    from .run.trainer import Trainer

    config = _config(args)
    found = load_latest(Path(config.output) / "checkpoints")
    if found is None:  # before the dataset and models load: there is nothing to export
        print(f"error: --output {config.output}: no checkpoint in {Path(config.output) / 'checkpoints'}; give --output "
              f"(or `output` in --config) the run folder `python -m training train` wrote.", file=sys.stderr)
        return 1
    # The run's own settings (mode, EMA, ...), then what the command line says.
    config = apply_overrides(apply_overrides(config, found[1]["config"]), _config_overrides(args)).validate()
    trainer = Trainer(config, identity_loss=False)  # exporting needs no recognizer
    if trainer.resumed_from is None:
        print(f"no checkpoint under {Path(trainer.config.output) / 'checkpoints'}", file=sys.stderr)
        return 1
    try:
        print(f"[export] {export(trainer, args.out)} (from {trainer.resumed_from})")
    except NonFiniteWeightsError as exc:  # the tensors and the likely setting, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _precompute(args) -> int:
    import torch

    from .build.precompute import precompute
    from .dataset.shards import check_dataset
    from .models.load import check_checkpoint

    check_dataset(args.dataset)  # both inputs before any model loads
    check_checkpoint(args.model, "--model")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report = precompute(args.dataset, args.model, device, batch_size=args.batch_size, dtype=args.dtype)
    print(f"[precompute] {report['samples']} samples in {report['shards']} shard(s): {report['written']} written, "
          f"{report['kept']} already current, {report['bytes'] / 2**20:.1f} MiB, {report['seconds']} s")
    return 0


def _import_fastcomposer(args) -> int:
    from portraitbooth_core.weights.formats.fastcomposer import (FastComposerImportError, format_report,
                                                                 import_fastcomposer)

    try:
        report = import_fastcomposer(args.path, args.models, overwrite=args.overwrite, dtype=args.dtype, name=args.name)
    except FastComposerImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def _import_photomaker(args) -> int:
    from portraitbooth_core.weights.formats.photomaker import (PhotoMakerImportError, format_report,
                                                               import_photomaker)

    try:
        report = import_photomaker(args.path, args.models, overwrite=args.overwrite, name=args.name,
                                   version=args.version, dtype=args.dtype)
    except PhotoMakerImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a dataset (shards + index + report) from people folders")
    b.add_argument("source", help="folder of person folders (photos, videos, caption sidecars)")
    b.add_argument("output", help="dataset folder: shards, index.json, report.json")
    b.add_argument("--pack", help="insightface pack folder (SCRFD + ArcFace); default: zero-download backends")
    b.add_argument("--detector", default="auto", help="auto, scrfd (pack) or retinaface (zero-download)")
    b.add_argument("--recognizer", default="auto", help="auto, arcface (pack) or dlib (zero-download)")
    b.add_argument("--provider", default="auto", help="onnxruntime device: auto, cpu, cuda")
    b.add_argument("--parsing-weights", help="parsing_bisenet.pth; default: ellipse masks")
    b.add_argument("--resolution", type=int, default=512, help="side of the square training crops")
    b.add_argument("--crop-scale", type=float, default=3.0, help="crop side as a multiple of the face box")
    from portraitbooth_core.face.types import DEFAULT_DET_THRESHOLD  # here: importing the CLI stays light

    b.add_argument("--det-threshold", type=float, default=DEFAULT_DET_THRESHOLD,
                   help="face detection confidence (default: Analyze Faces', insightface's)")
    b.add_argument("--min-face", type=int, default=32, help="skip faces smaller than this (pixels)")
    b.add_argument("--several-faces", choices=("skip", "largest"), default="skip",
                   help="photos with several faces: skip them, or use the largest face")
    b.add_argument("--caption-template", default="", help='e.g. "a photo of a {word}" for photos without sidecar')
    b.add_argument("--default-word", default="", help="class word for the template (or class.txt per person), and "
                   "for generated captions naming nobody when the face has no gender estimate (else 'person')")
    b.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    b.add_argument("--class-synonyms", metavar="FILE.json",
                   help='class words and their synonyms, replacing the default table: {"man": ["guy", "gentleman"], '
                        '"woman": ["lady", "girl"]}; recorded in the dataset')
    b.add_argument("--captions", metavar="celebv-text:DIR",
                   help="caption source: CelebV-Text's descriptions and emotions for files named by a clip id "
                        "(default when the source folder is a CelebV-Text root: each clip is one person)")
    b.add_argument("--captioner", metavar="blip:FOLDER",
                   help="caption images without a sidecar with a local BLIP captioning model (never downloaded); "
                        "the subject gets a class word from class.txt, the face's gender/age, or --default-word")
    b.add_argument("--workers", type=int, default=1, help="processes analyzing people (0: one per CPU core); "
                   "the dataset is the same for any number")
    b.add_argument("--part", help="i/N: build only the i-th of N ranges of the sorted people folders into OUTPUT "
                   "(one part per machine); join the parts with `merge`")
    b.add_argument("--video-stride", type=int, default=0, help="every K-th video frame is a target, its reference a "
                   "distant frame of the clip; 0: the paper's two end frames with the middle frame as reference")
    b.add_argument("--video-fps", type=float, default=0.0, help="instead of --video-stride: about this many target "
                   "frames per second of video")
    b.add_argument("--video-reference-gap", type=float, default=0.25, help="with --video-stride/--video-fps: the "
                   "reference frame lies at least this fraction of the clip away from its target")
    m = sub.add_parser("merge", help="join the parts of a `build --part i/N` into one dataset (with their "
                       "precomputed inputs when every part has them, made with the same model and --dtype)")
    m.add_argument("output", help="dataset folder to write (the one a single build would write)")
    m.add_argument("parts", nargs="+", help="the part folders, all N of them")
    m.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUTPUT")
    for name, words in (("train", "train PortraitBooth on a dataset (continues the run in --output; several "
                                  "ranks under torchrun)"),
                        ("export", "write the weight file the nodes load from a run's newest checkpoint")):
        t = sub.add_parser(name, help=words, description=words)
        t.add_argument("--config", help="JSON or TOML file with TrainConfig fields")
        t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
        t.add_argument("--checkpoint", help="SD1.5 checkpoint (.safetensors) to start from")
        t.add_argument("--dataset", help="folder written by `python -m training build`")
        t.add_argument("--output", help="run folder: checkpoints, logs, validation images")
        t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
        if name == "export":
            t.add_argument("--out", help="weight file path (default <output>/<export_name>)")
        else:
            t.add_argument("--overwrite", action="store_true",
                           help="start the run in --output over when it was trained with other settings "
                                "(deletes its checkpoints and logs); without it such a run is refused")
    pc = sub.add_parser("precompute", help="VAE latents + text encodings of a dataset, so training steps skip those encodes")
    pc.add_argument("dataset", help="dataset folder (or fsspec URL) written by `python -m training build`")
    pc.add_argument("--model", required=True, help="the SD1.5 checkpoint you will train from (its VAE and text encoder)")
    pc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to encode")
    pc.add_argument("--batch-size", type=int, default=16, help="images per VAE encode")
    pc.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                    help="stored precision: fp32 is what the step computes; fp16/bf16 halve the files")
    f = sub.add_parser("import-fastcomposer", help="convert FastComposer's pytorch_model.bin into ComfyUI model files")
    f.add_argument("path", help="FastComposer's released pytorch_model.bin (or a .safetensors of the same dict)")
    f.add_argument("--models", required=True, help="ComfyUI's models folder: writes diffusion_models/, "
                   "clip_vision/ and portraitbooth/ under it")
    f.add_argument("--overwrite", action="store_true", help="replace files an earlier import wrote")
    f.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default="fp16", help="UNet and CLIP vision precision")
    f.add_argument("--name", default="fastcomposer", help="file name stem of the written files")
    pm = sub.add_parser("import-photomaker", help="convert PhotoMaker's photomaker-v1.bin / -v2.bin (SDXL) into "
                        "ComfyUI model files")
    pm.add_argument("path", help="photomaker-v1.bin or photomaker-v2.bin (or the .safetensors variant)")
    pm.add_argument("--models", required=True, help="ComfyUI's models folder: writes clip_vision/ and portraitbooth/ "
                    "under it")
    pm.add_argument("--overwrite", action="store_true", help="replace files an earlier import wrote")
    pm.add_argument("--version", choices=("auto", "v1", "v2"), default="auto",
                    help="which PhotoMaker the file must be (default: read from its tensors)")
    pm.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default="fp16", help="CLIP vision and LoRA precision")
    pm.add_argument("--name", default=None, help="file name stem of the written files (default photomaker_v1/_v2)")
    return p


def _error(message: str) -> None:
    """A refusal: `error: <message>` on stderr.

    Under torchrun the rank also leaves it in its error file (TORCHELASTIC_ERROR_FILE, in
    torch.distributed.elastic's format), so torchrun's failure summary, printed after its
    own ChildFailedError traceback, shows this message as the rank's error and the root
    cause instead of "To enable traceback see ...". There only each node's first rank prints
    it: the ranks check the same inputs, and each rank's message is in that summary anyway."""
    import os

    if not os.environ.get("TORCHELASTIC_ERROR_FILE") or os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    _error_file({"message": f"error: {message}"})


def _record_crash(exc: BaseException) -> None:
    """Under torchrun: this rank's traceback in its error file (what torch's @record does)."""
    import traceback

    _error_file({"message": f"{type(exc).__name__}: {exc}", "py_callstack": traceback.format_exc()})


def _error_file(message: dict) -> None:
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:  # not a rank torchrun started
        return
    # torchrun shows extraInfo.py_callstack when there is one, else message; it picks the root
    # cause by the timestamp (the first rank to fail).
    extra = {"timestamp": str(int(time.time()))}
    if "py_callstack" in message:
        extra["py_callstack"] = message["py_callstack"]
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message["message"], "extraInfo": extra}}, f)
    except OSError:  # the message is on stderr already; torchrun then says it has none
        pass


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the input, setting or file and the fix: printed as
    one line, not a traceback."""
    from .build.sources import SourceFolderError
    from .config import SettingError
    from .dataset.storage import DatasetFileError
    from .models.load import CheckpointFileError
    from .run.lifecycle import RunLockedError

    # SettingError: a --config file or --set value (config.LIMITS); DatasetFileError: a
    # --dataset that is missing, not a dataset, or has a malformed file.
    return SettingError, DatasetFileError, CheckpointFileError, SourceFolderError, RunLockedError


def main(argv: list[str] | None = None) -> int:
    from .run.lifecycle import die_with_launcher

    die_with_launcher()  # first: a rank torchrun started ends with torchrun, even while it imports
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from headless.comfyui import find_comfyui, import_comfyui

        import_comfyui(cpu=True if getattr(args, "device", "auto") == "cpu" else None, path=find_comfyui())
        known = _user_errors()
        try:
            return {"build": _build, "merge": _merge, "train": _train, "export": _export, "precompute": _precompute,
                    "import-fastcomposer": _import_fastcomposer,
                    "import-photomaker": _import_photomaker}[args.command](args)
        except known as exc:
            _error(str(exc))
            return 2
        except Exception as exc:  # a crash: under torchrun its traceback goes to torchrun's summary too
            _record_crash(exc)
            raise
    except KeyboardInterrupt:  # train says more itself (its checkpoint and the command that resumes)
        print(f"error: interrupted (Ctrl-C) during `{args.command}`.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
