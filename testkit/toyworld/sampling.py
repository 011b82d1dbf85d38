"""Random scenes of the toy world: the captioned scenes a toy base is pretrained on, and the three sets of
MagiCapture's task: the subject in plain scenes (source), other objects in the style (reference), and the
subject in the style (the composed target, ground truth only).

Every function takes a ``numpy.random.Generator``: a seed gives the same scenes on every machine.
"""

from __future__ import annotations

import numpy as np

from testkit.toyworld.scenes import BACKGROUNDS, COLOURS, NEUTRALS, PATTERNS, SHAPES, SIZE, STYLE, SUBJECT, Look, Scene, Thing

HALF_RANGE = (7.0, 13.0)  # object half-size, pixels
GAP = 2.0  # pixels between objects' boxes


def _second_colour(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pattern's second colour: white on a coloured object, dark grey on a white one."""
    return (60, 60, 60) if colour == COLOURS["white"] else COLOURS["white"]


def named_look(rng: np.random.Generator, shape: str | None = None) -> tuple[Look, str]:
    """A random named look and its caption words ("red striped disc"; "plain" is not said)."""
    shape = shape or str(rng.choice(SHAPES))
    colour_word = str(rng.choice(list(COLOURS)))
    pattern = str(rng.choice(PATTERNS))
    colour = COLOURS[colour_word]
    words = " ".join(w for w in (colour_word, "" if pattern == "plain" else pattern, shape) if w)
    return Look(shape, colour, pattern, _second_colour(colour)), words


def _place(rng: np.random.Generator, halves: list[float], tries: int = 200) -> list[tuple[float, float]] | None:
    """Centres for boxes of the given half-sizes inside the SIZE x SIZE frame, boxes GAP apart; None when
    `tries` random draws find no such layout."""
    for _ in range(tries):
        centers = [(float(rng.uniform(h, SIZE - h)), float(rng.uniform(h, SIZE - h))) for h in halves]
        ok = all(
            abs(a[0] - b[0]) >= ha + hb + GAP or abs(a[1] - b[1]) >= ha + hb + GAP
            for i, (a, ha) in enumerate(zip(centers, halves))
            for b, hb in zip(centers[i + 1:], halves[i + 1:])
        )
        if ok:
            return centers
    return None


def _scene(rng: np.random.Generator, looks: list[tuple[Look, str]], background, background_word: str) -> Scene:
    """Place `looks` (look, words) at random sizes and positions; fewer objects if they do not fit."""
    while True:
        halves = [float(rng.uniform(*HALF_RANGE)) for _ in looks]
        centers = _place(rng, halves)
        if centers is not None:
            break
        looks = looks[:-1] if len(looks) > 1 else looks
    things = tuple(Thing(look, c, h, words) for (look, words), c, h in zip(looks, centers, halves))
    return Scene(things, background, background_word)


def _named_background(rng: np.random.Generator) -> tuple[tuple, str]:
    """A random captioned background: (texture, a, b) and its word; plain ones in a random neutral grey."""
    word = str(rng.choice(list(BACKGROUNDS)))
    texture, a, b = BACKGROUNDS[word]
    if texture == "flat":
        grey = NEUTRALS[int(rng.integers(len(NEUTRALS)))]
        a = b = grey
    return (texture, a, b), word


def pretraining_scene(rng: np.random.Generator, max_things: int = 2) -> Scene:
    """A captioned scene for pretraining: 1..max_things named objects on a named background; never the
    subject or the style."""
    n = int(rng.integers(1, max_things + 1))
    background, word = _named_background(rng)
    return _scene(rng, [named_look(rng) for _ in range(n)], background, word)


def source_scene(rng: np.random.Generator) -> Scene:
    """The subject alone on a plain grey background (the toy's selfie)."""
    grey = NEUTRALS[int(rng.integers(len(NEUTRALS)))]
    return _scene(rng, [(SUBJECT, "")], ("flat", grey, grey), "plain")


def reference_scene(rng: np.random.Generator) -> Scene:
    """One or two named objects, one of them a person, on the style's background (the toy's style photo)."""
    looks = [named_look(rng, "person")] + ([named_look(rng)] if rng.random() < 0.5 else [])
    return _scene(rng, looks, STYLE, "")


def composed_scene(rng: np.random.Generator) -> Scene:
    """The composed target: the subject on the style's background (ground truth of "[V1] in the [V2] style")."""
    return _scene(rng, [(SUBJECT, "")], STYLE, "")
