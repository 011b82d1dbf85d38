"""The toy world draws what its captions and masks say (pixel tests against hand-worked counts and
colours), and writes prepared folders the trainer's own readers accept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from library.training.data import check_prepared_sets, load_prepared_folder
from testkit.toyworld.sampling import composed_scene, pretraining_scene, reference_scene, source_scene
from testkit.toyworld.scenes import COLOURS, STYLE, SUBJECT, Look, Scene, Thing, caption, render, shape_mask
from testkit.toyworld.sets import write_sets


def test_shape_masks_match_hand_counts():
    # pixel centres sit at k + 0.5; a radius-2 disc at (4, 4) holds offsets (+-0.5, +-0.5) and
    # (+-0.5, +-1.5) / (+-1.5, +-0.5) (0.25+2.25 <= 4) but not (+-1.5, +-1.5) (4.5 > 4): 4 + 8 = 12
    assert shape_mask("disc", (4.0, 4.0), 2.0, size=8).sum() == 12
    assert shape_mask("square", (4.0, 4.0), 2.0, size=8).sum() == 16
    # triangle of half 2 at (4, 4): rows dy = -1.5, -0.5, 0.5, 1.5 keep |dx| <= 0.25, 0.75, 1.25, 1.75,
    # i.e. 0, 2, 2, 4 pixel centres (offsets +-0.5, +-1.5)
    tri = shape_mask("triangle", (4.0, 4.0), 2.0, size=8)
    assert tri.sum(axis=1).tolist() == [0, 0, 0, 2, 2, 4, 0, 0]
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("star", (4.0, 4.0), 2.0)


def test_masks_partition_the_image_and_hold_the_objects_colours():
    red = Look("disc", COLOURS["red"], "plain", COLOURS["white"])
    striped = Look("square", COLOURS["blue"], "striped", COLOURS["white"])
    scene = Scene((Thing(red, (16.0, 16.0), 8.0, "red disc"), Thing(striped, (44.0, 44.0), 8.0, "blue striped square")),
                  ("flat", (128, 128, 128), (128, 128, 128)), "plain")
    image, (disc, square), background = render(scene)
    assert (disc.astype(int) + square + background == 1).all()
    assert set(map(tuple, image[disc])) == {COLOURS["red"]}
    # 16 x 16 square, stripes 3 px of 6 relative to its centre: rows with floor(dy / 3) odd are white
    assert square.sum() == 256
    assert set(map(tuple, image[square])) == {COLOURS["blue"], COLOURS["white"]}
    assert (image[square] == COLOURS["white"]).all(axis=1).sum() == 16 * 8  # dy in [-7.5, 7.5]: 8 of 16 rows
    # the top row (dy = -7.5: floor(-2.5) = -3, odd) is white, the row below the centre (dy = 0.5) blue
    assert tuple(image[36, 44]) == COLOURS["white"] and tuple(image[44, 44]) == COLOURS["blue"]
    assert set(map(tuple, image[background])) == {(128, 128, 128)}
    assert caption(scene) == "a photo of a red disc and a blue striped square on a plain background"


def test_the_subject_and_the_style_are_never_named_and_never_in_pretraining():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = pretraining_scene(rng)
        assert scene.background != STYLE and all(t.look != SUBJECT for t in scene.things)
        assert scene.background_word and all(t.words for t in scene.things)
    composed = composed_scene(rng)
    assert [t.look for t in composed.things] == [SUBJECT] and composed.background == STYLE
    assert caption(composed) == "a photo"
    assert caption(composed, "mcv1", "mcv2") == "a photo of a mcv1 person in the style of mcv2"
    assert caption(source_scene(rng), "mcv1") == "a photo of a mcv1 person on a plain background"
    assert reference_scene(rng).things[0].look.shape == "person"


def test_objects_never_overlap_and_stay_in_the_frame():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = pretraining_scene(rng, max_things=3)
        _, masks, _ = render(scene)
        drawn = [shape_mask(t.look.shape, t.center, t.half) for t in scene.things]
        for mask, full in zip(masks, drawn):
            assert (mask == full).all()  # nothing covered by a later object


def test_written_sets_are_read_by_the_trainer(tmp_path):
    folders = write_sets(tmp_path / "world", seed=0, n=3)
    check_prepared_sets(folders["source"], folders["reference"])
    source = load_prepared_folder(folders["source"], "source", 64)
    reference = load_prepared_folder(folders["reference"], "reference", 64)
    record = json.loads((folders["source"] / "source_000.json").read_text())
    subject = record["toyworld"]["objects"][0]
    assert subject["words"] == "" and subject["shape"] == "person"
    # the trained region: the subject for a source photo, the background for a reference photo
    assert source[0].mask.sum() == subject["pixels"]
    ref = json.loads((folders["reference"] / "reference_000.json").read_text())
    assert reference[0].mask.sum() == ref["toyworld"]["background_pixels"]
    assert record["mask_coverage"] == round(subject["pixels"] / 64 ** 2, 5)


def test_pretraining_resumes_exactly(tmp_path):
    """Stopping after a step of stage 2 and continuing gives the weights of an uninterrupted run: every
    batch is drawn from (seed, stage, step) and the optimiser's moments are restored."""
    import sys
    from types import SimpleNamespace

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import toyworld_pretrain as tp

    def run(out, unet_steps):
        args = SimpleNamespace(seed=3, device="cpu", vae_steps=2, unet_steps=unet_steps, batch=2, lr=1e-3,
                               save_every=100, log_every=100)
        return tp.train(out, args)

    run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    assert json.loads((tmp_path / "b" / "state" / "progress.json").read_text())["step"] == 1
    after_one = load_file(str(tmp_path / "b" / "state" / "weights.safetensors"))
    run(tmp_path / "b", 2)
    a, b = (load_file(str(tmp_path / x / "state" / "weights.safetensors")) for x in "ab")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the resumed step did train (the equality is not between two untouched copies)
    assert not torch.equal(after_one["unet.conv_in.weight"], b["unet.conv_in.weight"])
    # the finished folder carries the measured latent scale
    scale = json.loads((tmp_path / "a" / "state" / "progress.json").read_text())["scaling_factor"]
    assert json.loads((tmp_path / "a" / "toy_base" / "vae" / "config.json").read_text())["scaling_factor"] == scale


def test_evidence_colour_shares_by_hand():
    """The evidence bench counts a pixel for the subject / the style by its nearest world colour."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.method_evidence import colour_shares

    near = lambda c, d: tuple(min(255, max(0, v + d)) for v in c)  # noqa: E731  a pixel a little off a colour
    pixels = [near(SUBJECT.colour, 6), SUBJECT.second, near(SUBJECT.second, -5),  # 3 subject
              STYLE[1], STYLE[2], near(STYLE[1], 4), STYLE[2], STYLE[2],  # 5 style
              (128, 128, 128), COLOURS["red"]]  # 2 neither
    assert colour_shares(np.array(pixels, np.uint8).reshape(1, 2, 5, 3)) == (0.3, 0.5)
