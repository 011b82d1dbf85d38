"""The toy world: captioned 64 x 64 scenes of a few shapes, colours and patterns on a few backgrounds,
each drawn with the exact mask of every object and of the background.

A scene is data (:class:`Scene`: objects and a background); :func:`render` draws it with hard edges, so a
pixel belongs to exactly one object or to the background and the masks are exact, not estimated;
:func:`caption` writes what a caption-trained model should learn from it ("a photo of a red striped disc
and a blue square on a wooden background"). Objects never overlap (placement is rejection-sampled), so
every object is fully visible.

Two looks exist that no caption ever names, so that a model pretrained on captioned scenes has no word
for them and must learn them from a handful of pictures, as MagiCapture learns a person and a style:
  * the **subject**: one particular person-shaped object with a ring pattern in two colours
    (:data:`SUBJECT`);
  * the **style**: one particular background, a diagonal hatch in two colours (:data:`STYLE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 64  # pixels per side

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "white": (235, 235, 235),
}
SHAPES = ("disc", "square", "triangle", "person")
PATTERNS = ("plain", "striped", "dotted", "checkered")
# background word -> (texture, colour a, colour b); "plain" backgrounds also come in the neutral greys below
BACKGROUNDS: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int]]] = {
    "wooden": ("bands", (150, 100, 55), (110, 70, 35)),
    "brick": ("bricks", (170, 70, 50), (200, 190, 175)),
    "grass": ("blades", (70, 140, 50), (40, 100, 35)),
    "plain": ("flat", (128, 128, 128), (128, 128, 128)),
}
NEUTRALS = ((128, 128, 128), (96, 96, 96), (160, 160, 160), (200, 200, 200))


@dataclass(frozen=True)
class Look:
    """How one object is painted: its shape, a base colour, a pattern, and the pattern's second colour."""

    shape: str
    colour: tuple[int, int, int]
    pattern: str
    second: tuple[int, int, int]


# The two unnamed concepts (see the module docstring): the subject is drawn only by the subject sets, the
# style only by the style sets; pretraining scenes never contain either.
SUBJECT = Look("person", (205, 50, 190), "rings", (30, 190, 190))
STYLE = ("hatch", (245, 150, 40), (90, 40, 150))


@dataclass(frozen=True)
class Thing:
    """One object in a scene: its look, centre (x, y) in pixels and half-size in pixels; `words` is its
    caption phrase ("red striped disc"), empty for the subject, which no caption names."""

    look: Look
    center: tuple[float, float]
    half: float
    words: str = ""


@dataclass(frozen=True)
class Scene:
    """Objects (drawn in order, never overlapping) on a background (texture, colour a, colour b);
    `background_word` names the background in captions ("" for the style, which no caption names)."""

    things: tuple[Thing, ...]
    background: tuple[str, tuple[int, int, int], tuple[int, int, int]]
    background_word: str = ""
    extras: dict = field(default_factory=dict, compare=False)


def _grid(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each [size, size] float32, x along columns."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def shape_mask(shape: str, center: tuple[float, float], half: float, size: int = SIZE) -> np.ndarray:
    """[size, size] bool: the pixels whose centres lie inside `shape` of half-size `half` at `center`.

    disc: radius `half`; square: side 2 * `half`; triangle: apex up, base 2 * `half` wide, height 2 *
    `half`; person: a head (disc of radius 0.4 * half centred 0.55 * half above the centre) on a body (a
    half-disc of radius `half` whose flat side is the box's bottom edge, cut 0.05 * half below the head).
    """
    xs, ys = _grid(size)
    cx, cy = center
    dx, dy = xs - cx, ys - cy
    if shape == "disc":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # apex (0, -half), base from (-half, half) to (half, half): |dx| <= (dy + half) / 2
        return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    if shape == "person":
        head = dx * dx + (dy + 0.55 * half) ** 2 <= (0.4 * half) ** 2
        body = (dx * dx + (dy - half) ** 2 <= half * half) & (dy <= half) & (dy >= -0.1 * half)
        return head | body
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def _pattern(pattern: str, center: tuple[float, float], size: int = SIZE) -> np.ndarray:
    """[size, size] bool: where the pattern's second colour shows (relative to the object's centre, so a
    pattern moves with its object). striped: horizontal bands 3 px of 6; dotted: 2 x 2 dots every 5 px;
    checkered: 4 px checks; rings: rings 3 px of 6 around the centre; plain: nowhere."""
    xs, ys = _grid(size)
    dx, dy = xs - center[0], ys - center[1]
    if pattern == "plain":
        return np.zeros((size, size), bool)
    if pattern == "striped":
        return np.floor(dy / 3) % 2 == 1
    if pattern == "dotted":
        return (np.floor(dx) % 5 < 2) & (np.floor(dy) % 5 < 2)
    if pattern == "checkered":
        return (np.floor(dx / 4) + np.floor(dy / 4)) % 2 == 1
    if pattern == "rings":
        return np.floor(np.hypot(dx, dy) / 3) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def _background(texture: str, a: tuple[int, int, int], b: tuple[int, int, int], size: int = SIZE) -> np.ndarray:
    """[size, size, 3] uint8: bands (wavy horizontal wood grain), bricks (8 x 4 px bricks, 1 px mortar in
    colour b, rows offset by half a brick), blades (vertical grass strokes), hatch (diagonal stripes 3 px of
    6), flat (colour a)."""
    xs, ys = _grid(size)
    if texture == "flat":
        second = np.zeros((size, size), bool)
    elif texture == "bands":
        second = np.floor((ys + 1.5 * np.sin(xs / 5.0)) / 4) % 2 == 1
    elif texture == "bricks":
        row = np.floor(ys / 5)
        second = (np.floor(ys) % 5 == 4) | (np.floor(xs + 4 * (row % 2)) % 9 == 8)
    elif texture == "blades":
        second = (np.floor(xs) % 3 == 0) & (np.floor(ys + 7 * np.sin(xs * 1.7)) % 6 < 4)
    elif texture == "hatch":
        second = np.floor((xs + ys) / 3) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.where(second[..., None], np.array(b, np.uint8), np.array(a, np.uint8)).astype(np.uint8)


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Draw `scene`: (image [size, size, 3] uint8, one [size, size] bool mask per thing in order,
    background mask [size, size] bool). The masks partition the image: every pixel is in exactly one."""
    image = _background(*scene.background, size=size)
    taken = np.zeros((size, size), bool)
    masks = []
    for thing in scene.things:
        mask = shape_mask(thing.look.shape, thing.center, thing.half, size) & ~taken
        second = _pattern(thing.look.pattern, thing.center, size)
        colour = np.where(second[..., None], np.array(thing.look.second, np.uint8), np.array(thing.look.colour, np.uint8))
        image = np.where(mask[..., None], colour, image).astype(np.uint8)
        taken |= mask
        masks.append(mask)
    return image, masks, ~taken


def caption(scene: Scene, subject_token: str = "", style_token: str = "") -> str:
    """The scene's caption: "a photo of a red striped disc and a blue square on a wooden background".

    Things are named in drawing order by their `words`; the subject (empty words) is named "a
    <subject_token> person" when a token is given, else left out; the background is "on a <word>
    background", or "in the style of <style_token>" for the style (left out without a token).
    """
    names = []
    for thing in scene.things:
        if thing.words:
            names.append(f"a {thing.words}")
        elif subject_token:
            names.append(f"a {subject_token} person")
    text = "a photo of " + " and ".join(names) if names else "a photo"
    if scene.background_word:
        text += f" on a {scene.background_word} background"
    elif style_token:
        text += f" in the style of {style_token}"
    return text
