"""Generated data: balanced, seeded, statements decided correctly, prepared format readable, tokenizer round-trip."""

from __future__ import annotations

import random
import subprocess
import sys

import pandas as pd
import pytest

from vldistill.config import Nlvr2Data, PretrainData, SceneParams, SplitSizes
from vldistill.data import shapes
from vldistill.data.prepared import prepare, read_images, read_split
from vldistill.data.tokenizer import load as load_tokenizer, save as save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    cfg = Nlvr2Data(pairs=SplitSizes(train=1500, dev=50, test=50))
    stats = prepare("nlvr2", cfg, SceneParams(), 0, root, root / "nlvr2.json")
    return root, stats


def test_nlvr2_is_balanced_per_label_and_template(prepared):
    root, _ = prepared
    train = read_split(root, "nlvr2", "train")
    assert set(train.columns) >= {"text", "label", "label_name", "image_left", "image_right"}
    assert abs(train["label"].mean() - 0.5) < 0.05
    for template, group in train.groupby("template"):
        assert abs(group["label"].mean() - 0.5) < 0.1, template
    assert train["template"].nunique() == 5


def test_generation_is_deterministic(prepared, tmp_path):
    root, _ = prepared
    cfg = Nlvr2Data(pairs=SplitSizes(train=1500, dev=50, test=50))
    prepare("nlvr2", cfg, SceneParams(), 0, tmp_path, tmp_path / "nlvr2.json")
    pd.testing.assert_frame_equal(read_split(root, "nlvr2", "dev"), read_split(tmp_path, "nlvr2", "dev"))
    assert (read_images(root, "nlvr2") == read_images(tmp_path, "nlvr2")).all()


def test_images_are_48px_scenes(prepared):
    root, _ = prepared
    images = read_images(root, "nlvr2")
    assert images.shape[1:] == (48, 48, 3) and images.dtype.name == "uint8"
    assert images[:, 0, 0].max() == 0  # background is black in the corner (objects stay inside their cell)


def test_statement_truth_matches_scene():
    left = [shapes.Obj("circle", "red", 0, 0), shapes.Obj("square", "blue", 2, 2)]
    right = [shapes.Obj("circle", "red", 1, 1)]
    red_circle = shapes.Attr("red", "circle")
    assert shapes.TRUTH["both"](left, right, red_circle)
    assert shapes.TRUTH["more"](left, right, "left", shapes.Attr())
    assert shapes.TRUTH["at_least"](left, right, 2, red_circle)
    assert not shapes.TRUTH["at_least"](left, right, 3, red_circle)
    assert shapes.TRUTH["relation"](left, right, "left", red_circle, "above", shapes.Attr("blue", "square"))
    assert not shapes.TRUTH["relation"](left, right, "left", red_circle, "below", shapes.Attr("blue", "square"))


def test_captions_are_true_of_their_scene():
    rng = random.Random(1)
    for _ in range(200):
        scene = shapes.random_scene(rng, 3, 1, 4)
        text = shapes.caption(scene, 3, rng)
        assert any(f"{o.colour} {o.shape}" in text for o in scene) or "object" in text


def test_pretrain_and_tokenizer(tmp_path):
    cfg = PretrainData(images=SplitSizes(train=40, dev=5, test=5), captions_per_image=3)
    prepare("pretrain", cfg, SceneParams(), 0, tmp_path, tmp_path / "m.json")
    train = read_split(tmp_path, "pretrain", "train")
    assert train["image"].nunique() == 40 and len(train) >= 80
    tokenizer = train_tokenizer(train["text"], 500, 18)
    save_tokenizer(tokenizer, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    ids = again("there is a red circle")["input_ids"]
    assert ids[0] == again.cls_token_id and ids[-1] == again.sep_token_id
    assert again.decode(ids, skip_special_tokens=True) == "there is a red circle"


def test_tokenizer_is_the_same_in_every_process(tmp_path):
    """The vocabulary is a function of the texts: two fresh interpreters write byte-identical tokenizer files
    (tokenizers' WordPieceTrainer did not: its ties follow hash-map order, which differs per process)."""
    texts = [f"there is a {c} {s} left of {n} {c2} objects" for c in ("red", "blue", "green") for s in
             ("circle", "square", "triangle") for n in ("two", "three") for c2 in ("grey", "yellow")]
    script = ("import sys; from vldistill.data.tokenizer import train_tokenizer, save; "
              f"save(train_tokenizer({texts!r}, 60, 18), sys.argv[1])")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True, timeout=120)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert not list(tmp_path.glob(".*tmpdir")), "the save goes through a temporary directory that is renamed"


def test_wordpiece_vocab_holds_specials_alphabet_then_frequent_words():
    from vldistill.data.tokenizer import SPECIAL, wordpiece_vocab

    vocab = wordpiece_vocab(["Red ball, red box.", "a red ball"], 100)
    alphabet = sorted(set("redballbox,.a"))
    assert list(vocab) == [*SPECIAL, *alphabet, *(f"##{c}" for c in alphabet), "red", "ball", "box"]
    assert list(vocab.values()) == list(range(len(vocab)))
    cut = wordpiece_vocab(["Red ball, red box.", "a red ball"], len(SPECIAL) + 2 * len(alphabet) + 1)
    assert list(cut)[-1] == "red"  # the most frequent word only
    spelt = train_tokenizer(["Red ball, red box.", "a red ball"], len(cut), 18)
    assert spelt.tokenize("red boxa") == ["red", "b", "##o", "##x", "##a"]  # a word left out is spelt
    with pytest.raises(ValueError, match=r"^tokenizer.vocab_size=10: must be at least \d+"):
        wordpiece_vocab(["a red ball"], 10)


def test_pretrained_tokenizer_from_a_local_directory(tmp_path):
    from vldistill.data.tokenizer import from_pretrained

    trained = train_tokenizer(["a red circle", "two blue squares"], 100, 18)
    save_tokenizer(trained, tmp_path / "bert-like")
    loaded = from_pretrained(str(tmp_path / "bert-like"), 40)
    assert loaded.model_max_length == 40
    assert loaded("a red circle")["input_ids"] == trained("a red circle")["input_ids"]
