"""One photo + a prompt -> an identity-conditioned image, through the real ComfyUI.

Everything is a stand-in in a real format: the random SD1.5 checkpoint, an insightface
pack whose ArcFace is a small random ONNX, and a PortraitBooth file the test writes;
the photos are real and found by the shipped RetinaFace.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headless.client import ComfyError
from standins.sd15 import build_portraitbooth_file
from headless.workflows import load_api_workflow, with_inputs
from conftest import started_server
from face_fixtures import insightface_root  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # own server with an insightface pack: ~25 s

PACK = "standin_r50"
WEIGHTS = "portraitbooth_standin.safetensors"

# A test-only node pack beside ours: ComfyUI has no node that writes a CONDITIONING to disk,
# and comparing conditionings bit for bit needs the tensors themselves.
PROBE_INIT = '''
import json
import os

import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from safetensors.torch import save_file


class SaveConditioningProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PBTestSaveConditioning", display_name="Save conditioning (test probe)",
                         category="testing", inputs=[io.Conditioning.Input("conditioning"),
                                                     io.String.Input("name", default="cond")],
                         outputs=[], is_output_node=True)

    @classmethod
    def execute(cls, conditioning, name):
        tensors, extras = {}, []
        for i, (cond, extra) in enumerate(conditioning):
            tensors[f"{i}.cond"] = cond.detach().cpu().contiguous()
            plain = {}
            for key, value in extra.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
                else:
                    plain[key] = value
            extras.append(plain)
        path = os.path.join(folder_paths.get_output_directory(), name + ".safetensors")
        save_file(tensors, path, metadata={"extras": json.dumps(extras, default=repr, sort_keys=True)})
        return io.NodeOutput(ui={"text": [os.path.basename(path)]})


class Extension(ComfyExtension):
    async def get_node_list(self):
        return [SaveConditioningProbe]


async def comfy_entrypoint():
    return Extension()
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory, insightface_root, sd15_checkpoint):  # noqa: F811
    weights = tmp_path_factory.mktemp("portraitbooth")
    build_portraitbooth_file(weights / WEIGHTS, face_kind=f"arcface:{PACK}/w600k_r50.onnx", face_dim=512)
    probes = tmp_path_factory.mktemp("probe_packs")
    (probes / "PortraitBoothTestProbe").mkdir()
    (probes / "PortraitBoothTestProbe" / "__init__.py").write_text(PROBE_INIT)
    server = started_server(tmp_path_factory.mktemp("comfy-identity"),
                            extra_model_paths={"insightface": str(insightface_root),
                                               "portraitbooth": str(weights),
                                               "portraitbooth_identities": str(tmp_path_factory.mktemp("ids"))},
                            custom_node_dirs=[probes])
    yield server
    server.stop()


def portrait(server, photo_name, checkpoint, prompt="a photo of a man, portrait", seed=1, **changes):
    graph = with_inputs(load_api_workflow("portraitbooth_single_subject"), {
        "1": {"ckpt_name": checkpoint},
        "2": {"portraitbooth_name": WEIGHTS},
        "3": {"image": photo_name},
        "4": {"pack": PACK, "detector": "retinaface (zero-download)", "recognizer": "arcface (pack)"},
        "6": {"text": prompt},
        "8": {"width": 64, "height": 64},
        "9": {"seed": seed, "steps": 2},
        **changes,
    })
    result = server.client.run(graph, timeout=300)
    (file,) = result.images("11")
    return np.asarray(Image.open(io.BytesIO(server.client.fetch(file))).convert("RGB"), dtype=np.int16)


def test_single_subject_workflow_makes_an_image_that_follows_the_face(server, photos_dir, sd15_checkpoint):
    obama = server.client.upload_image(photos_dir / "obama.jpg")
    biden = server.client.upload_image(photos_dir / "biden.jpg")

    first = portrait(server, obama, sd15_checkpoint)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(portrait(server, obama, sd15_checkpoint), first), "same face, same seed: same image"
    other = portrait(server, biden, sd15_checkpoint)
    assert np.abs(other - first).mean() > 0.2, "a different face must change the image"


def test_a_prompt_without_the_class_word_is_refused_with_the_accepted_words(server, photos_dir, sd15_checkpoint):
    obama = server.client.upload_image(photos_dir / "obama.jpg")
    with pytest.raises(ComfyError) as info:
        portrait(server, obama, sd15_checkpoint, prompt="a photo of a dog on a beach")
    message = str(info.value)
    assert "PortraitBoothApplySTEA" in message and "man" in message and "woman" in message, message


def test_weights_for_another_face_encoder_are_refused(server, photos_dir, sd15_checkpoint):
    # The file was trained on 512-d ArcFace; the zero-download dlib gives 128-d.
    obama = server.client.upload_image(photos_dir / "obama.jpg")
    with pytest.raises(ComfyError) as info:
        portrait(server, obama, sd15_checkpoint,
                 **{"4": {"pack": "none (zero-download RetinaFace)", "recognizer": "dlib (zero-download)"}})
    message = str(info.value)
    assert "128" in message and "512" in message, message


def _conditioning(server, file_name: str) -> tuple[dict, list]:
    from safetensors import safe_open

    with safe_open(str(server.output_dir / file_name), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["extras"])


def test_identity_file_round_trips_through_the_server_to_bit_identical_conditioning(server, photos_dir,
                                                                                   sd15_checkpoint):
    """Analyse a photo and save the identity in one prompt; load it in a second prompt: Apply
    STEA gives the very same CONDITIONING (tensors bit for bit, and the PortraitBooth entry)."""
    import torch

    obama = server.client.upload_image(photos_dir / "obama.jpg")
    name = f"obama_{os.getpid()}"
    folder = Path(server.extra_model_paths["portraitbooth_identities"]).resolve()
    models = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}},
              "2": {"class_type": "PortraitBoothLoadModel",
                    "inputs": {"model": ["1", 0], "portraitbooth_name": WEIGHTS, "strength": 1.0}}}

    def stea(face, probe_name):
        return {"6": {"class_type": "PortraitBoothApplySTEA",
                      "inputs": {"clip": ["1", 1], "projector": ["2", 1], "face": face,
                                 "text": "a photo of a man, portrait", "class_word": "", "occurrence": 0,
                                 "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
                "8": {"class_type": "PBTestSaveConditioning", "inputs": {"conditioning": ["6", 0], "name": probe_name}}}

    analyse = {
        "3": {"class_type": "LoadImage", "inputs": {"image": obama}},
        "4": {"class_type": "PortraitBoothLoadFaceEncoder",
              "inputs": {"pack": PACK, "detector": "retinaface (zero-download)", "recognizer": "arcface (pack)",
                         "provider": "cpu", "det_size": 640, "mask_ears": False, "mask_hair": False,
                         "mask_neck": False}},
        "5": {"class_type": "PortraitBoothAnalyzeFaces",
              "inputs": {"face_encoder": ["4", 0], "images": ["3", 0], "select": "largest", "face_index": 0,
                         "on_no_face": "error", "det_threshold": 0.6}},
        "7": {"class_type": "PortraitBoothSaveIdentity",
              "inputs": {"face_embedding": ["5", 0], "identity_name": name, "overwrite": False,
                         "per_photo_embeddings": True}},
    }
    first = server.client.run({**models, **analyse, **stea(["5", 0], "direct")}, timeout=300)
    saved = folder / f"{name}.safetensors"
    assert first.texts("7") == [f"saved: {saved}"] and saved.is_file()

    listed = json.dumps(server.client.object_info("PortraitBoothLoadIdentity"))
    assert f"{name}.safetensors" in listed, "Load Identity lists the new file"
    load = {"13": {"class_type": "PortraitBoothLoadIdentity", "inputs": {"identity_name": f"{name}.safetensors"}}}
    second = server.client.run({**models, **load, **stea(["13", 0], "loaded")}, timeout=300)
    assert second.texts("8") == ["loaded.safetensors"]

    direct, direct_extras = _conditioning(server, "direct.safetensors")
    loaded, loaded_extras = _conditioning(server, "loaded.safetensors")
    assert any("portraitbooth" in extra for extra in direct_extras), "Apply STEA placed the identity"
    assert sorted(direct) == sorted(loaded) and direct_extras == loaded_extras
    different = [k for k in direct if direct[k].dtype != loaded[k].dtype or not torch.equal(direct[k], loaded[k])]
    assert not different, f"conditioning differs after the identity file round trip: {different}"

    # Queuing the saving graph again is not an error: the file already holds this identity.
    again = server.client.run({**models, **analyse, **stea(["5", 0], "direct")}, timeout=300)
    assert again.texts("7") in ([], [f"unchanged (already saved): {saved}"])
