"""FastComposer's evaluation protocol, generated through ComfyUI's HTTP API with the pack's
own API workflows: subjects x prompts x images per prompt (one seed per prompt, the
images of a prompt as one latent batch), single-subject or two subjects per image.

Writes images/<subject>/<prompt id>_<k>.png (or images/<a>+<b>/...) and
images/prompts.json, the layout `evaluation.score` reads. Images already on disk are not
generated again, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from headless.client import ComfyClient
from headless.workflows import API_DIR, load_api_workflow, with_inputs

from .prompts import Prompt
from .score import MANIFEST, find_subjects

SINGLE = "portraitbooth_single_subject"
MULTI = "portraitbooth_two_subjects"
NO_PACK = "none (zero-download RetinaFace)"
CLASS_WORDS_FILE = "subjects.json"  # optional {"obama": "man", "astronaut": "woman"} in the subjects folder


@dataclass
class ProtocolSettings:
    checkpoint: str
    weights: str
    prompts: list[Prompt]
    images_per_prompt: int = 4
    multi: bool = False
    size: int = 512
    steps: int = 50  # the paper: Euler, 50 steps, CFG 5
    cfg: float = 5.0
    seed: int = 0
    class_word: str = "person"
    negative: str = "blurry, lowres, deformed, bad anatomy"
    face_pack: str = NO_PACK  # the FaceEncoder the weights were trained with
    face_recognizer: str = "auto"
    class_words: dict[str, str] = field(default_factory=dict)

    def word(self, subject: str) -> str:
        return self.class_words.get(subject, self.class_word)


def subject_groups(names: list[str], multi: bool) -> list[list[str]]:
    """Single: each subject alone. Multi: disjoint consecutive pairs of the sorted names (an odd
    last one pairs with the first), so every subject appears and the run stays linear in size."""
    names = sorted(names)
    if not multi:
        return [[n] for n in names]
    if len(names) < 2:
        raise ValueError("--multi needs at least two subjects in the subjects folder")
    pairs = [names[i:i + 2] for i in range(0, len(names) - 1, 2)]
    if len(names) % 2:
        pairs.append([names[-1], names[0]])
    return pairs


def multi_workflow() -> dict:
    if not (API_DIR / f"{MULTI}.json").is_file():
        raise FileNotFoundError(f"--multi needs the two-subject workflow {API_DIR / (MULTI + '.json')}, which this "
                                "copy of the pack does not have; update the pack or run without --multi.")
    return load_api_workflow(MULTI)


def build_graph(s: ProtocolSettings, photos: list[str], words: list[str], prompt: Prompt, seed: int,
                prefix: str) -> tuple[dict, str, str]:
    """(API graph, the prompt text, id of its SaveImage node) for one prompt of one group."""
    if len(photos) == 1:
        text = prompt.single(words[0])
        graph = with_inputs(load_api_workflow(SINGLE), {
            "1": {"ckpt_name": s.checkpoint}, "2": {"portraitbooth_name": s.weights}, "3": {"image": photos[0]},
            "4": {"pack": s.face_pack, "recognizer": s.face_recognizer}, "6": {"text": text},
            "7": {"text": s.negative},
            "8": {"width": s.size, "height": s.size, "batch_size": s.images_per_prompt},
            "9": {"seed": seed, "steps": s.steps, "cfg": s.cfg}, "11": {"filename_prefix": prefix}})
        return graph, text, "11"
    text = prompt.multi(words)
    width = max(64, (s.size * 3 // 2) // 8 * 8)  # the template's 3:2 landscape, one region per subject
    graph = with_inputs(multi_workflow(), {
        "1": {"ckpt_name": s.checkpoint}, "2": {"portraitbooth_name": s.weights},
        "3": {"image": photos[0]}, "4": {"image": photos[1]},
        "5": {"pack": s.face_pack, "recognizer": s.face_recognizer},
        "8": {"text": text}, "9": {"text": prompt.single(words[0])}, "10": {"text": prompt.single(words[1])},
        "11": {"text": s.negative},
        "14": {"width": width, "height": s.size, "batch_size": s.images_per_prompt},
        "15": {"seed": seed, "steps": s.steps, "cfg": s.cfg}, "17": {"filename_prefix": prefix}})
    return graph, text, "17"


def run_protocol(client: ComfyClient, subjects_dir: Path, images_dir: Path, s: ProtocolSettings,
                 log=print) -> Path:
    """Generate every image of the protocol into images_dir; returns images_dir."""
    subjects = find_subjects(subjects_dir)
    words_file = subjects_dir / CLASS_WORDS_FILE
    if words_file.is_file():
        s.class_words = {**json.loads(words_file.read_text()), **s.class_words}
    groups = subject_groups(list(subjects), s.multi)
    if s.multi:
        multi_workflow()  # fail before uploading anything
    uploaded = {name: client.upload_image(photos[0], name=f"pb_eval_{name}{photos[0].suffix}")
                for name, photos in subjects.items()}  # the paper generates from one reference photo
    manifest_path = images_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    total = len(groups) * len(s.prompts)
    done, started = 0, time.monotonic()
    for group in groups:
        folder = images_dir / "+".join(group)
        folder.mkdir(parents=True, exist_ok=True)
        for p_index, prompt in enumerate(s.prompts):
            done += 1
            files = [folder / f"{prompt.id}_{k}.png" for k in range(s.images_per_prompt)]
            seed = s.seed + p_index
            graph, text, save_node = build_graph(s, [uploaded[g] for g in group], [s.word(g) for g in group],
                                                 prompt, seed, f"pb_eval/{'+'.join(group)}_{prompt.id}")
            on_disk = all(f.is_file() for f in files)
            if not on_disk:
                result = client.run(graph, timeout=3600)
                outputs = result.images(save_node)
                if len(outputs) != len(files):
                    raise RuntimeError(f"{'+'.join(group)} {prompt.id}: ComfyUI returned {len(outputs)} images, "
                                       f"expected {len(files)}")
                for file, record in zip(files, outputs):
                    _save_png(client.fetch(record), file)
            for k, f in enumerate(files):
                manifest[f"{folder.name}/{f.name}"] = {"prompt": text, "category": prompt.category,
                                                       "prompt_id": prompt.id, "seed": seed, "batch_index": k}
            manifest_path.write_text(json.dumps(manifest, indent=1))
            elapsed = time.monotonic() - started
            log(f"[protocol] {done}/{total} {'+'.join(group)} {prompt.id} {text!r}: {len(files)} image(s)"
                f"{' already on disk' if on_disk else ''}; "
                f"{elapsed:.0f} s so far, about {elapsed / done * (total - done):.0f} s to go")
    return images_dir


def _save_png(data: bytes, path: Path) -> None:
    # Re-encode rather than copy: drops the workflow ComfyUI embeds in every PNG's metadata.
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").save(path)
