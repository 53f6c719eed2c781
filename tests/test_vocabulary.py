"""One vocabulary: class words, their synonyms and the emotion words come from
portraitbooth_core.vocabulary for captions, Apply STEA, ECAC, export and the README; a
model trained on captions that say "boy" or "lady" records and accepts those words."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import REPO
from stea_fixtures import identity, write_model
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import build_settings, train_config
from portraitbooth_core.vocabulary import (CLASS_WORDS, DEFAULT_CLASS_WORDS, DEFAULT_EMOTION_WORDS, EMOTIONS,
                                          class_of, expression_words)


def readme_table(header: str) -> dict[str, list[str]]:
    """{first cell: the words of the second cell} of the README table under `header`."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(header) + 2  # header row, separator row
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        first, words = [c.strip() for c in line.strip("|").split("|")]
        rows[first] = [w.strip() for w in words.split(",") if w.strip()]
    return rows


def test_readme_word_tables_match_the_vocabulary_module():
    assert readme_table("| class word | synonyms in captions |") == {k: list(v[1:]) for k, v in CLASS_WORDS.items()}
    emotions = readme_table("| emotion | other words for it |")
    assert emotions == {k: list(v[1:]) for k, v in EMOTIONS.items()} and len(emotions) == 11
    words = re.search(r"A file\s+without a list accepts ([a-z, ]+?) \(", (REPO / "README.md").read_text())
    assert words and tuple(w.strip() for w in words.group(1).split(",")) == DEFAULT_CLASS_WORDS


def test_captions_weight_files_and_the_ecac_node_take_their_words_from_the_vocabulary(pack_nodes):
    from training.build.settings import BuildSettings
    from training.build.captions import normalize_class_word
    from portraitbooth_core.weights.meta import PortraitBoothInfo

    assert BuildSettings().synonyms == {k: list(v) for k, v in CLASS_WORDS.items()}
    for word, synonyms in CLASS_WORDS.items():
        for synonym in synonyms:
            caption = f"a photo of a {synonym.capitalize()} at the beach"
            assert normalize_class_word(caption) == (f"a photo of a {word} at the beach", word, synonym)
            assert class_of(synonym) == word
    fields = PortraitBoothInfo.__dataclass_fields__
    assert fields["class_words"].default == DEFAULT_CLASS_WORDS
    assert fields["emotion_words"].default == DEFAULT_EMOTION_WORDS == tuple(EMOTIONS)
    schema = pack_nodes["PortraitBoothECACPatch"].define_schema()
    default = next(i for i in schema.inputs if i.id == "identity_words").default
    assert [w.strip() for w in default.split(",")] == list(DEFAULT_CLASS_WORDS)


def test_a_model_emotion_list_names_categories_or_single_words():
    assert set(expression_words(["happy"])) == set(EMOTIONS["happy"])
    assert expression_words(["Sad", "pensive"]) == (*EMOTIONS["sad"], "pensive")
    everything = expression_words(DEFAULT_EMOTION_WORDS)
    assert expression_words(None) == expression_words(()) and set(everything) == set(expression_words(None))
    assert len(everything) == sum(len(w) for w in EMOTIONS.values())


# -- a dataset whose captions say "boy" and "lady" -------------------------------------

def test_the_index_records_which_synonyms_the_captions_used(dataset_dir):
    index = json.loads((dataset_dir / "index.json").read_text())
    # "a smiling gentleman in a suit" and "portrait of a happy guy": normalized to "man", recorded as written
    assert index["identity_words"] == ["man", "woman"]
    assert index["class_synonyms"] == {"man": ["gentleman", "guy"]}


@pytest.fixture(scope="module")
def boy_lady_dataset(tmp_path_factory, people_dir, train_encoder):
    from training.build.builder import DatasetBuilder

    src = tmp_path_factory.mktemp("boy_lady")
    shutil.copytree(people_dir / "obama", src / "obama")
    (src / "obama" / "obama.txt").write_text("a smiling Boy in a suit")
    (src / "obama" / "obama2.txt").write_text("a photo of a lady")
    out = src / "dataset"  # obama3.jpg keeps the template caption "a photo of a man"
    report = DatasetBuilder(src, out, train_encoder, build_settings(), progress=False).build()
    assert report["samples"] == 3, report
    return out


def test_a_dataset_captioned_boy_and_lady_exports_those_words(boy_lady_dataset, sd15_checkpoint, tmp_path):
    from training.run.trainer import Trainer
    from portraitbooth_core.weights.file import load_portraitbooth

    index = json.loads((boy_lady_dataset / "index.json").read_text())
    assert index["identity_words"] == ["man", "woman"]
    assert index["class_synonyms"] == {"man": ["boy"], "woman": ["lady"]}
    t = Trainer(train_config(boy_lady_dataset, tmp_path, mode="frozen", steps=1))
    try:
        path = t.run()
    finally:
        t.close()
    info = load_portraitbooth(path).info
    assert info.class_words == ("man", "woman")  # what the model learned: captions were normalized
    assert info.class_synonyms == {"man": ("boy",), "woman": ("lady",)}
    assert info.accepted_words == ("man", "woman", "boy", "lady")


@pytest.fixture(scope="module")
def apply_stea(pack_nodes, sd15_parts):
    node, clip = pack_nodes["PortraitBoothApplySTEA"], sd15_parts[1]
    return lambda pb, text: node.execute(clip, pb, identity(1), text, "", 0, 1.0, 0.0, 1.0).args[0]


def test_apply_stea_accepts_a_photo_of_a_boy_with_a_model_whose_captions_said_boy(apply_stea, tmp_path):
    from training.run.export import class_words
    from portraitbooth_core.stea.class_words import ClassWordError
    from portraitbooth_core.weights.file import load_portraitbooth

    index = {"identity_words": ["man", "woman"], "class_synonyms": {"man": ["boy"], "woman": ["lady"]}}
    words, synonyms = class_words(index)  # what training.export writes for this dataset
    boy = load_portraitbooth(write_model(tmp_path / "boy.safetensors", class_words=words, class_synonyms=synonyms))
    out = apply_stea(boy, "a photo of a boy")
    positions = out[0][1]["portraitbooth"]["class_positions"]
    assert positions == [5]  # <start> a photo of a boy
    plain = load_portraitbooth(write_model(tmp_path / "plain.safetensors", class_words=words))
    with pytest.raises(ClassWordError, match="man, woman"):
        apply_stea(plain, "a photo of a boy")
