"""Captions for training: the BLIP captioner (a tiny random BLIP saved locally in the real
format, loaded the way a user's folder is), class words put into generated captions from
face attributes, CelebV-Text's descriptions and emotions on a stand-in folder in the
dataset's layout, and a settable class-word synonym table."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from training_fixtures import *  # noqa: F401,F403
from training_fixtures import build_settings

# A BERT word-piece vocabulary as BLIP's tokenizer has it ([DEC] starts a caption), cut down.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "with", "hat", "in", "suit",
         "red", "the", "close", "up", "guy", "person", "smiling", "arafed"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """A random BLIP captioning model saved with save_pretrained, as a user's folder would be."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    ids = {w: i for i, w in enumerate(VOCAB)}
    config = BlipConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=48, bos_token_id=ids["[DEC]"],
                         sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("captioner") / "blip-tiny"
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    tokenizer = BertTokenizer(vocab=ids, bos_token="[DEC]")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def finder():
    from training.build.captions import TokenFinder

    return TokenFinder()


def images(n: int) -> list[np.ndarray]:
    return [np.random.RandomState(i).randint(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(n)]


def force(captioner, word: str) -> None:
    """Make the random decoder write `word` at every step (its output bias dominates)."""
    import torch

    bias = captioner.model.text_decoder.cls.predictions.bias
    with torch.no_grad():
        bias.zero_()
        bias[VOCAB.index(word)] = 50.0


def test_blip_captioner_loads_a_local_folder_and_captions_in_batches(blip_dir):
    import torch

    from training.build.captioner import Captioner, load_captioner

    captioner = load_captioner(f"blip:{blip_dir}", device="cpu", batch_size=2, max_new_tokens=6)
    assert isinstance(captioner, Captioner) and captioner.name == "blip:blip-tiny"
    assert captioner.device.type == "cpu" and captioner.model.dtype == torch.float32  # fp16 only on a GPU
    pics = images(5)
    batched = captioner.caption(pics)
    assert len(batched) == 5 and all(isinstance(c, str) and c for c in batched)
    assert batched == [captioner.caption([p])[0] for p in pics]  # batching changes nothing
    force(captioner, "arafed")  # BLIP's web-alt-text noise word is dropped from what it writes
    assert captioner.caption(pics[:1]) == [""]


def test_generated_captions_name_the_subject_with_a_class_word(blip_dir, finder):
    from training.build.captioner import BlipCaptioner
    from training.build.captions import CaptionRequest, CaptionSources, caption_info

    captioner = BlipCaptioner(blip_dir, device="cpu", prompt="a photo of a", max_new_tokens=1, num_beams=1)
    sources = CaptionSources(captioner=captioner)
    pic = images(1)[0]

    def caption(word, gender=None, age=None, class_word="", sources=sources):
        force(captioner, word)
        raw = sources.resolve([CaptionRequest(f"/none/{word}.jpg", "x", pic, class_word, gender, age)])[0]
        assert raw.source == "captioner"
        return raw

    # The caption has a synonym: normalized as any caption, the face's gender is not needed.
    raw = caption("guy", gender="F")
    assert raw.text == "a photo of a guy"
    info = caption_info(raw.text, finder)
    assert (info.caption, info.identity_word, info.subject_word) == ("a photo of a man", "man", "guy")
    # "a person": the class word comes from the face's gender/age estimate (insightface: 1 male, 0 female).
    assert caption("person", gender="F", age=31).text == "a photo of a woman"
    raw = caption("person", gender=1, age=8.0)
    assert raw.text == "a photo of a boy"
    info = caption_info(raw.text, finder)
    assert (info.identity_word, info.subject_word) == ("man", "boy")
    # No word for a person at all: the class word leads the caption, inside the 77 tokens.
    raw = caption("hat", gender=0, age=40)
    assert raw.text == "a woman, a photo of a hat"
    assert caption_info(raw.text, finder).identity_positions == [2]
    # The person's class.txt wins over the estimate.
    assert caption("person", gender="M", age=40, class_word="woman").text == "a photo of a woman"
    # No estimate: the stated default, "person", is no class word of the default table: skipped, with the fix.
    raw = caption("hat")
    assert raw.error.startswith("captioner caption 'a photo of a hat' names no class word and the subject's word "
                                "'person' is not one of the class words (man, woman)")
    assert "--default-word" in raw.error and "--class-synonyms" in raw.error
    assert caption("hat", sources=CaptionSources(default_word="man", captioner=captioner)).text == \
        "a man, a photo of a hat"


def test_class_word_for_face_attributes_and_name_subject():
    from portraitbooth_core.vocabulary import class_word_for
    from training.build.captions import CaptionError, name_subject

    assert class_word_for("M", 30) == "man" and class_word_for(0, 8) == "girl"
    assert class_word_for("female", None) == "woman" and class_word_for(1, 17.9) == "boy"
    assert class_word_for(None, 30) == "person" and class_word_for("x", 30, "human") == "human"
    # A table without "boy" names the child with the class word it has.
    assert class_word_for(1, 8, synonyms={"man": ["man", "guy"]}) == "man"
    assert class_word_for(0, 30, "person", synonyms={"man": ["man"]}) == "person"

    assert name_subject("arafed man sitting on a bench", "woman") == "man sitting on a bench"
    assert name_subject("a close up of a person's face", "woman") == "a close up of a woman's face"
    assert name_subject("An individual smiling at the camera", "man") == "A man smiling at the camera"
    assert name_subject("a close up of someone smiling", "man") == "a close up of a man smiling"
    assert name_subject("a close up of a face with a beard", "man") == "a close up of a man with a beard"
    assert name_subject("", "woman") == "a photo of a woman"
    with pytest.raises(CaptionError):
        name_subject("a photo of a hat", "person")


def test_missing_or_incomplete_captioner_folder_is_a_clear_error(tmp_path, blip_dir):
    from training.build.captioner import CaptionerError, check_captioner_spec, load_captioner

    with pytest.raises(CaptionerError, match=f"captioner folder not found: {tmp_path / 'nope'}; put a BLIP"):
        load_captioner(f"blip:{tmp_path / 'nope'}")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(blip_dir / "config.json", partial / "config.json")
    with pytest.raises(CaptionerError, match=r"is incomplete: no weights, no image processor config, no tokenizer"):
        check_captioner_spec(f"blip:{partial}")
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(blip_dir / name, partial / name)
    (partial / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CaptionerError, match="no weights .pytorch_model.bin is not loaded: weights are read from "
                                             "safetensors only"):
        load_captioner(f"blip:{partial}")
    shutil.copy(blip_dir / "model.safetensors", partial / "model.safetensors")
    (partial / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CaptionerError, match="holds a 'vit' model, not BLIP"):
        load_captioner(f"blip:{partial}")
    with pytest.raises(CaptionerError, match="is not KIND:FOLDER with KIND one of blip"):
        load_captioner(str(blip_dir))


def test_class_synonyms_file_is_validated(tmp_path):
    from training.build.captions import ClassSynonymsError, load_class_synonyms

    good = tmp_path / "syn.json"
    good.write_text(json.dumps({"Man": ["guy", "Politician", "young man"], "woman": ["lady"], "child": []}))
    assert load_class_synonyms(good) == {"man": ["man", "guy", "politician", "young man"],
                                         "woman": ["woman", "lady"], "child": ["child"]}
    cases = {"missing": (None, "class-word synonyms file not found"),
             "bad.json": ("{not json", "is not valid JSON"),
             "list.json": (json.dumps(["man"]), "expected a non-empty object"),
             "str.json": (json.dumps({"man": "guy"}), "the synonyms of 'man' must be a list of strings"),
             "twice.json": (json.dumps({"man": ["kid"], "woman": ["kid"]}), "'kid' is listed under both 'man' and "
                                                                             "'woman'"),
             "space.json": (json.dumps({"young man": []}), "class word 'young man' must be one word"),
             "digits.json": (json.dumps({"man": ["guy2"]}), "synonym 'guy2' of 'man' must be letters")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ClassSynonymsError, match=message) as err:
            load_class_synonyms(path)
        assert str(path) in str(err.value) and '{"man": ["guy", "gentleman"]' in str(err.value)


# -- CelebV-Text ---------------------------------------------------------------------------
CLIP = "0-5BrmyFsYM_0"       # one emotion over the clip
CHANGING = "zYeLz4c4qYc_15_0"  # the emotion changes during the clip


def celebv_texts(root):
    """CelebV-Text's text layout: texts/<aspect>/<clip>.txt, one description per line (the
    colour-temperature folder as some copies unpack it, misspelt)."""
    files = {
        ("face40_details_new", CLIP): ["The gentleman has short black hair and a receding hairline. He is young.",
                                       "This man wears a suit and a tie, and he has gray hair."],
        ("emotion", CLIP): ["The man looks happy throughout the video.", "He is happy."],
        ("action_dur", CLIP): ["The man talks and then smiles."],
        ("light_colot_temp", CLIP): ["The light is warm."],
        ("emotion", CHANGING): ["She shows surprise at first, then contempt, and finally happiness."],
        ("light_dir", CHANGING): ["The light comes from the left."],
    }
    for (aspect, clip), lines in files.items():
        (root / "texts" / aspect).mkdir(parents=True, exist_ok=True)
        (root / "texts" / aspect / f"{clip}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_celebv_text_reader_on_a_stand_in_in_the_real_layout(tmp_path, finder):
    from training.build.captions import CaptionRequest, CaptionSources, caption_info
    from training.build.celebv_text import CelebVText, CelebVTextError, emotion_labels

    # Its 8 emotion categories, as its descriptions write them, become the pack's expression words.
    assert emotion_labels("neutral, happiness, sadness, anger, fear, surprise, contempt, disgust, anger") == \
        ["neutral", "happy", "sad", "angry", "fearful", "surprised", "contemptuous", "disgusted", "angry"]
    root = celebv_texts(tmp_path / "celebv")
    reader = CelebVText(root)
    assert set(reader.folders) == {"appearance", "emotion", "action", "light_direction", "light_color_temperature"}
    assert reader.emotions(CLIP) == ["happy"]
    assert reader.emotions(CHANGING) == ["surprised", "contemptuous", "happy"]
    # An appearance sentence (variant picked by the sample's name) + the emotion as the pack's word.
    captions = {reader.caption(CLIP, pick=f"clip#frame{n}") for n in range(12)}
    assert captions == {"The gentleman has short black hair and a receding hairline, looking happy",
                        "This man wears a suit and a tie, and he has gray hair, looking happy"}
    assert reader.caption(CLIP, pick="a") == reader.caption(CLIP, pick="a")  # the same on every run
    # A changing emotion: the label at the frame's place in the clip, none when that is unknown.
    assert reader.emotion_at(CHANGING) is None
    assert [reader.emotion_at(CHANGING, p) for p in (0.1, 0.5, 0.9)] == ["surprised", "contemptuous", "happy"]
    assert reader.caption(CHANGING, position=0.9) == "a photo of a person, looking happy"
    assert reader.caption(CHANGING) is None and reader.caption("no_such_clip") is None
    assert CelebVText(root, aspects=("appearance", "light_color_temperature")).caption(CLIP, pick="") == \
        "The gentleman has short black hair and a receding hairline, looking happy. The light is warm"

    # As a caption source: the class word normalized, the expression token found by ECAC's finder.
    sources = CaptionSources(source=f"celebv-text:{root}")
    raw = sources.resolve([CaptionRequest(root / "videos" / f"{CLIP}.mp4", f"{CLIP}.mp4#target0")])[0]
    info = caption_info(raw.text, finder)
    assert raw.source == "celebv-text" and info.identity_word == "man" and info.expression_words == ["happy"]
    # Only the emotion is known: "a person" takes the face's class word.
    raw = sources.resolve([CaptionRequest(f"{CHANGING}.mp4", "x", gender="F", age=25, position=0.05)])[0]
    info = caption_info(raw.text, finder)
    assert info.caption == "a photo of a woman, looking surprised" and info.expression_words == ["surprised"]
    # A file that is no clip of it falls through to the template.
    assert sources.resolve([CaptionRequest(tmp_path / "obama.jpg", "obama.jpg")])[0].source == "template"

    with pytest.raises(CelebVTextError, match="is not CelebV-Text's text layout: expected .*face40_details_new"):
        CelebVText(tmp_path)
    with pytest.raises(CelebVTextError, match="not celebv-text:DIR"):
        CaptionSources(source="celebv:x").source


def test_build_from_a_celebv_text_root_and_with_a_captioner(tmp_path, photos_dir, people_dir, train_encoder,
                                                            blip_dir):
    cv2 = pytest.importorskip("cv2")
    from training.build.builder import DatasetBuilder
    from training.build.captioner import BlipCaptioner
    from training.build.captions import load_class_synonyms
    from training.dataset.shards import ShardReader

    def metas(folder):
        reader = ShardReader(folder)
        return {m["source"]: m for m in (json.loads(reader.read(i)["json"]) for i in range(len(reader)))}

    # A CelebV-Text root is a source of people: each clip one person, captions from its texts.
    root = celebv_texts(tmp_path / "celebv")
    (root / "videos" / "celebvtext_6").mkdir(parents=True)
    writer = cv2.VideoWriter(str(root / "videos" / "celebvtext_6" / f"{CLIP}.avi"), cv2.VideoWriter_fourcc(*"MJPG"),
                             5, (320, 320))
    for name in ["obama.jpg"] * 3 + ["obama2.jpg"] * 3 + ["obama3.jpg"] * 3:
        writer.write(cv2.resize(cv2.imread(str(photos_dir / name)), (320, 320)))
    writer.release()
    report = DatasetBuilder(root, tmp_path / "out", train_encoder, build_settings(captions=f"celebv-text:{root}"),
                            progress=False).build()
    assert report["samples"] == 2 and report["people"] == 1 and not report["skipped"]
    clip = metas(tmp_path / "out")
    assert sorted(clip) == [f"videos/celebvtext_6/{CLIP}.avi#target{k}" for k in range(2)]
    for meta in clip.values():
        assert meta["caption_source"] == "celebv-text" and meta["expression_words"] == ["happy"]
        assert meta["identity_word"] == "man" and meta["caption"].endswith(", looking happy")

    # Photos without a sidecar captioned by BLIP; a synonym table of the user's own, recorded.
    src = tmp_path / "src"
    shutil.copytree(people_dir / "obama", src / "obama")
    (src / "obama" / "obama2.txt").unlink()
    synonyms = tmp_path / "syn.json"
    synonyms.write_text(json.dumps({"man": ["gentleman", "politician"]}))
    captioner = BlipCaptioner(blip_dir, device="cpu", prompt="a photo of a", max_new_tokens=1, num_beams=1)
    force(captioner, "person")
    settings = build_settings(synonyms=load_class_synonyms(synonyms))
    report = DatasetBuilder(src, tmp_path / "captioned", train_encoder, settings, progress=False,
                            captioner=captioner).build()
    assert report["samples"] == 3 and [s["file"] for s in report["skipped"]] == ["obama/corrupt.jpg"]
    photos = metas(tmp_path / "captioned")
    assert {k: (m["caption_source"], m["caption"]) for k, m in photos.items()} == {
        "obama/obama.jpg": ("sidecar", "a smiling man in a suit"),
        "obama/obama2.jpg": ("captioner", "a photo of a man"),   # "person" -> class.txt's "man"
        "obama/obama3.jpg": ("captioner", "a photo of a man")}   # the captioner before the template
    index = json.loads((tmp_path / "captioned" / "index.json").read_text())
    assert index["identity_words"] == ["man"] and index["class_synonyms"] == {"man": ["gentleman"]}
    assert index["build"]["synonyms"] == {"man": ["man", "gentleman", "politician"]}
    assert index["build"]["captioner"] == "blip:blip-tiny"


def test_build_command_rejects_a_bad_synonyms_file_or_captioner_folder(tmp_path, capsys):
    from training.__main__ import main

    bad = tmp_path / "syn.json"
    bad.write_text(json.dumps({"man": ["guy"], "woman": ["guy"]}))
    (tmp_path / "src").mkdir()
    assert main(["build", str(tmp_path / "src"), str(tmp_path / "out"), "--class-synonyms", str(bad)]) == 2
    assert "'guy' is listed under both 'man' and 'woman'" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "src"), str(tmp_path / "out"), "--captioner",
                 f"blip:{tmp_path / 'none'}"]) == 2
    assert f"captioner folder not found: {tmp_path / 'none'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is analyzed or written


def _many_captions(n: int) -> list[str]:
    """Varied captions: every class word and synonym, expression words of every emotion
    (also two-word ones and none), weights, and one subject pushed past the first chunk."""
    from portraitbooth_core.vocabulary import CLASS_WORDS, EMOTIONS

    subjects = [w for syns in CLASS_WORDS.values() for w in syns]
    feelings = [w for words in EMOTIONS.values() for w in words]
    out = []
    for i in range(n):
        who, how = subjects[i % len(subjects)], feelings[(7 * i) % len(feelings)]
        shapes = (f"a photo of a {who} {how} in a park",
                  f"A close up of a {how} {who}, then {feelings[(i + 3) % len(feelings)]}",
                  f"(a {who}:1.2) wearing a hat",
                  f"{'very ' * 80}tall {who} {how}")
        out.append(shapes[i % len(shapes)])
    return out


def _reference_positions(finder, caption: str, word: str):
    """TokenFinder.positions as it was before its matchers were cached: the core's finders,
    which build a new matcher on every call (the pack's inference path)."""
    from portraitbooth_core.ecac.expression_words import find_expression_tokens, find_word_tokens
    from training.build.captions import CHUNK, CaptionError

    chunks = finder.tokenize(caption, disable_weights=True)[:1]
    ident = [m.position for m in find_word_tokens(chunks, [word], finder.ids_of, finder.ends_word, finder.special)
             if m.position < CHUNK]
    if not ident:
        raise CaptionError(f"class word '{word}' is not within the first {CHUNK - 2} tokens of the caption")
    expr = [m for m in find_expression_tokens(chunks, finder.ids_of, finder.ends_word, finder.special)
            if m.position < CHUNK]
    return ident[:1], [m.word for m in expr], [m.position for m in expr]


def test_many_captions_build_each_word_matcher_once_with_unchanged_results(finder, monkeypatch):
    from portraitbooth_core.stea.class_words import ClassWordMatcher
    from portraitbooth_core.vocabulary import CLASS_WORDS
    from training.build.captions import CaptionError, TokenFinder, caption_info, normalize_class_word

    captions = _many_captions(48)
    expected = []
    for text in captions:
        caption, word, written = normalize_class_word(text)
        try:
            expected.append((caption, word, *_reference_positions(finder, caption, word), written))
        except CaptionError as exc:
            expected.append(str(exc))
    assert sum(isinstance(e, str) for e in expected) == 12  # the long captions: subject past the chunk
    assert sum(bool(e[3]) for e in expected if not isinstance(e, str)) >= 20  # expressions found

    built = []
    original = ClassWordMatcher.__init__

    def counting(self, words, *args, **kwargs):
        built.append(tuple(words))
        original(self, words, *args, **kwargs)

    monkeypatch.setattr(ClassWordMatcher, "__init__", counting)
    fresh = TokenFinder(finder._own_tokenizer)  # no matchers cached yet
    got = []
    for text in captions:
        try:
            info = caption_info(text, fresh)
            got.append((info.caption, info.identity_word, info.identity_positions, info.expression_words,
                        info.expression_positions, info.subject_word))
        except CaptionError as exc:
            got.append(str(exc))
    assert got == expected
    # One matcher for the expression vocabulary, one per identity word: not one per caption.
    assert len(built) == len(set(built)) == 1 + len(CLASS_WORDS), built
