"""The PortraitBooth entry of a CONDITIONING (nodes/contracts.py): Apply STEA writes
identity and expression positions, found with the model's own emotion words; ECAC and the
region sampler read them through the contract instead of re-tokenizing. A plain
CLIPTextEncode conditioning still works with ECAC, which then finds the words itself."""
from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch

from conftest import load_pack
from stea_fixtures import identity, model

TEXT = "a photo of an angry smiling man"  # <start> a photo of an angry smiling man: 5, 6, 7


@pytest.fixture(scope="module")
def pack():
    load_pack()
    return lambda name: importlib.import_module(f"portraitbooth_pack_under_test.nodes.{name}")


@pytest.fixture(scope="module")
def clip(sd15_parts):
    return sd15_parts[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pb")
    return {"all": model(folder, seed=0), "happy only": model(folder, seed=1, emotion_words=["happy"])}


@pytest.fixture(scope="module")
def stea(pack, clip):
    encode = pack("stea_encode").encode_with_identity
    return lambda pb, text=TEXT, **kw: encode(clip, text, [identity(1)], pb, **kw)


class NoTokenizingClip:
    """A CLIP that fails the test when anything tokenizes with it."""

    @property
    def tokenizer(self):
        raise AssertionError("ECAC re-tokenized the prompt although Apply STEA had found the words")

    def tokenize(self, *args, **kwargs):
        raise AssertionError("ECAC re-tokenized the prompt although Apply STEA had found the words")


def test_the_entry_is_plain_json_and_survives_comfyui_conditioning_copies(pack):
    import nodes as comfy_nodes

    contracts = pack("contracts")
    entry = contracts.STEAEntry(base="sd15", class_positions=(7, 12), expression_positions=(6,),
                                expression_words=("smiling",), emotion_words=("happy",))
    extra = contracts.write_stea({"pooled_output": None}, entry)
    stored = json.loads(json.dumps(extra[contracts.STEA_KEY]))  # ints and strings only
    assert contracts.STEAEntry.from_dict(stored) == entry
    conditioning = [[torch.zeros(1, 77, 768), extra]]
    ranged = comfy_nodes.ConditioningSetTimestepRange().set_range(conditioning, 0.2, 0.8)[0]
    assert contracts.read_stea(ranged) == entry and contracts.identity_item(ranged)[2] == entry
    assert contracts.read_stea([[torch.zeros(1, 77, 768), {"pooled_output": None}]]) is None
    assert contracts.read_stea(None) is None
    with pytest.raises(contracts.ConditioningContractError, match="not Apply STEA Conditioning's"):
        contracts.read_stea([[torch.zeros(1, 77, 768), {contracts.STEA_KEY: {"weight": 0.5}}]])


def test_apply_stea_records_expression_positions_found_with_the_model_emotion_words(pack, stea, models):
    read = pack("contracts").read_stea
    everything = read(stea(models["all"]))
    assert everything.class_positions == (7,)
    assert everything.expression_words == ("angry", "smiling") and everything.expression_positions == (5, 6)
    happy = read(stea(models["happy only"]))  # "happy" is a category: "smiling" is one of its words
    assert happy.class_positions == (7,) and happy.emotion_words == ("happy",)
    assert happy.expression_words == ("smiling",) and happy.expression_positions == (6,)
    # delayed identity: the entry rides on the identity range only
    ranged = stea(models["happy only"], start_percent=0.3)
    assert read(ranged) == happy and sum(pack("contracts").stea_of(e) is not None for _, e in ranged) == 1


@pytest.fixture
def control_calls(pack, monkeypatch):
    """The identity and expression positions the ECAC node hands to its control."""
    ecac = pack("ecac")
    calls, real = [], ecac.ExpressionControl

    def recording(identity, expression, *args, **kwargs):
        calls.append((list(identity), list(expression)))
        return real(identity, expression, *args, **kwargs)

    monkeypatch.setattr(ecac, "ExpressionControl", recording)
    return calls


def run_ecac(pack_nodes, tiny_model, clip, text, stea_conditioning=None):
    """The ECAC node at its defaults; returns its capture store (labels of the words it found)."""
    node = pack_nodes["PortraitBoothECACPatch"]
    patched = node.execute(tiny_model, clip, text, "man, woman", 1.0, 0.0, 0.6, 0.8, 0.1,
                           "16x16 layers (recommended)", True, None, stea_conditioning).args[0]
    return patched.model_options["portraitbooth_ecac"]


def test_ecac_reads_positions_from_a_stea_conditioning_without_tokenizing(pack_nodes, tiny_model, stea, models,
                                                                         control_calls):
    store = run_ecac(pack_nodes, tiny_model, NoTokenizingClip(), "text the node must not need",
                     stea(models["all"]))
    assert control_calls == [([7], [5, 6])]
    assert store.labels == ["identity", "angry", "smiling"]


def test_ecac_uses_the_model_emotion_list_so_a_happy_only_model_ignores_angry(pack_nodes, tiny_model, stea,
                                                                              models, control_calls):
    store = run_ecac(pack_nodes, tiny_model, NoTokenizingClip(), TEXT, stea(models["happy only"]))
    assert control_calls == [([7], [6])]  # "angry" (5) is not steered toward
    assert store.labels == ["identity", "smiling"]


def test_ecac_still_finds_the_words_itself_with_a_plain_clip_text_encode_conditioning(
        pack_nodes, tiny_model, clip, control_calls, caplog):
    import nodes as comfy_nodes

    plain = comfy_nodes.CLIPTextEncode().encode(clip, TEXT)[0]
    with caplog.at_level(logging.WARNING, logger="portraitbooth"):
        store = run_ecac(pack_nodes, tiny_model, clip, TEXT, plain)
    assert "no Apply STEA Conditioning output" in caplog.text
    unconnected = run_ecac(pack_nodes, tiny_model, clip, TEXT)
    assert control_calls == [([7], [5, 6])] * 2  # the whole vocabulary: angry and smiling
    assert store.labels == unconnected.labels == ["man", "angry", "smiling"]


def test_region_sampler_takes_identity_tokens_through_the_contract(pack, clip, models):
    rs, encode = pack("region_sampling"), pack("stea_encode").encode_with_identity
    glob = encode(clip, "a man and a man", [identity(1), identity(2)], models["all"])
    tensor, _extra, positions = rs.identity_entry(glob)
    assert positions == [(2,), (5,)] and tensor is glob[0][0]
