"""Generated scenes: a few coloured shapes on a coarse grid, and the statements and captions drawn about them.

A scene is a list of :class:`Obj` (shape, colour, row, col), at most one object per grid cell. With the default grid
of 3×3 cells of 16 px, an image is 48×48 and one cell is exactly one ViLT patch at patch size 16.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    row: int
    col: int


Scene = list[Obj]


@dataclass(frozen=True)
class Attr:
    """A description that an object may match: a shape, a colour, both, or any object (both None)."""

    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: Obj) -> bool:
        return (self.colour is None or obj.colour == self.colour) and (self.shape is None or obj.shape == self.shape)

    def singular(self) -> str:
        """'a red circle', 'a circle', 'a red object', 'an object'."""
        noun = " ".join(p for p in (self.colour, self.shape or "object") if p)
        return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"

    def plural(self) -> str:
        """'red circles', 'circles', 'red objects', 'objects'."""
        return " ".join(p for p in (self.colour, (self.shape or "object") + "s") if p)

    def counted(self, n: int) -> str:
        """'one red circle', 'two circles', ... (singular noun for one)."""
        noun = self.plural() if n != 1 else " ".join(p for p in (self.colour, self.shape or "object") if p)
        return f"{NUMBER_WORDS[n]} {noun}"


def count(scene: Scene, attr: Attr) -> int:
    return sum(attr.matches(o) for o in scene)


def random_attr(rng: random.Random, allow_any: bool = True) -> Attr:
    """Draw an attribute: shape, colour or colour+shape (and 'objects' when ``allow_any``), uniformly by kind."""
    kinds = ["shape", "colour", "both"] + (["any"] if allow_any else [])
    kind = rng.choice(kinds)
    colour = rng.choice(list(COLOURS)) if kind in ("colour", "both") else None
    shape = rng.choice(SHAPES) if kind in ("shape", "both") else None
    return Attr(colour=colour, shape=shape)


def random_scene(rng: random.Random, grid: int, min_objects: int, max_objects: int) -> Scene:
    """Uniform number of objects in ``[min_objects, max_objects]``, each in its own random cell."""
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(grid * grid), n)
    return [Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), c // grid, c % grid) for c in cells]


def render(scene: Scene, grid: int, cell: int, jitter: float, rng: random.Random) -> np.ndarray:
    """Draw a scene on a black background. Returns ``(H, W, 3)`` uint8 with ``H = W = grid * cell``."""
    size = grid * cell
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for obj in scene:
        base = COLOURS[obj.colour]
        colour = tuple(int(np.clip(c * (1 + rng.uniform(-jitter, jitter)), 0, 255)) for c in base)
        half = cell * (0.38 + rng.uniform(-jitter, jitter) * 0.5)
        cx, cy = obj.col * cell + cell / 2, obj.row * cell + cell / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return np.asarray(image, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------- captions
POSITIONS_ROW = {0: "top", 1: "middle", 2: "bottom"}
POSITIONS_COL = {0: "left", 1: "center", 2: "right"}


def _position(obj: Obj, grid: int) -> str | None:
    """'top left' etc. on a 3×3 grid; None on other grids (no natural words)."""
    if grid != 3:
        return None
    return f"{POSITIONS_ROW[obj.row]} {POSITIONS_COL[obj.col]}"


def relation(a: Obj, b: Obj) -> list[str]:
    """Every spatial word true of ``a`` relative to ``b``: 'above', 'below', 'left of', 'right of'."""
    words = []
    if a.row < b.row:
        words.append("above")
    if a.row > b.row:
        words.append("below")
    if a.col < b.col:
        words.append("left of")
    if a.col > b.col:
        words.append("right of")
    return words


def caption(scene: Scene, grid: int, rng: random.Random) -> str:
    """One true caption of ``scene``, from several templates (object, count, relation, position, list)."""
    obj = rng.choice(scene)
    kinds = ["object", "count", "list", "colour_count"]
    if len(scene) >= 2:
        kinds.append("relation")
    if grid == 3:
        kinds.append("position")
    kind = rng.choice(kinds)
    if kind == "object":
        return f"there is {Attr(obj.colour, obj.shape).singular()}"
    if kind == "count":
        n = len(scene)
        return f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n > 1 else ''}"
    if kind == "colour_count":
        n = count(scene, Attr(colour=obj.colour))
        return f"{NUMBER_WORDS[n]} {obj.colour} object{'s' if n > 1 else ''}"
    if kind == "list":
        names = [f"{o.colour} {o.shape}" for o in sorted(scene, key=lambda o: (o.row, o.col))]
        return "a " + (" and a ".join(names))
    if kind == "position":
        return f"{Attr(obj.colour, obj.shape).singular()} at the {_position(obj, grid)}"
    a, b = rng.sample(scene, 2)
    word = rng.choice(relation(a, b))
    return f"{Attr(a.colour, a.shape).singular()} {word} {Attr(b.colour, b.shape).singular()}"


# ------------------------------------------------------------------------------------------- NLVR2 statements
@dataclass(frozen=True)
class Statement:
    """A statement about a pair of scenes: ``text`` and the function that decides it."""

    template: str
    text: str
    args: tuple

    def truth(self, left: Scene, right: Scene) -> bool:
        return TRUTH[self.template](left, right, *self.args)


def _contains(left, right, side, attr):
    return count(left if side == "left" else right, attr) > 0


def _both(left, right, attr):
    return count(left, attr) > 0 and count(right, attr) > 0


def _more(left, right, first, attr):
    a, b = (left, right) if first == "left" else (right, left)
    return count(a, attr) > count(b, attr)


def _fewer(left, right, first, attr):
    a, b = (left, right) if first == "left" else (right, left)
    return count(a, attr) < count(b, attr)


def _at_least(left, right, n, attr):
    return count(left, attr) + count(right, attr) >= n


def _exactly(left, right, n, attr):
    return count(left, attr) + count(right, attr) == n


def _neither(left, right, attr):
    return count(left, attr) == 0 and count(right, attr) == 0


def _exactly_one(left, right, attr):
    return (count(left, attr) > 0) != (count(right, attr) > 0)


def _relation(left, right, side, a, word, b):
    scene = left if side == "left" else right
    return any(word in relation(x, y) for x in scene if a.matches(x) for y in scene if b.matches(y) and y != x)


TRUTH = {
    "contains": _contains, "both": _both, "more": _more, "at_least": _at_least, "relation": _relation,
    "neither": _neither, "exactly_one": _exactly_one, "fewer": _fewer, "exactly": _exactly,
}


def random_statement(template: str, rng: random.Random, max_objects: int) -> Statement:
    """Draw the words of one statement of ``template`` (its truth is decided later against a pair of scenes)."""
    side = rng.choice(["left", "right"])
    if template == "contains":
        attr = random_attr(rng, allow_any=False)
        return Statement(template, f"the {side} image contains {attr.singular()}", (side, attr))
    if template == "both":
        attr = random_attr(rng, allow_any=False)
        return Statement(template, f"both images contain {attr.singular()}", (attr,))
    if template in ("more", "fewer"):
        attr = random_attr(rng)
        other = "right" if side == "left" else "left"
        return Statement(template, f"the {side} image has {template} {attr.plural()} than the {other} image", (side, attr))
    if template in ("at_least", "exactly"):
        attr = random_attr(rng)
        top = max_objects + 1 if attr == Attr() else max(3, max_objects // 2 + 1)
        n = rng.randint(2, top)
        words = "at least" if template == "at_least" else "exactly"
        return Statement(template, f"there are {words} {attr.counted(n)} in total", (n, attr))
    if template == "relation":
        a, b = random_attr(rng, allow_any=False), random_attr(rng, allow_any=False)
        word = rng.choice(["above", "below", "left of", "right of"])
        return Statement(template, f"the {side} image contains {a.singular()} {word} {b.singular()}", (side, a, word, b))
    if template == "neither":
        attr = random_attr(rng, allow_any=False)
        return Statement(template, f"neither image contains {attr.singular()}", (attr,))
    if template == "exactly_one":
        attr = random_attr(rng, allow_any=False)
        return Statement(template, f"exactly one image contains {attr.singular()}", (attr,))
    raise ValueError(f"unknown nlvr2 template {template!r}")


def nlvr2_example(
    rng: random.Random, templates: list[str], grid: int, min_objects: int, max_objects: int, max_tries: int = 400
) -> tuple[Statement, Scene, Scene, bool]:
    """One balanced example: draw the template and the target label first, then the statement, then re-sample
    PAIRS OF SCENES until the statement's truth equals the label (re-drawing statements for fixed scenes would let
    a text-only model learn which statements tend to be true). Returns ``(statement, left, right, label)``."""
    template = rng.choice(templates)
    label = rng.random() < 0.5
    while True:
        statement = random_statement(template, rng, max_objects)
        for _ in range(max_tries):
            left = random_scene(rng, grid, min_objects, max_objects)
            right = random_scene(rng, grid, min_objects, max_objects)
            if statement.truth(left, right) == label:
                return statement, left, right, label


# -------------------------------------------------------------------------------- SNLI-VE: determinability
OCCLUDER = (128, 128, 128)
SNLI_LABELS = ("entailment", "neutral", "contradiction")
SNLI_TEMPLATES = ("exists", "at_least", "at_most", "relation")


def render_occluded(scene: Scene, covered: list[int], grid: int, cell: int, jitter: float, rng: random.Random) -> np.ndarray:
    """Render a scene, then paint a grey occluder over each covered cell (whatever is below is hidden)."""
    image = render(scene, grid, cell, jitter, rng).copy()
    for c in covered:
        row, col = divmod(c, grid)
        image[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = OCCLUDER
    return image


def completions(visible: Scene, covered: list[int], grid: int):
    """Every scene the viewer cannot rule out: each covered cell empty or holding any (shape, colour)."""
    options = [None] + [(s, c) for s in SHAPES for c in COLOURS]
    for fill in itertools.product(options, repeat=len(covered)):
        extra = [Obj(o[0], o[1], cell // grid, cell % grid) for o, cell in zip(fill, covered, strict=True) if o is not None]
        yield visible + extra


@dataclass(frozen=True)
class Hypothesis:
    template: str
    text: str
    args: tuple

    def truth(self, scene: Scene) -> bool:
        return HYPOTHESIS_TRUTH[self.template](scene, *self.args)


def _relation_holds(scene, a, word, b):
    return any(word in relation(x, y) for x in scene if a.matches(x) for y in scene if b.matches(y) and y != x)


HYPOTHESIS_TRUTH = {
    "exists": lambda scene, attr: count(scene, attr) > 0,
    "at_least": lambda scene, n, attr: count(scene, attr) >= n,
    "at_most": lambda scene, n, attr: count(scene, attr) <= n,
    "relation": _relation_holds,
}


def random_hypothesis(template: str, rng: random.Random, max_objects: int) -> Hypothesis:
    """Draw the words of one hypothesis about a single (partly occluded) image."""
    if template == "exists":
        attr = random_attr(rng, allow_any=False)
        return Hypothesis(template, f"there is {attr.singular()}", (attr,))
    if template in ("at_least", "at_most"):
        attr = random_attr(rng)
        n = rng.randint(1, max(2, max_objects // 2 + 1))
        words = "at least" if template == "at_least" else "at most"
        verb = "is" if n == 1 else "are"
        return Hypothesis(template, f"there {verb} {words} {attr.counted(n)}", (n, attr))
    if template == "relation":
        a, b = random_attr(rng, allow_any=False), random_attr(rng, allow_any=False)
        word = rng.choice(["above", "below", "left of", "right of"])
        return Hypothesis(template, f"{a.singular()} is {word} {b.singular()}", (a, word, b))
    raise ValueError(f"unknown snli_ve template {template!r}")


def entailment_label(hypothesis: Hypothesis, visible: Scene, covered: list[int], grid: int) -> str:
    """``entailment`` if the hypothesis holds in EVERY completion of the covered cells, ``contradiction`` if in
    none, ``neutral`` otherwise (exact enumeration: 13 possibilities per covered cell)."""
    if hypothesis.template in ("exists", "at_least", "at_most"):  # counts: every value in [c, c + k] is possible
        match = Obj(hypothesis.args[-1].shape or SHAPES[0], hypothesis.args[-1].colour or "red", -1, -1)
        truths = {hypothesis.truth(visible + [match] * extra) for extra in range(len(covered) + 1)}
    else:
        truths = {hypothesis.truth(scene) for scene in completions(visible, covered, grid)}
    if truths == {True}:
        return "entailment"
    if truths == {False}:
        return "contradiction"
    return "neutral"


def snli_ve_example(rng: random.Random, templates: list[str], grid: int, min_objects: int, max_objects: int,
                    max_occluders: int, max_tries: int = 400):
    """One balanced example: template and target label first, then the hypothesis, then scenes (objects + occluded
    cells) re-sampled until the determinability label matches. Returns ``(hypothesis, scene, covered, label)``;
    ``scene`` holds every object, including those hidden under an occluder."""
    template = rng.choice(templates)
    label = rng.choice(SNLI_LABELS)
    while True:
        hypothesis = random_hypothesis(template, rng, max_objects)
        for _ in range(max_tries):
            scene = random_scene(rng, grid, min_objects, max_objects)
            k = rng.randint(0, max_occluders)  # independent of the label: occluder count is no shortcut
            covered = sorted(rng.sample(range(grid * grid), k))
            visible = [o for o in scene if o.row * grid + o.col not in covered]
            if entailment_label(hypothesis, visible, covered, grid) == label:
                return hypothesis, scene, covered, label


# --------------------------------------------------------------------------------------- retrieval captions
def distinct_captions(scene: Scene, grid: int, n: int, rng: random.Random, max_draws: int = 200) -> list[str]:
    """``n`` different true captions of a scene (fewer only if the scene admits fewer), the full object list first
    so that every image has at least one caption that tells it apart from most others."""
    names = [f"{o.colour} {o.shape}" for o in sorted(scene, key=lambda o: (o.row, o.col))]
    captions = ["a " + " and a ".join(names)]
    for _ in range(max_draws):
        if len(captions) == n:
            break
        text = caption(scene, grid, rng)
        if text not in captions:
            captions.append(text)
    return captions
