"""The protocol's methods: a weight file's kind picks its method and template; each template
is filled by the roles of its nodes; the report sets the numbers beside the paper's Table 3.
No server here (test_eval_server.py runs the protocol through ComfyUI)."""
from __future__ import annotations

import csv
import io
import json
import urllib.error

import pytest
from PIL import Image

from evaluation.methods import (METHODS, GraphRequest, MethodError, WeightFile, build_method_graph, find_roles,
                                read_weight_file)
from evaluation.prompts import CATEGORIES, MULTI_CATEGORIES, select_prompts
from evaluation.protocol import all_pairs
from evaluation.protocol_report import PAPER_TABLE3, category_sheet, csv_table, markdown_table, table_rows
from headless.workflows import load_api_workflow
from standins.sd15 import build_portraitbooth_file

METHOD = {m.name: m for m in METHODS.values()}


def request(photos=("pb_a.png",), prompt="a man wearing a red hat", subject_prompts=(), **changes) -> GraphRequest:
    values = dict(checkpoint="ckpt.safetensors", photos=tuple(photos), prompt=prompt,
                  subject_prompts=tuple(subject_prompts), width=None, height=None, batch=4, seed=7, steps=50,
                  cfg=None, start_percent=None, negative=None, face_pack=None, face_recognizer=None, prefix="pb_eval/x")
    return GraphRequest(**{**values, **changes})


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    return [n["inputs"] for n in graph.values() if n["class_type"] == class_type]


FASTCOMPOSER = WeightFile("fc_postfuse.safetensors", METHOD["FastComposer"],
                          {"cfg": 5.0, "start_percent": 0.3, "unet": "fc_unet.safetensors",
                           "clip_vision": "fc_clip.safetensors"})
PHOTOMAKER_V2 = WeightFile("pm2.safetensors", METHOD["PhotoMaker v2"],
                           {"cfg": 5.0, "clip_vision": "pm2_clip.safetensors"})
PHOTOMAKER_V1 = WeightFile("pm1.safetensors", METHOD["PhotoMaker v1"], {"clip_vision": "pm1_clip.safetensors"})
PORTRAITBOOTH = WeightFile("pb.safetensors", METHOD["PortraitBooth"], {})


def test_every_methods_templates_have_the_roles_the_protocol_fills():
    for method in METHODS.values():
        for template, subjects in ((method.single, 1), (method.multi, 2)):
            roles = find_roles(load_api_workflow(template), template)
            assert len(roles.identities) == subjects, template
            assert len(roles.subject_prompts) == (2 if subjects == 2 else 0), template


def test_fastcomposer_runs_its_own_template_with_the_files_and_defaults_its_import_wrote():
    graph, save = build_method_graph(FASTCOMPOSER, request())
    assert nodes_of(graph, "UNETLoader")[0]["unet_name"] == "fc_unet.safetensors"
    assert nodes_of(graph, "CLIPVisionLoader")[0]["clip_name"] == "fc_clip.safetensors"
    assert nodes_of(graph, "PortraitBoothLoadModel")[0]["portraitbooth_name"] == "fc_postfuse.safetensors"
    assert nodes_of(graph, "CheckpointLoaderSimple")[0]["ckpt_name"] == "ckpt.safetensors"
    (identity,) = nodes_of(graph, "PortraitBoothCLIPVisionIdentity")
    assert identity["mode"] == "FastComposer"
    (stea,) = nodes_of(graph, "PortraitBoothApplySTEA")
    assert stea["text"] == "a man wearing a red hat" and stea["start_percent"] == -1.0  # -1: the file's 0.3
    (sampler,) = nodes_of(graph, "KSampler")
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"]) == (7, 50, 5.0, "euler")
    assert nodes_of(graph, "EmptyLatentImage")[0] == {"width": 512, "height": 512, "batch_size": 4}
    assert graph[save]["inputs"]["filename_prefix"] == "pb_eval/x"
    assert [n["image"] for n in nodes_of(graph, "LoadImage")] == ["pb_a.png"]


def test_overrides_replace_the_files_defaults():
    graph, _ = build_method_graph(FASTCOMPOSER, request(cfg=7.5, start_percent=0.1, negative="ugly", width=96,
                                                        height=64))
    assert nodes_of(graph, "KSampler")[0]["cfg"] == 7.5
    assert nodes_of(graph, "PortraitBoothApplySTEA")[0]["start_percent"] == 0.1
    assert nodes_of(graph, "CLIPTextEncode")[0]["text"] == "ugly"
    assert nodes_of(graph, "EmptyLatentImage")[0]["width"] == 96


def test_a_template_that_batches_several_photos_runs_from_one_reference_photo():
    template = load_api_workflow(PHOTOMAKER_V2.method.single)
    assert len(nodes_of(template, "LoadImage")) == 3 and nodes_of(template, "ImageBatch")
    graph, _ = build_method_graph(PHOTOMAKER_V2, request(prompt="a man img wearing a red hat"))
    assert [n["image"] for n in nodes_of(graph, "LoadImage")] == ["pb_a.png"]
    assert not nodes_of(graph, "ImageBatch"), "the unused batch nodes are pruned"
    (identity,) = nodes_of(graph, "PortraitBoothCLIPVisionIdentity")
    assert identity["images"][0] in graph and graph[identity["images"][0]]["class_type"] == "LoadImage"
    assert identity["mode"] == "PhotoMaker v2" and "face_encoder" in identity
    assert nodes_of(graph, "CLIPVisionLoader")[0]["clip_name"] == "pm2_clip.safetensors"
    assert nodes_of(graph, "EmptyLatentImage")[0]["width"] == 1024


def test_two_subjects_fill_the_global_prompt_the_regions_and_each_photo_in_order():
    graph, _ = build_method_graph(PORTRAITBOOTH, request(
        photos=("pb_a.png", "pb_b.png"), prompt="a man and a woman on the beach",
        subject_prompts=("a man on the beach", "a woman on the beach")))
    roles = find_roles(graph, "filled")
    assert graph[roles.prompt]["inputs"]["text"] == "a man and a woman on the beach"
    assert [graph[n]["inputs"]["text"] for n in roles.subject_prompts] == ["a man on the beach",
                                                                           "a woman on the beach"]
    photos = [graph[graph[i]["inputs"]["images"][0]]["inputs"]["image"] for i in roles.identities]
    assert photos == ["pb_a.png", "pb_b.png"]
    assert nodes_of(graph, "PortraitBoothLoadFaceEncoder")[0]["pack"] == "none (zero-download RetinaFace)"
    with pytest.raises(MethodError, match="takes 2 subject"):
        build_method_graph(PORTRAITBOOTH, request(photos=("a", "b", "c"), subject_prompts=("x", "y", "z")))


def test_photomaker_v1_two_subjects_run_v2s_template_in_v1_mode_without_a_face_encoder():
    graph, _ = build_method_graph(PHOTOMAKER_V1, request(photos=("a.png", "b.png"), subject_prompts=("x", "y")))
    identities = nodes_of(graph, "PortraitBoothCLIPVisionIdentity")
    assert [i["mode"] for i in identities] == ["PhotoMaker v1"] * 2
    assert all("face_encoder" not in i for i in identities)
    assert not nodes_of(graph, "PortraitBoothLoadFaceEncoder")


class MetadataClient:
    """What ComfyUI's /view_metadata answers, read from a real file's safetensors header."""
    base_url = "http://stand-in"

    def __init__(self, files: dict):
        self.files = files

    def get_json(self, path: str):
        name = path.split("filename=")[1]
        if name not in self.files:
            raise urllib.error.HTTPError(path, 404, "Not Found", {}, None)
        with open(self.files[name], "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(length))["__metadata__"]


def test_the_method_comes_from_the_weight_files_kind(tmp_path):
    pb = build_portraitbooth_file(tmp_path / "pb.safetensors")
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, str(plain), metadata={"other": "1"})
    client = MetadataClient({"pb.safetensors": pb, "plain.safetensors": plain})
    assert read_weight_file(client, "pb.safetensors").method.name == "PortraitBooth"
    with pytest.raises(MethodError, match="has no such file"):
        read_weight_file(client, "missing.safetensors")
    with pytest.raises(MethodError, match="not a PortraitBooth file"):
        read_weight_file(client, "plain.safetensors")
    with pytest.raises(MethodError, match=".safetensors files"):
        read_weight_file(client, "pb.ckpt")


def test_every_pair_of_fifteen_subjects_and_a_prefix_that_covers_them_all():
    names = [f"s{i:02d}" for i in range(15)]
    pairs = all_pairs(names)
    assert len(pairs) == 105 and len({tuple(p) for p in pairs}) == 105
    assert {n for p in all_pairs(names, 8) for n in p} == set(names)
    with pytest.raises(ValueError, match="at least two"):
        all_pairs(["one"])


def test_the_prompt_sets_are_fastcomposers_sizes():
    assert sum(map(len, CATEGORIES.values())) == 40
    assert sum(map(len, MULTI_CATEGORIES.values())) == 21
    assert len(select_prompts(None, None, multi=True)) == 21
    assert [p.id for p in select_prompts(["context", "accessory"], 1, multi=True)] == ["context00"]
    with pytest.raises(ValueError, match="none of the categories"):
        select_prompts(["accessory"], multi=True)


def run(method: str, weights: str, setting: str, identity: float, images_dir) -> dict:
    result = {"recognizer": "dlib:resnet128", "identity_metric": "pack (dlib:resnet128)",
              "by_category": {"all": {"images": 4, "identity": identity, "face_rate": 1.0, "clip_text": 0.25,
                                      "expression": None}}, "images": []}
    return {"method": method, "weights": weights, "setting": setting, "result": result, "images_dir": images_dir}


def test_the_report_carries_the_papers_table_3_verbatim_beside_this_runs_rows(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "prompts.json").write_text(json.dumps({"a/x_0.png": {"seconds": 2.0}, "a/x_1.png": {"seconds": 4.0}}))
    rows = table_rows([run("FastComposer", "fc.safetensors", "single", 0.5, images),
                       run("FastComposer", "fc.safetensors", "multi", 0.4, images)])
    md = markdown_table(rows)
    assert "| FastComposer | fc.safetensors | 0.500 | 0.250 | 0.400 | 0.250 | 3.00 / 3.00 |" in md
    assert "| 0.514 / 0.243 | 0.431 / 0.243 |" in md
    assert "| PortraitBooth | (paper only) |" in md and "| 0.657 / 0.245 | — / — |" in md
    assert "setup may differ" in md and "pack (dlib:resnet128)" in md
    table = list(csv.DictReader(io.StringIO(csv_table(rows))))
    by_method = {r["method"]: r for r in table}
    for method, ref in PAPER_TABLE3.items():
        assert (by_method[method]["paper single Id"], by_method[method]["paper single CLIP-T"]) == ref["single"]
    assert by_method["FastComposer"]["paper two Id"] == "0.431"
    assert by_method["FastComposer"]["single s/image"] == "3.0"


def test_a_category_sheet_has_a_row_per_subject_and_a_column_per_category(tmp_path):
    images = tmp_path / "images"
    records = []
    for subject in ("obama", "biden"):
        (images / subject).mkdir(parents=True)
        for category in ("accessory", "style", "action"):
            name = f"{subject}/{category}00_0.png"
            Image.new("RGB", (64, 64), (200, 10, 10)).save(images / name)
            records.append({"file": name, "group": subject, "category": category, "prompt_id": f"{category}00",
                            "identity": 0.5, "face_found": True})
    out = category_sheet({"images": records}, images, tmp_path / "sheet.png", "FastComposer")
    with Image.open(out) as sheet:
        assert sheet.size == (140 + 3 * 160, 30 + 2 * (160 + 16))
        assert sheet.getpixel((140 + 160 + 80, 30 + 80)) == (200, 10, 10)
