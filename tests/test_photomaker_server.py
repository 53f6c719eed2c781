"""PhotoMaker on SDXL through the real ComfyUI: the shipped templates on the stand-ins (an
SDXL-family checkpoint ComfyUI detects as SDXL, PhotoMaker v1/v2 stand-ins imported with the
pack's importer, a buffalo_l-layout insightface pack) over the HTTP API.

The photos are real; the stand-in detector finds "faces" in obama*.jpg and biden.jpg and none
in t1.jpg (tests/standins_face.py). Sizes are tiny (64 px, 2 steps). What the server must show:
faces change the image and the same face gives the same image, a photo without a face is
dropped with the warning, and files or identities of the wrong kind stop with their message.
"""
from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headless.client import ComfyError
from standins.templates import standin_graph

pytestmark = pytest.mark.slow  # SDXL stand-in workflows: ~10 s each on 2 cores
V2, V1 = "portraitbooth_photomaker_v2_single_subject", "portraitbooth_photomaker_v1_single_subject"


@pytest.fixture(scope="module")
def server(models_server):
    return models_server  # the session's server with the templates' stand-ins, PhotoMaker's among them


@pytest.fixture(scope="module")
def photos(server, photos_dir, tmp_path_factory) -> dict[str, str]:
    # obama again under another name: LoadImage re-runs, so "same face, same image" is
    # computed twice instead of coming from ComfyUI's cache.
    again = tmp_path_factory.mktemp("photos") / "obama_again.jpg"
    shutil.copyfile(photos_dir / "obama.jpg", again)
    files = {f: photos_dir / f for f in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "t1.jpg")}
    files["obama_again.jpg"] = again
    return {name: server.client.upload_image(path) for name, path in files.items()}


def node_of(graph: dict, class_type: str) -> str:
    return next(nid for nid, n in graph.items() if n["class_type"] == class_type)


def graph_with(template: str, sd15_checkpoint: str, photos: dict, faces: tuple[str, ...], **changes) -> dict:
    graph = standin_graph(template, sd15_checkpoint, photos)
    loads = sorted((nid for nid, n in graph.items() if n["class_type"] == "LoadImage"), key=int)
    for nid, face in zip(loads, faces):
        graph[nid]["inputs"]["image"] = photos[face]
    for class_type, inputs in changes.items():
        graph[node_of(graph, class_type)]["inputs"].update(inputs)
    return graph


def image(server, result, graph) -> np.ndarray:
    (record,) = result.images(node_of(graph, "SaveImage"))[:1]
    return np.asarray(Image.open(io.BytesIO(server.client.fetch(record))).convert("RGB"), dtype=np.int16)


def run(server, graph):
    return server.client.run(graph, timeout=600)


def test_v2_follows_the_face_and_the_same_face_gives_the_same_image(server, photos, sd15_checkpoint):
    three = ("obama.jpg", "obama2.jpg", "obama3.jpg")
    shots = {}
    for key, faces in (("obama", three), ("again", ("obama_again.jpg", "obama2.jpg", "obama3.jpg")),
                       ("biden", ("biden.jpg",) * 3)):
        # the template's own start (the file's 0.2): 4 of 5 steps see the identity
        graph = graph_with(V2, sd15_checkpoint, photos, faces, KSampler={"steps": 5})
        shots[key] = image(server, run(server, graph), graph)
    assert np.array_equal(shots["obama"], shots["again"])
    assert np.abs(shots["obama"] - shots["biden"]).mean() > 0.5


def test_a_photo_without_a_face_is_dropped_with_a_warning_naming_it(server, photos, sd15_checkpoint):
    graph = graph_with(V2, sd15_checkpoint, photos, ("obama.jpg", "t1.jpg", "obama3.jpg"))
    result = run(server, graph)
    text = "\n".join(result.texts(node_of(graph, "PortraitBoothCLIPVisionIdentity")))
    assert "image 2 of 3: no face found - dropped from the PhotoMaker v2 identity" in text, text
    assert "2 of 3 photos used" in text
    assert result.images(node_of(graph, "SaveImage"))


def test_a_v1_file_fed_the_v2_identity_names_the_mode_and_the_reverse(server, photos, sd15_checkpoint):
    for template, file, words in ((V2, "photomaker-v1-standin.safetensors", "mode 'PhotoMaker v1'"),
                                  (V1, "photomaker-v2-standin.safetensors", "mode 'PhotoMaker v2' with Load FaceEncoder")):
        graph = graph_with(template, sd15_checkpoint, photos, ("obama.jpg",) * 3,
                           PortraitBoothLoadModel={"portraitbooth_name": file})
        with pytest.raises(ComfyError) as info:
            run(server, graph)
        message = str(info.value)
        assert "PortraitBoothApplySTEA" in message and words in message, message


def test_a_photomaker_file_on_the_sd15_checkpoint_names_both_families(server, photos, sd15_checkpoint):
    graph = graph_with(V1, sd15_checkpoint, photos, ("obama.jpg",) * 3,
                       CheckpointLoaderSimple={"ckpt_name": sd15_checkpoint})
    with pytest.raises(ComfyError) as info:
        run(server, graph)
    message = str(info.value)
    assert "PortraitBoothLoadModel" in message and "is SD1.5" in message and "made for SDXL" in message, message


class _Marker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_truncated_and_code_running_files_are_refused_by_name(server, photos, sd15_checkpoint, template_models,
                                                              tmp_path):
    folder = Path(template_models["portraitbooth"])
    good = folder / "photomaker-v2-standin.safetensors"
    cut, evil = folder / "photomaker_truncated.safetensors", folder / "photomaker_pickle.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    marker = tmp_path / "ran"
    evil.write_bytes(pickle.dumps({"id_encoder": _Marker(marker), "lora_weights": {}}))
    try:
        for name, words in ((cut.name, "truncated"), (evil.name, "safetensors")):
            graph = graph_with(V2, sd15_checkpoint, photos, ("obama.jpg",) * 3,
                               PortraitBoothLoadModel={"portraitbooth_name": name})
            with pytest.raises(ComfyError) as info:
                run(server, graph)
            message = str(info.value)
            assert "PortraitBoothLoadModel" in message and name in message and words in message, message
        assert not marker.exists()
    finally:
        cut.unlink()
        evil.unlink()
