"""FastComposer's evaluation protocol, generated through ComfyUI's HTTP API with each method's
own API workflow (evaluation/methods.py): subjects x prompts x images per prompt (one seed per
prompt, the images of a prompt as one latent batch), one subject per image or every pair of
subjects, for every weight file given, on one or several servers (evaluation/fanout.py).

Layout, per weight file (its file name without .safetensors) and setting:

    out/<weights>/single/images/<subject>/<prompt id>_<k>.png
    out/<weights>/multi/images/<a>+<b>/<prompt id>_<k>.png
    out/<weights>/<setting>/images/prompts.json      the manifest `evaluation.score` reads

Every method sees the same subjects, prompts and seeds. An image is generated again only
when its file or its manifest entry (prompt, seed, the whole graph) does not match.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .methods import GraphRequest, WeightFile, build_method_graph, read_weight_file, subject_word, template_size
from .prompts import Prompt
from .score import find_subjects

CLASS_WORDS_FILE = "subjects.json"  # optional {"obama": "man", "astronaut": "woman"} in the subjects folder
SETTINGS = ("single", "multi")


@dataclass
class ProtocolSettings:
    checkpoints: dict[str, str]          # base ("sd15", "sdxl") -> checkpoint name on the server
    weights: list[str]                   # PortraitBooth files (models/portraitbooth), any method
    prompts: list[Prompt]                # one subject per image
    multi_prompts: list[Prompt] = field(default_factory=list)  # two subjects per image
    settings: tuple[str, ...] = ("single",)
    images_per_prompt: int = 4
    size: int | None = None              # None: the template's (512 SD1.5, 1024 SDXL); multi keeps its aspect
    steps: int = 50                      # the paper: Euler, 50 steps, CFG 5
    cfg: float | None = None             # None: the file's default, else the template's
    start_percent: float | None = None   # None: the file's default
    seed: int = 0
    class_word: str = "person"
    negative: str | None = None          # None: the template's
    face_pack: str | None = None         # None: the template's (the FaceEncoder the weights were made for)
    face_recognizer: str | None = None
    pairs: int | None = None             # multi: only the first N pairs (quick runs)
    class_words: dict[str, str] = field(default_factory=dict)

    def word(self, subject: str) -> str:
        return self.class_words.get(subject, self.class_word)


def all_pairs(names: list[str], limit: int | None = None) -> list[list[str]]:
    """Every pair of subjects (15 subjects: 105), ordered so that the first ceil(n/2) pairs hold
    every subject once (a quick --pairs run still sees everyone): neighbours (a,b), (c,d), ...,
    the odd one out with the first, then the rest by distance."""
    names = sorted(names)
    if len(names) < 2:
        raise ValueError("two-subject images need at least two subjects in the subjects folder")
    if limit is not None and limit < 1:
        raise ValueError(f"--pairs must be 1 or more, got {limit}")
    n = len(names)
    first = [(i, i + 1) for i in range(0, n - 1, 2)] + ([(0, n - 1)] if n % 2 else [])
    rest = sorted((p for p in itertools.combinations(range(n), 2) if p not in first), key=lambda p: (p[1] - p[0], p[0]))
    return [[names[i], names[j]] for i, j in first + rest][:limit]


def subject_groups(names: list[str], setting: str, pairs: int | None = None) -> list[list[str]]:
    return [[n] for n in sorted(names)] if setting == "single" else all_pairs(names, pairs)


def run_folder(out: Path, weights: WeightFile, setting: str) -> Path:
    """out/<weights file name without .safetensors>/<setting>: one per method and setting."""
    return out / weights.name.removesuffix(".safetensors").replace("/", "__").replace("\\", "__") / setting


def _size(s: ProtocolSettings, weights: WeightFile, multi: bool) -> tuple[int | None, int | None]:
    if s.size is None:
        return None, None
    width, height = template_size(weights.method, multi)
    return max(64, round(s.size * width / height / 8) * 8), s.size


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def plan_images(s: ProtocolSettings, weight_files: list[WeightFile], subjects: dict[str, list[Path]], out: Path,
                photo_names: dict[str, str], photo_digests: dict[str, str]) -> list:
    """One fan-out job per (weights, setting, subject group, prompt)."""
    from .fanout import ImageJob

    jobs = []
    for weights in weight_files:
        checkpoint = s.checkpoints.get(weights.method.base)
        if not checkpoint:
            flag = "--sdxl-checkpoint" if weights.method.base == "sdxl" else "--checkpoint"
            raise ValueError(f"{weights.label} runs on {weights.method.base.upper()}: give its checkpoint with {flag}")
        for setting in s.settings:
            multi = setting == "multi"
            images_dir = run_folder(out, weights, setting) / "images"
            stem = images_dir.parent.parent.name
            width, height = _size(s, weights, multi)
            for group in subject_groups(list(subjects), setting, s.pairs):
                words = [subject_word(weights.method, s.word(g)) for g in group]
                folder = images_dir / "+".join(group)
                for p_index, prompt in enumerate(s.multi_prompts if multi else s.prompts):
                    seed = s.seed + p_index  # the same seeds for every method
                    text = prompt.multi(words) if multi else prompt.single(words[0])
                    request = GraphRequest(
                        checkpoint=checkpoint, photos=tuple(photo_names[g] for g in group), prompt=text,
                        subject_prompts=tuple(prompt.single(w) for w in words) if multi else (), width=width, height=height, batch=s.images_per_prompt, seed=seed,
                        steps=s.steps, cfg=s.cfg, start_percent=s.start_percent, negative=s.negative,
                        face_pack=s.face_pack, face_recognizer=s.face_recognizer,
                        prefix=f"pb_eval/{stem}_{'+'.join(group)}_{prompt.id}")
                    graph, save = build_method_graph(weights, request)
                    # What decides the pixels: the whole graph but its output prefix, and the photos' bytes.
                    key_graph = json.loads(json.dumps(graph))
                    key_graph[save]["inputs"].pop("filename_prefix", None)
                    graph_digest = _digest(json.dumps(key_graph, sort_keys=True).encode())
                    files = tuple(folder / f"{prompt.id}_{k}.png" for k in range(s.images_per_prompt))
                    records = tuple({"prompt": text, "category": prompt.category, "prompt_id": prompt.id,
                                     "seed": seed, "batch_index": k, "method": weights.method.name,
                                     "weights": weights.name, "setting": setting, "graph": graph_digest,
                                     "photos": [photo_digests[g] for g in group]}
                                    for k in range(s.images_per_prompt))
                    jobs.append(ImageJob(
                        key=f"{stem}/{setting}/{'+'.join(group)}/{prompt.id}",
                        graph=graph, save_node=save, images_dir=images_dir, files=files, records=records,
                        uploads={photo_names[g]: subjects[g][0] for g in group}))
    return jobs


def run_protocol(clients: list, subjects_dir: Path, out: Path, s: ProtocolSettings, log=print) -> list[tuple]:
    """Generate every image of the protocol; returns [(WeightFile, setting, images folder)]."""
    from .fanout import run_jobs

    if not clients:
        raise ValueError("no ComfyUI server: give --server URL (repeatable) or --start")
    subjects = find_subjects(subjects_dir)
    words_file = subjects_dir / CLASS_WORDS_FILE
    if words_file.is_file():
        s = replace(s, class_words={**json.loads(words_file.read_text()), **s.class_words})
    weight_files = [read_weight_file(clients[0], name) for name in s.weights]
    for client in clients[1:]:  # one queue: every server must hold the same files
        for w in weight_files:
            other = read_weight_file(client, w.name)
            if other != w:
                raise ValueError(f"{w.name} differs between {clients[0].base_url} and {client.base_url}; give every "
                                 "server the same models")
    folders = [run_folder(out, w, setting) for w in weight_files for setting in s.settings]
    if len(set(folders)) != len(folders):
        raise ValueError("two --weights files share a name; give each file once")
    # The paper generates from one reference photo per subject.
    digests = {name: _digest(photos[0].read_bytes()) for name, photos in subjects.items()}
    names = {name: f"pb_eval_{name}_{digests[name]}{photos[0].suffix.lower()}" for name, photos in subjects.items()}
    jobs = plan_images(s, weight_files, subjects, out, names, digests)
    for w in weight_files:
        log(f"[protocol] {w.label}: {', '.join(s.settings)}")
    run_jobs(jobs, clients, log=log)
    return [(w, setting, run_folder(out, w, setting) / "images") for w in weight_files for setting in s.settings]
