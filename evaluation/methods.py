"""Which identity method a weight file is, and its protocol graph from the method's own template.

The method comes from the file's kind (its projector), read from the server with ComfyUI's
own `/view_metadata` route, so a remote server's files need no local copy:

    portraitbooth_mlp       PortraitBooth   portraitbooth_single_subject / _two_subjects
    fastcomposer_postfuse   FastComposer    portraitbooth_fastcomposer_single_subject / _two_subjects
    photomaker_v1           PhotoMaker v1   portraitbooth_photomaker_v1_single_subject / (v2's two-subject, v1 mode)
    photomaker_v2           PhotoMaker v2   portraitbooth_photomaker_v2_single_subject / _two_subjects

A template is filled by the roles of its nodes, found through its links (the sampler, its
positive prompt, its regions, the identity nodes under them, their photos), not by node ids.
The paper generates from one reference photo: a template that batches several photos for an
identity is rewired to one. The file's inference defaults (CFG, delayed start, companion UNet
and CLIP vision files) apply unless the command overrides them.
"""
from __future__ import annotations

import copy
import json
import urllib.error
import urllib.parse
from dataclasses import dataclass

from headless.workflows import load_api_workflow

SAMPLERS = ("KSampler", "PortraitBoothMultiSubjectSampler")
IDENTITY_NODES = ("PortraitBoothAnalyzeFaces", "PortraitBoothCLIPVisionIdentity")
METADATA_KEY = "portraitbooth"  # portraitbooth_core.weights.meta.METADATA_KEY, without importing torch
WEIGHTS_FOLDER = "portraitbooth"


class MethodError(ValueError):
    """A weight file the protocol cannot evaluate, or a template it cannot fill."""


@dataclass(frozen=True)
class Method:
    name: str              # as the report's rows say it
    slug: str              # folder name
    kind: str              # projector kind in the weight file
    base: str              # "sd15" | "sdxl"
    single: str            # API template names
    multi: str
    trigger: str = ""      # written after each class word (PhotoMaker's "img")
    identity_mode: str = ""  # CLIP Vision Identity's mode, where the method has one


METHODS = {m.kind: m for m in (
    Method("PortraitBooth", "portraitbooth", "portraitbooth_mlp", "sd15",
           "portraitbooth_single_subject", "portraitbooth_two_subjects"),
    Method("FastComposer", "fastcomposer", "fastcomposer_postfuse", "sd15",
           "portraitbooth_fastcomposer_single_subject", "portraitbooth_fastcomposer_two_subjects",
           identity_mode="FastComposer"),
    Method("PhotoMaker v1", "photomaker_v1", "photomaker_v1", "sdxl",
           "portraitbooth_photomaker_v1_single_subject", "portraitbooth_photomaker_v2_two_subjects",
           trigger="img", identity_mode="PhotoMaker v1"),
    Method("PhotoMaker v2", "photomaker_v2", "photomaker_v2", "sdxl",
           "portraitbooth_photomaker_v2_single_subject", "portraitbooth_photomaker_v2_two_subjects",
           trigger="img", identity_mode="PhotoMaker v2"),
)}


@dataclass(frozen=True)
class WeightFile:
    """A PortraitBooth file on the server: its name, method and stored inference defaults."""
    name: str
    method: Method
    defaults: dict

    @property
    def label(self) -> str:
        return f"{self.method.name} ({self.name})"


def read_weight_file(client, name: str) -> WeightFile:
    """The method of `name` in the server's models/portraitbooth, from its safetensors metadata."""
    if not name.endswith(".safetensors"):
        raise MethodError(f"--weights {name!r}: the protocol reads PortraitBooth .safetensors files (their metadata "
                          "names the method); give a file name from ComfyUI's models/portraitbooth.")
    query = urllib.parse.urlencode({"filename": name})
    try:
        metadata = client.get_json(f"/view_metadata/{WEIGHTS_FOLDER}?{query}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise MethodError(f"--weights {name!r}: the server at {client.base_url} has no such file in "
                              "models/portraitbooth (or it has no metadata). Copy or import it there, or fix the "
                              "name.") from None
        raise
    raw = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(raw, str):
        raise MethodError(f"--weights {name!r} on {client.base_url} is not a PortraitBooth file (its metadata has no "
                          f"{METADATA_KEY!r} entry). Import FastComposer or PhotoMaker releases with "
                          "`python -m training import-fastcomposer|import-photomaker` first.")
    try:
        info = json.loads(raw)
        kind = str(info.get("projector", {}).get("kind", "portraitbooth_mlp"))
        defaults = dict(info.get("defaults", {}))
    except (ValueError, AttributeError, TypeError):
        raise MethodError(f"--weights {name!r}: its PortraitBooth metadata is malformed; import or export it "
                          "again.") from None
    if kind not in METHODS:
        raise MethodError(f"--weights {name!r} holds a {kind!r} projector, which this protocol does not know "
                          f"(it runs {', '.join(m.name for m in METHODS.values())}). Update the pack.")
    return WeightFile(name, METHODS[kind], defaults)


# -- graph roles --------------------------------------------------------------------------

def _source(graph: dict, node_id: str, name: str) -> str | None:
    link = graph[node_id]["inputs"].get(name)
    return str(link[0]) if isinstance(link, list) else None


def _only(graph: dict, class_type: str, template: str) -> str | None:
    ids = [k for k, v in graph.items() if v["class_type"] == class_type]
    if len(ids) > 1:
        raise MethodError(f"template {template} has {len(ids)} {class_type} nodes; the protocol fills one")
    return ids[0] if ids else None


def _first_photo(graph: dict, node_id: str, template: str) -> str:
    """The LoadImage that feeds node_id's image input; through ImageBatch chains, the first photo."""
    current = node_id
    for _ in range(len(graph)):
        node = graph[current]
        if node["class_type"] == "LoadImage":
            return current
        link = next((node["inputs"][k] for k in ("images", "image", "image1") if isinstance(node["inputs"].get(k), list)),
                    None)
        if link is None:
            break
        current = str(link[0])
    raise MethodError(f"template {template}: no LoadImage under node {node_id}")


@dataclass
class Roles:
    sampler: str
    prompt: str               # the sampler's positive (Apply STEA) node
    subject_prompts: list[str]  # per-subject Apply STEA nodes (regions), subject order
    identities: list[str]     # identity nodes, subject order
    negative: str
    latent: str
    save: str


def find_roles(graph: dict, template: str) -> Roles:
    samplers = [k for k, v in graph.items() if v["class_type"] in SAMPLERS]
    saves = [k for k, v in graph.items() if v["class_type"] == "SaveImage"]
    if len(samplers) != 1 or len(saves) != 1:
        raise MethodError(f"template {template} needs one sampler and one SaveImage node")
    sampler = samplers[0]
    prompt, negative, latent = (_source(graph, sampler, k) for k in ("positive", "negative", "latent_image"))
    if prompt is None or graph[prompt]["class_type"] != "PortraitBoothApplySTEA":
        raise MethodError(f"template {template}: the sampler's positive prompt is not an Apply STEA node")
    identities = [_source(graph, prompt, k) for k in ("face", "face_2", "face_3", "face_4")]
    identities = [i for i in identities if i is not None]
    subject_prompts: list[str] = []
    region = _source(graph, sampler, "regions")
    while region is not None:  # the chain runs last -> first through "previous"
        subject_prompts.insert(0, _source(graph, region, "conditioning"))
        region = _source(graph, region, "previous")
    return Roles(sampler, prompt, subject_prompts, identities, negative, latent, saves[0])


def _prune(graph: dict, root: str) -> dict:
    """Only the nodes `root` depends on (drops photos a rewiring left unused)."""
    keep, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node in keep:
            continue
        keep.add(node)
        todo += [str(v[0]) for v in graph[node]["inputs"].values() if isinstance(v, list)]
    return {k: v for k, v in graph.items() if k in keep}


@dataclass(frozen=True)
class GraphRequest:
    """Everything a protocol graph varies: the rest stays the template's."""
    checkpoint: str
    photos: tuple[str, ...]     # uploaded names, one per subject
    prompt: str                 # the whole image's prompt
    subject_prompts: tuple[str, ...]  # per subject (two-subject templates)
    width: int | None
    height: int | None
    batch: int
    seed: int
    steps: int
    cfg: float | None           # None: the file's, else the template's
    start_percent: float | None  # None: the file's (the template's -1)
    negative: str | None
    face_pack: str | None       # None: the template's
    face_recognizer: str | None
    prefix: str


def template_size(method: Method, multi: bool) -> tuple[int, int]:
    graph = load_api_workflow(method.multi if multi else method.single)
    latent = graph[find_roles(graph, method.multi if multi else method.single).latent]["inputs"]
    return int(latent["width"]), int(latent["height"])


def build_method_graph(weights: WeightFile, request: GraphRequest) -> tuple[dict, str]:
    """(API graph, SaveImage id) for one prompt of one subject group through the method's template."""
    method = weights.method
    multi = len(request.photos) > 1
    template = method.multi if multi else method.single
    graph = copy.deepcopy(load_api_workflow(template))
    roles = find_roles(graph, template)
    if len(roles.identities) != len(request.photos):
        raise MethodError(f"template {template} takes {len(roles.identities)} subject(s), not {len(request.photos)}")
    for identity, photo in zip(roles.identities, request.photos):
        node = graph[identity]
        key = "images" if "images" in node["inputs"] else "image"
        first = _first_photo(graph, identity, template)
        node["inputs"][key] = [first, 0]  # one reference photo, as the paper
        graph[first]["inputs"]["image"] = photo
        if method.identity_mode and "mode" in node["inputs"]:
            node["inputs"]["mode"] = method.identity_mode
            if method.identity_mode != "PhotoMaker v2":
                node["inputs"].pop("face_encoder", None)  # only v2 pairs photos with a face embedding
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = request.checkpoint
        elif kind == "PortraitBoothLoadModel":
            inputs["portraitbooth_name"] = weights.name
        elif kind == "UNETLoader" and weights.defaults.get("unet"):
            inputs["unet_name"] = weights.defaults["unet"]
        elif kind == "CLIPVisionLoader" and weights.defaults.get("clip_vision"):
            inputs["clip_name"] = weights.defaults["clip_vision"]
        elif kind == "PortraitBoothLoadFaceEncoder":
            if request.face_pack is not None:
                inputs["pack"] = request.face_pack
            if request.face_recognizer is not None:
                inputs["recognizer"] = request.face_recognizer
        elif kind == "PortraitBoothApplySTEA" and request.start_percent is not None:
            inputs["start_percent"] = request.start_percent
    graph[roles.prompt]["inputs"]["text"] = request.prompt
    if len(roles.subject_prompts) not in (0, len(request.subject_prompts)):
        raise MethodError(f"template {template} has {len(roles.subject_prompts)} regions for "
                          f"{len(request.subject_prompts)} subjects")
    for node, text in zip(roles.subject_prompts, request.subject_prompts):
        graph[node]["inputs"]["text"] = text
    if request.negative is not None:
        graph[roles.negative]["inputs"]["text"] = request.negative
    latent = graph[roles.latent]["inputs"]
    if request.width is not None:
        latent["width"], latent["height"] = request.width, request.height
    latent["batch_size"] = request.batch
    sampler = graph[roles.sampler]["inputs"]
    cfg = request.cfg if request.cfg is not None else weights.defaults.get("cfg")
    sampler.update(seed=request.seed, steps=request.steps, **({"cfg": float(cfg)} if cfg is not None else {}))
    graph[roles.save]["inputs"]["filename_prefix"] = request.prefix
    return _prune(graph, roles.save), roles.save


def subject_word(method: Method, class_word: str) -> str:
    """The class word as the method's prompts write it ("man img" for PhotoMaker)."""
    return f"{class_word} {method.trigger}" if method.trigger else class_word
