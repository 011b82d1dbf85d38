"""Hostile files (issue 8, item 10) through the real entry points: each is refused with one clean line.

- a pickle whose unpickling would create a marker file, given as the base model (``model.pretrained``:
  .ckpt / .pt / .bin single files and a diffusers folder's .bin), the ArcFace .pth
  (``loss.identity_weights``), the BiSeNet .pth (``dataset_tools.prepare --parser-weights``), the
  Real-ESRGAN / GFPGAN / CodeFormer .pth (``library.postprocess`` and ``generate.py``), a legacy .pt
  embedding (``generate.py``, ``export.load_embedding``) and a checkpoint's ``state.pt`` (``--resume``):
  refused, the marker file absent afterwards, exit code 2 (1 for a per-image failure of the
  post-processing CLI, its documented code), and the error line says "refused: unpickling it would call";
- a safetensors file whose header lies (offsets past the end, a [2**40, 2**40] shape, a 2**60 header
  length, a header length past the end of the file) given as the base model, the LoRA and an embedding
  to generate.py, a checkpoint's trainable tensors and a Real-ESRGAN .safetensors: refused in one line,
  measured in a fresh process to allocate nothing like what the header claims;
- an image that claims 100000 x 100000 pixels (PNG and BMP, ~100 bytes each): one line for that file in
  dataset_tools.prepare, the post-processing CLI and the trainer's prepared-folder reader; the other
  files are processed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_inputs import (  # noqa: E402
    BOMBS,
    PAYLOADS,
    PICKLE_FORMS,
    lying_safetensors,
    photo_like,
    write_hostile_pickle,
)

ROOT = Path(__file__).resolve().parent.parent
REFUSED = "refused: unpickling it would call"


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


def assert_one_clean_line(text: str, *must: str) -> str:
    """stderr holds no traceback and exactly one error line, which contains each of `must`."""
    assert "Traceback" not in text, text
    lines = error_lines(text)
    assert len(lines) == 1, lines
    for part in must:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a hostile pickle ran code"


def test_the_payloads_are_live(tmp_path):
    """The hostile files do create the marker when unpickled the unsafe way (else the tests prove nothing)."""
    for form in PICKLE_FORMS:
        for payload in PAYLOADS:
            marker = tmp_path / f"marker-{form}-{payload}"
            path = write_hostile_pickle(tmp_path / f"{form}-{payload}.pt", marker, form, payload)
            if form == "raw":
                pickle.loads(path.read_bytes())
            else:
                torch.load(path, weights_only=False)
            assert marker.exists(), (form, payload)


@pytest.mark.parametrize("form", PICKLE_FORMS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_every_pickle_reader_refuses_in_one_line(tmp_path, marker, form, payload):
    """Each loader of a pickle-based weights file, called directly: one-line error naming the file."""
    from library.faces.bisenet import ParserLoadError, load_bisenet
    from library.training.checkpoint import CheckpointError, CheckpointInfo, load_checkpoint
    from library.export.kohya import load_embedding
    from library.models.identity import load_arcface
    from library.models.loading import ModelLoadError, load_stable_diffusion
    from library.postprocess import load_face_restorer, load_upscaler

    ckpt = tmp_path / "checkpoint-p1-000001"
    ckpt.mkdir()
    save_file({"x": torch.zeros(1)}, str(ckpt / "trainable.safetensors"))
    write_hostile_pickle(ckpt / "state.pt", marker, form, payload)
    calls = {
        "model.ckpt": (ModelLoadError, lambda p: load_stable_diffusion(str(p))),
        "arcface.pth": (ValueError, load_arcface),
        "79999_iter.pth": (ParserLoadError, load_bisenet),
        "RealESRGAN_x2plus.pth": (ValueError, load_upscaler),
        "codeformer.pth": (ValueError, load_face_restorer),
        "mcv1.pt": (ValueError, load_embedding),
        "state.pt": (CheckpointError, lambda p: load_checkpoint(CheckpointInfo(ckpt, 1, 1))),
    }
    for name, (error, call) in calls.items():
        path = ckpt / name if name == "state.pt" else write_hostile_pickle(tmp_path / name, marker, form, payload)
        with pytest.raises(error) as info:
            call(path)
        msg = str(info.value)
        assert "\n" not in msg and "\x1b" not in msg and name in msg, msg
        assert f"{REFUSED} {'exec' if payload == 'exec' else 'io.open'}" in msg or (
            form == "raw" and "refused: not a plain-tensor pickle" in msg), msg


@contextlib.contextmanager
def _logging_to(buffer: io.StringIO):
    """Log handlers left writing to a closed stream write to `buffer` while an entry point runs, and
    handlers that the entry point adds (logging.basicConfig) are removed afterwards.

    A handler made during an earlier test holds that test's captured stderr (diffusers' and transformers'
    also hold its bound ``flush``), closed since, and logging would print "--- Logging error ---" and a
    traceback that no user ever sees: a harness artefact, not the entry point's output."""
    root = logging.getLogger()
    before = list(root.handlers)
    for logger in [root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]:
        for handler in logger.handlers:
            if not isinstance(handler, logging.StreamHandler):
                continue
            stream = handler.__dict__.get("stream")  # _StderrHandler's is a read-only property: always sys.stderr
            if getattr(stream, "closed", False):
                handler.stream = buffer  # not setStream: it would flush the closed stream
            if getattr(getattr(handler.__dict__.get("flush"), "__self__", None), "closed", False):
                handler.flush = buffer.flush
    try:
        yield
    finally:
        for handler in set(root.handlers) - set(before):
            root.removeHandler(handler)


def _run_main(main, capsys, argv) -> tuple[int, str]:
    """(exit code, everything the entry point printed: stderr, stdout and log records)."""
    logs = io.StringIO()
    with _logging_to(logs):
        rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err + logs.getvalue() + captured.out


def _train(capsys, *argv: str) -> tuple[int, str]:
    import train_magicapture

    return _run_main(train_magicapture.main, capsys, argv)


def _train_args(out: Path, model: Path | str, source: Path, reference: Path, *extra: str) -> list[str]:
    return ["--config", "configs/test_tiny.toml", "--output_dir", str(out), f'model.pretrained="{model}"',
            f'data.source_dir="{source}"', f'data.reference_dir="{reference}"', 'loss.identity_weights=""', *extra]


@pytest.mark.parametrize("name, form", [("v1-5.ckpt", "zip"), ("v1-5.pt", "legacy"), ("v1-5.bin", "raw")])
def test_base_model_pickle_is_refused_by_training(tmp_path, prepared_data, marker, capsys, name, form):
    model = write_hostile_pickle(tmp_path / name, marker, form)
    rc, err = _train(capsys, *_train_args(tmp_path / "out", model, *prepared_data))
    assert rc == 2
    assert_one_clean_line(err, "error: ", name, "refused")


def test_diffusers_folder_with_a_hostile_bin_is_refused(tiny_model, prepared_data, tmp_path, marker, capsys):
    import shutil

    folder = shutil.copytree(tiny_model[0], tmp_path / "sd_folder")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write_hostile_pickle(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    rc, err = _train(capsys, *_train_args(tmp_path / "out", folder, *prepared_data))
    assert rc == 2
    assert_one_clean_line(err, "error: ", "diffusion_pytorch_model.bin", REFUSED)


def test_arcface_and_resume_state_pickles_are_refused_by_training(tiny_model, prepared_data, tmp_path, marker, capsys):
    source, reference = prepared_data
    arcface = write_hostile_pickle(tmp_path / "w600k_r50.pth", marker)
    rc, err = _train(capsys, *_train_args(tmp_path / "a", tiny_model[0], source, reference,
                                          f'loss.identity_weights="{arcface}"'))
    assert rc == 2
    assert_one_clean_line(err, "error: loss.identity_weights", "w600k_r50.pth", REFUSED)

    ckpt = tmp_path / "b" / "checkpoint-p1-000002"
    ckpt.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(ckpt / "trainable.safetensors"))
    write_hostile_pickle(ckpt / "state.pt", marker, "legacy")
    rc, err = _train(capsys, "--resume", str(ckpt), *_train_args(tmp_path / "b", tiny_model[0], source, reference))
    assert rc == 2
    assert_one_clean_line(err, "error: ", "state.pt", REFUSED)


def test_bisenet_pickle_is_refused_by_prepare(tmp_path, marker, capsys):
    from dataset_tools.prepare import main

    (tmp_path / "in").mkdir()
    photo_like().save(tmp_path / "in" / "a.png")
    weights = write_hostile_pickle(tmp_path / "79999_iter.pth", marker)
    assert main(["source", str(tmp_path / "in"), str(tmp_path / "out"), "--parser-weights", str(weights)]) == 2
    captured = capsys.readouterr()
    assert_one_clean_line(captured.err, "error: ", "79999_iter.pth", REFUSED)
    assert not list((tmp_path / "out").glob("*.json"))


@pytest.mark.parametrize("restore, flag", [("none", "--sr-weights"), ("gfpgan", "--weights"), ("codeformer", "--weights")])
def test_restorer_and_upscaler_pickles_are_refused_by_postprocess(tmp_path, marker, capsys, restore, flag):
    from library.postprocess.__main__ import main

    photo_like().save(tmp_path / "a.png")
    weights = write_hostile_pickle(tmp_path / f"{restore}.pth", marker)
    assert main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--restore", restore, flag, str(weights)]) == 2
    assert_one_clean_line(capsys.readouterr().err, "postprocess: error: ", f"{restore}.pth", REFUSED)
    assert not (tmp_path / "b.png").exists()


def _trained_run(tmp_path: Path, model: Path | str = "unused-model") -> Path:
    """A config and an output folder holding what training writes: a LoRA and two embeddings."""
    out = tmp_path / "run"
    out.mkdir()
    save_file({"lora_unet_x.alpha": torch.tensor(4.0)}, str(out / "run.safetensors"))
    for word in ("mcv1", "mcv2"):
        save_file({"emb_params": torch.zeros(1, 32)}, str(out / f"{word}.safetensors"))
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\npretrained = "{Path(model).as_posix()}"\n[output]\ndir = "{out.as_posix()}"\nname = "run"\n')
    return config


def _generate(capsys, *argv: str) -> tuple[int, str]:
    import generate

    return _run_main(generate.main, capsys, argv)


@pytest.mark.parametrize("flag", ["--sr-weights", "--restore-weights"])
def test_postprocessing_pickles_are_refused_by_generate(tmp_path, marker, capsys, flag):
    config = _trained_run(tmp_path)
    weights = write_hostile_pickle(tmp_path / "weights.pth", marker, "raw" if flag == "--sr-weights" else "zip")
    rc, err = _generate(capsys, "--config", str(config), "--n", "1", "--device", "cpu", flag, str(weights))
    assert rc == 2
    line = assert_one_clean_line(err, "error: ", "weights.pth", "refused")
    assert not (tmp_path / "run" / "generated").exists(), line


def test_legacy_embedding_pickle_is_refused_by_generate(tiny_model, tmp_path, marker, capsys):
    config = _trained_run(tmp_path, tiny_model[0])
    (tmp_path / "run" / "mcv1.safetensors").unlink()
    write_hostile_pickle(tmp_path / "run" / "mcv1.pt", marker, "legacy", "exec")
    rc, err = _generate(capsys, "--config", str(config), "--n", "1", "--device", "cpu", "--no-lora")
    assert rc == 2
    assert_one_clean_line(err, "error: ", "mcv1.pt", f"{REFUSED} exec")


# --------------------------------------------------------------------------------- lying safetensors

_MEASURE = r"""
import json, resource, sys, tracemalloc
from pathlib import Path
from library.training.checkpoint import CheckpointInfo, load_checkpoint
from library.export.kohya import load_embedding, load_lora
from library.models.loading import load_stable_diffusion
from library.postprocess import load_upscaler
from library.generation.trained_files import read_embedding

root = Path(sys.argv[1])
loaders = {
    "model": lambda p: load_stable_diffusion(str(p)),
    "lora": load_lora,
    "embedding": load_embedding,
    "generate_embedding": lambda p: read_embedding("mcv1", p, None),
    "checkpoint": lambda p: load_checkpoint(CheckpointInfo(p.parent, 1, 1)),
    "upscaler": load_upscaler,
}
for name, load in loaders.items():  # warm-up: first-call imports are not what is measured
    try:
        load(root / "warmup" / "checkpoint-p1-000001" / "trainable.safetensors")
    except Exception:
        pass
results = []
for case in sorted(p for p in root.iterdir() if p.name != "warmup"):
    path = case / "checkpoint-p1-000001" / "trainable.safetensors"
    for name, load in loaders.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        try:
            load(path)
            outcome = ("loaded", "")
        except BaseException as err:
            outcome = (type(err).__name__, str(err))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        results.append([case.name, name, *outcome, grown * 1024, peak])
print(json.dumps(results))
"""

_ERRORS = {"model": "ModelLoadError", "lora": "WeightsFileError", "embedding": "WeightsFileError",
           "generate_embedding": "GenerationError", "checkpoint": "CheckpointError", "upscaler": "ValueError"}


def test_lying_safetensors_headers_are_refused_without_allocating_what_they_claim(tmp_path):
    """Each loader, in a fresh process whose peak memory is its current memory: max RSS grows by less
    than 64 MB and Python allocations peak under 8 MB while the headers claim 1 GiB to 2**82 bytes."""
    lies = lying_safetensors("emb_params")
    for case, (data, _claim) in {**lies, "warmup": (next(iter(lies.values()))[0], "")}.items():
        folder = tmp_path / case / "checkpoint-p1-000001"
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(data)
        torch.save({"step": 1}, folder / "state.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(lies) * len(_ERRORS)
    for case, loader, kind, msg, rss_growth, py_peak in results:
        assert kind == _ERRORS[loader], (case, loader, kind, msg)
        assert "\n" not in msg and "trainable.safetensors" in msg, (case, loader, msg)
        assert rss_growth < 64 * 2**20 and py_peak < 8 * 2**20, (case, loader, rss_growth, py_peak)


@pytest.mark.parametrize("lie", sorted(lying_safetensors("x")))
def test_lying_safetensors_through_training_and_generate(tmp_path, prepared_data, capsys, lie):
    """As the base model (training) and as the trained LoRA (generate.py): exit 2, one line."""
    model = tmp_path / "sd15.safetensors"
    model.write_bytes(lying_safetensors("model.diffusion_model.input_blocks.0.0.weight")[lie][0])
    rc, err = _train(capsys, *_train_args(tmp_path / "out", model, *prepared_data))
    assert rc == 2
    assert_one_clean_line(err, "error: ", "sd15.safetensors", "not a readable .safetensors file")

    config = _trained_run(tmp_path)
    (tmp_path / "run" / "run.safetensors").write_bytes(lying_safetensors("bundle_emb.mcv1.emb_params")[lie][0])
    rc, err = _generate(capsys, "--config", str(config), "--n", "1", "--device", "cpu")
    assert rc == 2
    assert_one_clean_line(err, "error: ", "run.safetensors", "not a readable .safetensors file")


def test_lying_embedding_and_checkpoint_through_the_entry_points(tiny_model, prepared_data, tmp_path, capsys):
    config = _trained_run(tmp_path, tiny_model[0])
    (tmp_path / "run" / "mcv2.safetensors").write_bytes(lying_safetensors("emb_params")["offsets_past_end"][0])
    rc, err = _generate(capsys, "--config", str(config), "--n", "1", "--device", "cpu", "--no-lora")
    assert rc == 2
    assert_one_clean_line(err, "error: ", "mcv2.safetensors", "not a readable .safetensors file")

    ckpt = tmp_path / "out" / "checkpoint-p2-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.safetensors").write_bytes(lying_safetensors("new_vectors")["absurd_shape"][0])
    torch.save({"step": 1}, ckpt / "state.pt")
    source, reference = prepared_data
    rc, err = _train(capsys, "--resume", *_train_args(tmp_path / "out", tiny_model[0], source, reference))
    assert rc == 2
    assert_one_clean_line(err, "error: ", "trainable.safetensors", "not a readable .safetensors file")


# ------------------------------------------------------------------------------ decompression bombs


def test_image_claiming_100000_squared_pixels_is_refused_per_file(tmp_path, capsys, caplog):
    from dataset_tools.images import ImageLoadError, load_image
    from dataset_tools.prepare import main as prepare_main
    from library.training.data import load_prepared_folder
    from library.postprocess.__main__ import main as postprocess_main
    from testkit.tiny import write_prepared

    src = tmp_path / "in"
    src.mkdir()
    for name, data in BOMBS.items():
        (src / name).write_bytes(data)
        assert len(data) < 200
        with pytest.raises(ImageLoadError, match=r"^image too large \(10000 MP, over the \d+ MP decompression-bomb limit\)"):
            load_image(src / name)
    photo_like().save(src / "good.png")

    # dataset_tools.prepare (reference: a picture without a face is used as all style): one line per bomb
    assert prepare_main(["reference", str(src), str(tmp_path / "prep")]) == 0
    out = capsys.readouterr().out
    for name in BOMBS:
        lines = [line for line in out.splitlines() if name in line]
        assert len(lines) == 1 and "too large" in lines[0], out
    assert (tmp_path / "prep" / "good.json").is_file() and not (tmp_path / "prep" / "bomb.json").exists()

    # the post-processing CLI: one error line per bomb, the good image written, exit 1 (some failed)
    assert postprocess_main([str(src), str(tmp_path / "pp"), "--restore", "none", "--upscale", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sorted(line.split(":")[0] for line in error_lines(err) if "summary" not in line) == sorted(BOMBS), err
    assert sorted(p.name for p in (tmp_path / "pp").iterdir()) == ["good.png"]

    # the trainer's reader of prepared folders: a bomb in place of one image is a warning, the rest load
    folder = write_prepared(tmp_path / "prepared", "source", "mcv1")
    (folder / "img1.png").write_bytes(BOMBS["bomb.png"])
    with caplog.at_level(logging.WARNING, logger="library.training.data"):
        items = load_prepared_folder(folder, "source", 64)
    assert [item.name for item in items] == ["img0", "img2"]
    warned = [r.getMessage() for r in caplog.records if "img1.png" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "skipped" in warned[0]
    with Image.open(folder / "img0.png") as im:
        assert im.size == (96, 96)
