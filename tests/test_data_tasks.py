"""Every embedded task: SNLI-VE by determinability, retrieval captions, easy-VQA, VQA answer processing, the
example figures, and a text-only baseline that must stay near the majority class on the generated tasks."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from vldistill.config import Nlvr2Data, RetrievalData, SceneParams, SnliVeData, SplitSizes, VqaData
from vldistill.data import shapes, vqa_answers
from vldistill.data.prepared import prepare, read_split
from vldistill.data.show import draw_examples

O = shapes.Obj


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    prepare("snli_ve", SnliVeData(pairs=SplitSizes(train=3000, dev=60, test=900)), SceneParams(), 0, root, root / "s.json")
    prepare("nlvr2", Nlvr2Data(pairs=SplitSizes(train=3000, dev=60, test=900)), SceneParams(), 0, root, root / "n.json")
    prepare("retrieval", RetrievalData(images=SplitSizes(train=50, dev=20, test=20)), SceneParams(), 0, root,
            root / "r.json")
    return root


def test_determinability_labels():
    red_circle, blue_square = shapes.Attr("red", "circle"), shapes.Attr("blue", "square")
    visible = [O("circle", "red", 0, 0)]
    exists = lambda attr: shapes.Hypothesis("exists", "", (attr,))  # noqa: E731
    assert shapes.entailment_label(exists(red_circle), visible, [4], 3) == "entailment"
    assert shapes.entailment_label(exists(blue_square), visible, [4], 3) == "neutral"
    assert shapes.entailment_label(exists(blue_square), visible, [], 3) == "contradiction"
    at_most_one = shapes.Hypothesis("at_most", "", (1, shapes.Attr()))
    assert shapes.entailment_label(at_most_one, visible, [4], 3) == "neutral"
    assert shapes.entailment_label(at_most_one, visible + [O("square", "blue", 2, 2)], [], 3) == "contradiction"
    above = shapes.Hypothesis("relation", "", (red_circle, "above", blue_square))
    assert shapes.entailment_label(above, visible, [8], 3) == "neutral"  # a blue square may hide below
    assert shapes.entailment_label(above, visible, [], 3) == "contradiction"


def test_count_fast_path_equals_enumeration():
    rng = random.Random(1)
    for _ in range(300):
        hyp = shapes.random_hypothesis(rng.choice(["exists", "at_least", "at_most"]), rng, 4)
        scene = shapes.random_scene(rng, 3, 1, 4)
        covered = sorted(rng.sample(range(9), rng.randint(0, 2)))
        visible = [o for o in scene if o.row * 3 + o.col not in covered]
        truths = {hyp.truth(s) for s in shapes.completions(visible, covered, 3)}
        expected = "entailment" if truths == {True} else "contradiction" if truths == {False} else "neutral"
        assert shapes.entailment_label(hyp, visible, covered, 3) == expected


def test_snli_ve_balanced_per_label_and_template(root):
    train = read_split(root, "snli_ve", "train")
    shares = train["label_name"].value_counts(normalize=True)
    assert set(shares.index) == set(shapes.SNLI_LABELS) and (abs(shares - 1 / 3) < 0.04).all()
    for template, group in train.groupby("template"):
        assert (abs(group["label_name"].value_counts(normalize=True) - 1 / 3) < 0.08).all(), template


def test_retrieval_captions_and_image_level_splits(root):
    frames = {s: read_split(root, "retrieval", s) for s in ("train", "dev", "test")}
    for frame in frames.values():
        per_image = frame.groupby("image")["text"].agg(list)
        assert all(len(c) == 5 and len(set(c)) == 5 for c in per_image)
    images = [set(f["image"]) for f in frames.values()]
    assert not (images[0] & images[1] or images[0] & images[2] or images[1] & images[2])


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"), ("The cat's toy", "cat's toy"), ("dont know", "don't know"), ("yes!", "yes"),
    ("1,000", "1000"), ("A red-ish car", "red ish car"), ("  Ten  ", "10"),
])
def test_vqa_answer_normalisation(raw, expected):
    assert vqa_answers.normalize_answer(raw) == expected


def test_vqa_soft_scores_and_vocabulary():
    scores = vqa_answers.answer_scores(["red"] * 3 + ["Blue", "blue."] + ["green"] + ["two", "2", "2", "Two."])
    assert scores == {"red": 0.9, "blue": 0.6, "green": 0.3, "2": 1.0}
    assert vqa_answers.vocabulary([["a", "b"], ["a"], ["a", "c"], ["b"]], min_freq=2) == ["a", "b"]


def test_easy_vqa_prepared_as_vilt_does(tmp_path):
    stats = prepare("vqa", VqaData(holdout_images=400), SceneParams(), 0, tmp_path, tmp_path / "v.json")
    counts = {s: v["examples"] for s, v in stats["splits"].items()}
    assert counts["train"] + counts["dev"] == 38575 and counts["test"] == 9673
    assert stats["answer_vocabulary"] == 13
    dev = read_split(tmp_path, "vqa", "dev")
    train = read_split(tmp_path, "vqa", "train")
    assert set(dev["image_id"]).isdisjoint(set(train["image_id"])) and dev["image_id"].nunique() == 400
    assert all(list(s) == [1.0] for s in train["scores"][:100])


def _bag_of_words_accuracy(train, test) -> float:
    """A text-only baseline: logistic regression on word counts (a model that never sees the image)."""
    vocab = {w: i for i, w in enumerate(sorted({w for t in train["text"] for w in t.split()}))}

    def features(texts):
        x = torch.zeros(len(texts), len(vocab))
        for i, text in enumerate(texts):
            for word in text.split():
                if word in vocab:
                    x[i, vocab[word]] += 1
        return x

    x, y = features(train["text"]), torch.as_tensor(train["label"].to_numpy().copy())
    model = torch.nn.Linear(len(vocab), int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    torch.manual_seed(0)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pred = model(features(test["text"])).argmax(dim=1)
    return float((pred == torch.as_tensor(test["label"].to_numpy().copy())).float().mean())


@pytest.mark.parametrize("task", ["nlvr2", "snli_ve"])
def test_text_only_baseline_stays_near_majority(root, task):
    train, test = read_split(root, task, "train"), read_split(root, task, "test")
    majority = Counter(test["label"]).most_common(1)[0][1] / len(test)
    accuracy = _bag_of_words_accuracy(train, test)
    assert accuracy <= majority + 0.05, (accuracy, majority)


@pytest.mark.parametrize("task", ["nlvr2", "snli_ve", "retrieval"])
def test_example_figures(root, tmp_path, task):
    out = draw_examples(root, task, "train", 8, tmp_path / f"{task}.png")
    assert out.stat().st_size > 10_000
