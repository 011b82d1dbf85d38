"""Identity during training (issue 9, item 2): the preview samples scored in loss_history.jsonl,
step-named LoRA and embeddings (output.save_lora_every), progress.png and the best-step message.

The run uses a stand-in identity network whose "face" and embedding are known functions of the pixels,
so the logged scores are checked against a computation from the saved sample PNGs and the source PNGs
that shares nothing with the scorer but that function.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import library.training.training_scores as training_scores
from library.config import ConfigError, load_config
from testkit.tiny import save_random_arcface
from library.training.trainer import MagiCaptureTrainer
from library.training.training_scores import PreviewScorer, PreviewScoring, best_step, best_step_message

SAME_PERSON_COSINE = -0.12  # between the cosines this run gives, so both answers occur


def stand_in_has_face(rgb: np.ndarray) -> bool:
    return (int(rgb.astype(np.int64).sum()) // 10) % 3 != 1  # about two images in three "show a face"


def stand_in_embedding(rgb: np.ndarray) -> np.ndarray:
    """The mean colour of each quadrant, centred on mid-grey and L2-normalised: 12-d."""
    h, w = rgb.shape[0] // 2, rgb.shape[1] // 2
    quads = [rgb[:h, :w], rgb[:h, w:], rgb[h:, :w], rgb[h:, w:]]
    v = np.concatenate([q.reshape(-1, 3).astype(np.float64).mean(0) for q in quads]) - 127.5
    return (v / np.linalg.norm(v)).astype(np.float32)


class StandInNetwork:
    """IdentityNetwork's interface (library/evaluation/face_identity.py) on a known function of the pixels."""

    name = "stand-in"

    def faces(self, rgb: np.ndarray) -> list:
        if not stand_in_has_face(rgb):
            return []
        h, w = rgb.shape[:2]
        return [SimpleNamespace(box=(0.0, 0.0, float(w), float(h)), landmarks=np.zeros((5, 2), np.float32),
                                embedding=stand_in_embedding(rgb))]

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.similarity(a, b) > SAME_PERSON_COSINE


def solid(rgb: tuple[int, int, int], size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


class ColourNetwork(StandInNetwork):
    """Every image but pure black shows a face; the embedding is its mean colour, normalised."""

    def faces(self, rgb: np.ndarray) -> list:
        v = rgb.reshape(-1, 3).astype(np.float64).mean(0)
        if not v.any():
            return []
        return [SimpleNamespace(embedding=(v / np.linalg.norm(v)).astype(np.float32))]

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.similarity(a, b) > 0.5


def test_scores_of_known_images():
    sources = [np.asarray(solid(c)) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 0))]  # the black one has no face
    scorer = PreviewScorer(ColourNetwork(), sources)
    assert len(scorer.source_embeddings) == 2
    # red: cos 1 with red, 0 with green -> 0.5; (255, 255, 0): cos 1/sqrt(2) with each; black: no face
    scores = scorer.score([solid((255, 0, 0)), solid((255, 255, 0)), solid((0, 0, 0)), solid((0, 0, 255))])
    assert scores[training_scores.FACE_FOUND] == pytest.approx(3 / 4)
    assert scores[training_scores.CSIM] == pytest.approx((0.5 + 1 / math.sqrt(2) + 0.0) / 3, abs=1e-6)
    # same person as the majority of the 2 source faces (cos > 0.5 with both): only yellow
    assert scores[training_scores.SAME_PERSON] == pytest.approx(1 / 4)
    # centroid (1, 1, 0)/sqrt(2); ceiling red.green = 0. red: identity 1/sqrt(2), nearest 1, copy 1 - 1/sqrt(2),
    # copied; yellow: identity 1, nearest 1/sqrt(2), copy 1/sqrt(2) - 1, copied; blue: 0, 0, 0, not copied
    assert scores[training_scores.IDENTITY] == pytest.approx((1 / math.sqrt(2) + 1 + 0) / 3, abs=1e-6)
    assert scores[training_scores.COPY] == pytest.approx(0.0, abs=1e-6)
    assert scores[training_scores.COPY_SHARE] == pytest.approx(2 / 3)
    assert not any(k.startswith("pose/") for k in scores)  # the stand-in network gives no dlib parts
    assert PreviewScoring.describe(scores) == ("csim 0.402 | identity 0.569 | copy 0.000 | copy share 0.67 | "
                                               "face found 0.75 | same person 0.25")

    assert PreviewScoring.describe({training_scores.FACE_FOUND: 1.0, training_scores.SAME_PERSON: 1.0, "pose/frontal": 3.0,
                                    "pose/left": 1.0, "pose/up": 0.0}) == (
        "csim - (no face) | face found 1.00 | same person 1.00 | poses frontal 3, left 1")
    none = scorer.score([solid((0, 0, 0))])
    assert none == {training_scores.FACE_FOUND: 0.0, training_scores.SAME_PERSON: 0.0}
    with pytest.raises(training_scores.ScoringUnavailable, match="finds no face in the source images"):
        PreviewScorer(ColourNetwork(), [np.asarray(solid((0, 0, 0)))])


def test_scoring_that_cannot_load_says_so_once(monkeypatch, tmp_path):
    def broken(weights: str):
        raise ValueError(f"{weights}: not an identity network")

    monkeypatch.setattr(training_scores, "_load_network", broken)
    said: list[str] = []
    scoring = PreviewScoring("bad.pth", tmp_path, ["a"], said.append)
    assert scoring([solid((255, 0, 0))]) == {} and scoring([solid((255, 0, 0))]) == {}
    assert said == ["warning: preview samples are not scored for likeness: the identity network did not load "
                    "(bad.pth: not an identity network)"]


def test_best_step_message(tmp_path):
    """The rule on a hand-made table: the highest identity among the steps whose copy share is under 0.5;
    a higher-identity step that copies is passed over; ties go to the earlier step."""
    history = [
        {"phase": 1, "step": 3, "eval/identity": 0.30, "eval/copy_share": 0.0},
        {"phase": 2, "step": 1, "loss": 1.0},
        {"phase": 2, "step": 2, "eval/identity": 0.71, "eval/copy_share": 0.25},
        {"phase": 2, "step": 3, "eval/identity": float("nan"), "eval/copy_share": 0.0},
        {"phase": 2, "step": 4, "eval/identity": 0.71, "eval/copy_share": 0.0},  # a tie: the earlier step is kept
        {"phase": 2, "step": 5, "eval/identity": 0.93, "eval/copy_share": 0.75},  # most alike, but copies
        {"phase": 2, "step": 6, "eval/identity": 0.88, "eval/copy_share": 0.5},  # at the limit: copies too
        {"phase": 2, "step": 7, "eval/identity": 0.52, "eval/copy_share": 0.0},
    ]
    best = best_step(history)
    assert (best.phase, best.step, best.passed, best.identity, best.copy_share) == (2, 2, True, 0.71, 0.25)
    kept = tmp_path / "run-step00000002.safetensors"
    kept.write_bytes(b"x")
    files = {(2, 2): [kept, tmp_path / "missing.safetensors"]}
    message = best_step_message(history, lambda phase, step: files.get((phase, step), []))
    assert message == (f"best step: phase 2 step 2 (identity 0.710, copy share 0.25 < 0.5): {kept} (rename the "
                       f"embeddings without -stepNNNNNNNN to prompt with the usual words)")
    assert best_step_message(history, lambda phase, step: []) == (
        "best step: phase 2 step 2 (identity 0.710, copy share 0.25 < 0.5) (no LoRA was saved at that step: set "
        "output.save_lora_every to keep one)")
    assert best_step_message(history[:2], lambda p, s: []) == (
        "best step: phase 1 step 3 (identity 0.300, copy share 0.00 < 0.5) (phase 1: the embeddings alone, no LoRA yet)")
    assert best_step_message([{"phase": 2, "step": 1, "loss": 1.0}], lambda p, s: []) is None
    assert best_step_message([{"phase": 2, "step": 1, "eval/csim": 0.9}], lambda p, s: []) is None  # no identity
    # one source face: no copy share, nothing to pass over
    assert best_step([{"phase": 2, "step": 1, "eval/identity": 0.6}, {"phase": 2, "step": 2, "eval/identity": 0.7}]).step == 2


def test_best_step_falls_back_to_the_least_copying_step():
    """Every scored step copies: the lowest copy share is named (then the higher identity), and the line says so."""
    history = [{"phase": 2, "step": 1, "eval/identity": 0.95, "eval/copy_share": 1.0},
               {"phase": 2, "step": 2, "eval/identity": 0.80, "eval/copy_share": 0.5},
               {"phase": 2, "step": 3, "eval/identity": 0.85, "eval/copy_share": 0.5},
               {"phase": 2, "step": 4, "eval/identity": 0.90, "eval/copy_share": 0.75}]
    best = best_step(history)
    assert (best.step, best.passed) == (3, False)
    assert best_step_message(history, lambda p, s: []) == (
        "best step: none kept its copy share under 0.5 (the samples copy training photos; give more varied photos "
        "or train fewer steps); the least copying is phase 2 step 3 (identity 0.850, copy share 0.50) (no LoRA was "
        "saved at that step: set output.save_lora_every to keep one)")


def test_progress_png_marks_the_best_step(tmp_path):
    """The best-step line (with its files) is written under the plots and kept as the PNG's Description."""
    from library.training.progress_plot import plot_progress

    history = [{"phase": 2, "step": 1, "loss": 0.5, "eval/identity": 0.9, "eval/copy_share": 0.0},
               {"phase": 2, "step": 2, "loss": 0.4, "eval/identity": 0.8, "eval/copy_share": 0.0}]
    line = best_step_message(history, lambda p, s: [])
    path = plot_progress(history, tmp_path / "progress.png", 2, best_step(history).entry, training_scores.IDENTITY, line)
    with Image.open(path) as plot:
        assert plot.size == (1000, 600) and plot.text["Description"] == line
        assert line.startswith("best step: phase 2 step 1 ")


def test_save_lora_every_is_checked_and_its_temporaries_found(prepared_data, tmp_path):
    from library.config import Config
    from library.training.outputs import remove_stale_temporaries

    source, reference = prepared_data
    with pytest.raises(ConfigError, match="save_lora_every = -1"):
        load_config("configs/test_tiny.toml", [f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
                                               "output.save_lora_every=-1"])
    cfg = Config()
    cfg.output.dir, cfg.output.name = str(tmp_path), "run"
    stale = [tmp_path / ".run-step00000500.safetensors.a1b2c3.tmp", tmp_path / ".mcv2-step00000500.safetensors.x9.tmp",
             tmp_path / ".progress.png.q1.tmp"]
    other = [tmp_path / ".run-step500.safetensors.a1b2c3.tmp", tmp_path / "run-step00000500.safetensors"]
    for p in stale + other:
        p.write_bytes(b"")
    assert remove_stale_temporaries(cfg) == sorted(stale)
    assert all(p.exists() for p in other)


def kohya_name(checkpoint_key: str) -> str:
    """checkpoint (peft) name -> kohya module name: unet.a.b.lora_A.default.weight -> lora_unet_a_b,
    text_encoder.encoder.layers.0.x.lora_B.default.weight -> lora_te_text_model_encoder_layers_0_x."""
    path, _ = checkpoint_key.split(".lora_", 1)
    prefix, rest = path.split(".", 1)
    if prefix == "text_encoder" and not rest.startswith("text_model."):  # kohya's names are CLIPTextModel's
        rest = "text_model." + rest
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}[prefix] + rest.replace(".", "_")


def test_training_logs_scores_saves_steps_and_plots(tiny_model, prepared_data, tmp_path, monkeypatch, capsys):
    folder, _ = tiny_model
    source, reference = prepared_data
    out = tmp_path / "out"
    arcface = save_random_arcface(tmp_path / "arcface.pth")
    loaded: list[str] = []
    monkeypatch.setattr(training_scores, "_load_network", lambda weights: loaded.append(weights) or StandInNetwork())
    cfg = load_config("configs/test_tiny.toml", [
        f'model.pretrained="{folder}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f'output.dir="{out}"', f'loss.identity_weights="{arcface}"', 'output.name="run"',
        "sample.every=1", "sample.n=2", "output.save_lora_every=1", 'output.save_precision="fp32"',
        "output.keep_checkpoints=5", "logging.print_every=0",
    ])
    MagiCaptureTrainer(cfg).run()
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert loaded == [str(arcface)], "the network is loaded once, from loss.identity_weights"

    # the scores, from the saved PNGs by hand: one stand-in embedding per source PNG and per sample tile
    sources = []
    for png in sorted(Path(source).glob("img?.png")):
        rgb = np.asarray(Image.open(png).convert("RGB"))
        if stand_in_has_face(rgb):
            sources.append(stand_in_embedding(rgb).astype(np.float64))
    assert 0 < len(sources)
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [(h["phase"], h["step"]) for h in history] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    res, seen_face, seen_none = cfg.data.resolution, False, False
    for h in history:
        grid = np.asarray(Image.open(out / "samples" / f"p{h['phase']}-{h['step']:06d}.png").convert("RGB"))
        assert grid.shape == (res, 2 * res, 3)
        tiles = [grid[:, i * res:(i + 1) * res] for i in range(2)]
        faces = [stand_in_embedding(t).astype(np.float64) for t in tiles if stand_in_has_face(t)]
        cos = [[float(f @ s / (np.linalg.norm(f) * np.linalg.norm(s))) for s in sources] for f in faces]
        assert h["eval/face_found"] == len(faces) / 2, h
        assert h["eval/same_person"] == sum(2 * sum(c > SAME_PERSON_COSINE for c in row) > len(sources)
                                            for row in cos) / 2
        if faces:
            seen_face = True
            assert h["eval/csim"] == pytest.approx(np.mean([np.mean(row) for row in cos]), abs=1e-5)
            unit = [np.asarray(s, np.float64) / np.linalg.norm(s) for s in sources]
            centre = np.mean(unit, 0) / np.linalg.norm(np.mean(unit, 0))
            assert h["eval/identity"] == pytest.approx(np.mean([f @ centre / np.linalg.norm(f) for f in faces]), abs=1e-5)
            assert h["eval/copy"] == pytest.approx(np.mean([max(row) for row in cos]) - h["eval/identity"], abs=1e-5)
        else:
            seen_none = True
            assert "eval/csim" not in h
    assert seen_face, "no sample showed a stand-in face: the CSIM comparison never ran"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("eval/csim")]
    want = [(h["step"] + (cfg.phase1.steps if h["phase"] == 2 else 0), h["eval/csim"]) for h in history if "eval/csim" in h]
    assert [s for s, _ in logged] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in logged], [v for _, v in want], rtol=1e-6)
    assert "preview samples are scored with stand-in against" in printed
    assert re.search(r"phase 2 step 1/3: samples (csim [0-9.]+|csim - \(no face\)) \| face found", printed)

    # step-named files at phase-2 steps 1 and 2 (step 3's are the final files); step 2's tensors are the
    # step-2 checkpoint's
    names = sorted(p.name for p in out.glob("*-step*"))
    assert names == [f"{n}-step{s:08d}.safetensors" for n in ("mcv1", "mcv2", "run") for s in (1, 2)]
    trainable = safe_open(str(out / "checkpoint-p2-000002" / "trainable.safetensors"), "pt")
    vectors = trainable.get_tensor("token_embedding.new_vectors")
    for row, word in enumerate(("mcv1", "mcv2")):
        with safe_open(str(out / f"{word}-step00000002.safetensors"), "pt") as f:
            torch.testing.assert_close(f.get_tensor("emb_params"), vectors[row:row + 1], rtol=0, atol=0)
    with safe_open(str(out / "run-step00000002.safetensors"), "pt") as f:
        lora_keys = set(f.keys())
        expected = {}
        for key in trainable.keys():
            if ".lora_" in key:
                kind = "lora_down" if ".lora_A." in key else "lora_up"
                expected[f"{kohya_name(key)}.{kind}.weight"] = trainable.get_tensor(key)
        assert {k for k in lora_keys if not k.endswith(".alpha")} == set(expected)
        for key, tensor in expected.items():
            torch.testing.assert_close(f.get_tensor(key), tensor, rtol=0, atol=0, msg=key)
        moved = [k for k in expected if k.endswith("lora_up.weight") and f.get_tensor(k).abs().sum() > 0]
        assert moved, "the step-2 LoRA is still at its initialisation"
    with safe_open(str(out / "run-step00000001.safetensors"), "pt") as f1, safe_open(str(out / "run.safetensors"), "pt") as fin:
        up = next(k for k in expected if k.startswith("lora_unet") and k.endswith("lora_up.weight"))
        assert not torch.equal(f1.get_tensor(up), fin.get_tensor(up)), "step 1's file holds the final LoRA"

    # the plot, and the best step named with its files
    top = best_step(history)
    best = top.entry
    line = captured.out.strip().splitlines()[-1]  # the run's last line
    assert line.startswith("best step: ")
    with Image.open(out / "progress.png") as plot:
        assert plot.format == "PNG" and plot.size == (1000, 600) and plot.text["Description"] == line
    assert f"wrote {out / 'progress.png'}" in printed
    assert f"phase {best['phase']} step {best['step']} (identity {best['eval/identity']:.3f}" in line
    if best["phase"] == 2:
        stem = "run" if best["step"] == 3 else f"run-step{best['step']:08d}"
        assert str(out / f"{stem}.safetensors") in line


def test_source_faces_are_taken_at_the_stored_landmarks(tmp_path):
    """A group photo in the source set: its NAME.json points at the person (the smaller face), so that
    face is embedded, not the largest; a photo without landmarks gives its largest face."""

    class LandmarkColourNetwork(ColourNetwork):
        def embed(self, rgb: np.ndarray, landmarks: np.ndarray):
            x, y = np.asarray(landmarks, np.float64)[2].round().astype(int)  # the nose
            return SimpleNamespace(embedding=ColourNetwork.faces(self, rgb[y:y + 1, x:x + 1])[0].embedding)

    group = np.zeros((40, 40, 3), np.uint8)
    group[:, :30] = (200, 0, 0)  # the larger "face"
    group[:, 30:] = (0, 0, 90)  # the person, where prepare's landmarks are
    Image.fromarray(group).save(tmp_path / "group.png")
    (tmp_path / "group.json").write_text(json.dumps({"landmarks": [[32, 10], [38, 10], [35, 20], [32, 30], [38, 30]]}))
    Image.fromarray(np.full((40, 40, 3), (0, 120, 0), np.uint8)).save(tmp_path / "plain.png")
    (tmp_path / "plain.json").write_text(json.dumps({"landmarks": None}))
    scorer = PreviewScorer.from_folder("", tmp_path, ["group", "plain"], lambda weights: LandmarkColourNetwork())
    np.testing.assert_allclose(scorer.source_embeddings, [[0, 0, 1], [0, 1, 0]], atol=1e-7)


def test_real_network_scores_the_person_above_another(tmp_path):
    """dlib's network on real photos: a half-size astronaut scores above a stranger from insightface's
    group photo, a blank image shows no face; the figures are the network's own cosines, averaged."""
    pytest.importorskip("dlib")
    from skimage import data

    from dataset_tools.demo_photos import reference_images
    from library.evaluation.face_identity import load_identity_network

    astronaut = Image.fromarray(data.astronaut())
    astronaut.save(tmp_path / "full.png")
    astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.png")
    said: list[str] = []
    scoring = PreviewScoring("", tmp_path, ["full", "mirror"], said.append)
    samples = [astronaut.resize((256, 256), Image.Resampling.LANCZOS), reference_images()["t1_left"],
               Image.new("RGB", (256, 256), (128, 128, 128))]
    scores = scoring(samples)
    assert said == ["preview samples are scored with dlib ResNet v1 (face_recognition_models) against 2 source faces"]
    net = load_identity_network()
    sources = [net.faces(np.asarray(im))[0].embedding for im in (astronaut, astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
    per_image = [np.mean([net.similarity(net.faces(np.asarray(im))[0].embedding, s) for s in sources]) for im in samples[:2]]
    assert per_image[0] > 0.95 > per_image[1]  # measured: 0.98-1.0 for the astronaut, 0.82-0.89 for others
    embedded = [net.faces(np.asarray(im))[0].embedding.astype(np.float64) for im in samples[:2]]
    centre = (sources[0] + sources[1]) / np.linalg.norm(sources[0] + sources[1])  # both unit already
    identity = [float(e @ centre) for e in embedded]
    nearest = [max(float(e @ s) for s in sources) for e in embedded]
    assert scores == pytest.approx({"eval/face_found": 2 / 3, "eval/same_person": 1 / 3,
                                    "eval/csim": float(np.mean(per_image)), "eval/identity": float(np.mean(identity)),
                                    "eval/copy": float(np.mean(nearest)) - float(np.mean(identity)),
                                    # the half-size astronaut is less like either photo (0.990) than they are
                                    # like each other (0.9925): not a copy; nor is the stranger
                                    "eval/copy_share": 0.0,
                                    # both faces near-frontal (yaw 4 and 5 degrees, pitch 0 and 10, measured)
                                    "pose/frontal": 2.0, "pose/left": 0.0, "pose/right": 0.0, "pose/up": 0.0,
                                    "pose/down": 0.0}, abs=1e-5)


def test_style_score_masks_faces_and_averages_over_references(tmp_path, monkeypatch):
    """eval/style = mean over samples x references of the cosine of CLIP embeddings, the references'
    faces masked by their prepared masks, the samples' by the ellipse inscribed in each found face box."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from library.evaluation.clip_scores import ClipImageEmbedder

    torch.manual_seed(0)
    clip = tmp_path / "clip"
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, projection_dim=24)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    rng = np.random.default_rng(0)
    refs = tmp_path / "reference"
    refs.mkdir()
    ref_images, ref_masks = [], []
    for i in range(2):
        rgb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        face = np.zeros((32, 32), bool)
        face[8:20, 10:22] = True
        Image.fromarray(rgb).save(refs / f"r{i}.png")
        Image.fromarray(np.where(face, 0, 255).astype(np.uint8)).save(refs / f"r{i}.mask.png")  # white = trains
        ref_images.append(rgb)
        ref_masks.append(face)

    class BoxNetwork(StandInNetwork):
        def faces(self, rgb):
            return [SimpleNamespace(box=(4.0, 6.0, 20.0, 26.0), embedding=stand_in_embedding(rgb))]

    monkeypatch.setattr(training_scores, "_load_network", lambda weights: BoxNetwork())
    sources = tmp_path / "source"
    sources.mkdir()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(sources / "s.png")
    said = []
    scoring = PreviewScoring("", sources, ["s"], said.append, str(clip), refs)
    samples = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    scores = scoring(samples)

    # by hand: the ellipse centred (12, 16) with radii (8, 10), in pixel-centre coordinates
    yy, xx = np.mgrid[:32, :32] + 0.5
    ellipse = ((xx - 12) / 8) ** 2 + ((yy - 16) / 10) ** 2 <= 1
    embedder = ClipImageEmbedder(clip)
    fill = embedder.fill
    masked = [np.where(ellipse[..., None], fill, np.asarray(im)).astype(np.uint8) for im in samples]
    ref_masked = [np.where(m[..., None], fill, im).astype(np.uint8) for im, m in zip(ref_images, ref_masks)]
    a, b = embedder.embed(masked), embedder.embed(ref_masked)
    assert scores[training_scores.STYLE] == pytest.approx(float((a @ b.T).mean()), abs=1e-6)
    assert PreviewScoring.describe(scores).endswith(f"style {scores[training_scores.STYLE]:.3f}")
    # without the masks the figure differs: the mask is used
    assert abs(float((embedder.embed([np.array(s) for s in samples]) @ b.T).mean()) - scores[training_scores.STYLE]) > 1e-4
    assert not any(line.startswith("warning") for line in said)
