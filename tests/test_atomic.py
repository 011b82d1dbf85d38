"""The one atomic writer (library.files.atomic): outputs get the mode an ordinary file gets from the umask
(safetensors' save_file and mkstemp create 0600 files, and a rename keeps the mode), and a failing writer
leaves nothing under the final name and no temporary behind.

The end-to-end test runs, under umask 022 and 002, a short training run on the tiny model (LoRA,
embeddings .safetensors and .pt, checkpoints, effective_config.toml, samples, attention pictures and
JSON, TensorBoard logs), generation with an upscale (PNGs, raw/, grid), the post-processing CLI and
dataset_tools.prepare, and checks the mode of every file and folder they wrote.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from library.files.atomic import atomic_folder, atomic_path, write_atomic, write_bytes, write_text


@pytest.fixture
def umask():
    """Set the process umask for one test (returns the setter); the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                          (0o077, 0o600, 0o700)], ids=["022", "002", "077"])
def test_files_and_folders_get_the_umask_mode(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    st = tmp_path / "lora.safetensors"
    write_atomic(st, lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))  # save_file alone makes 0600
    text = write_text(tmp_path / "effective_config.toml", "[model]\n")
    with atomic_folder(tmp_path / "checkpoint-p1-000002") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp / "trainable.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        torch.save({"step": 2}, tmp / "sub" / "state.pt")
    ckpt = tmp_path / "checkpoint-p1-000002"
    assert [_mode(p) for p in (st, text, ckpt / "trainable.safetensors", ckpt / "sub" / "state.pt")] == [file_mode] * 4
    assert (_mode(ckpt), _mode(ckpt / "sub")) == (folder_mode, folder_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-p1-000002", "effective_config.toml",
                                                         "lora.safetensors"]
    assert text.read_text("utf-8") == "[model]\n"


def test_an_existing_file_or_folder_is_replaced_whole(tmp_path, umask):
    umask(0o022)
    path = write_bytes(tmp_path / "a.bin", b"old")
    os.chmod(path, 0o600)
    write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o644
    with atomic_folder(tmp_path / "ck") as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_folder(tmp_path / "ck") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "ck"]  # nothing moved aside is left


# --------------------------------------------------------------------------------------- failures


class Boom(Exception):
    pass


def _partial_then(exc: BaseException):
    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise exc
    return writer


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), Boom("encoder failed"), KeyboardInterrupt()],
                         ids=["disk-full", "writer-error", "ctrl-c"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-old"])
def test_a_failing_writer_leaves_no_file_and_no_temporary(tmp_path, exc, existing):
    path = tmp_path / "mcv1.safetensors"
    if existing:
        path.write_bytes(b"the good old file")
    with pytest.raises(type(exc)):
        write_atomic(path, _partial_then(exc))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["mcv1.safetensors"] if existing else [])
    if existing:
        assert path.read_bytes() == b"the good old file"


def test_a_failing_rename_or_empty_writer_leaves_nothing(tmp_path, monkeypatch):
    def no_rename(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="cross-device"):
        write_bytes(tmp_path / "a.png", b"png")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):  # a writer that removed its file: nothing to move into place
        with atomic_path(tmp_path / "b.png") as tmp:
            tmp.unlink()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_folder_block_leaves_the_old_folder(tmp_path):
    with atomic_folder(tmp_path / "checkpoint-p2-000004") as tmp:
        (tmp / "state.pt").write_bytes(b"good")
    with pytest.raises(Boom):
        with atomic_folder(tmp_path / "checkpoint-p2-000004") as tmp:
            (tmp / "state.pt").write_bytes(b"hal")
            raise Boom
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "checkpoint-p2-000006") as tmp:
            (tmp / "trainable.safetensors").write_bytes(b"hal")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-p2-000004"]
    assert (tmp_path / "checkpoint-p2-000004" / "state.pt").read_bytes() == b"good"


# -------------------------------------------------------------------- every output of every tool


def _tree_modes(root: Path) -> dict[str, int]:
    modes = {".": _mode(root)}
    for p in sorted(root.rglob("*")):
        modes[str(p.relative_to(root)) + ("/" if p.is_dir() else "")] = _mode(p)
    return modes


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)],
                         ids=["022", "002"])
def test_every_output_gets_the_umask_mode(tiny_model, prepared_data, tmp_path, umask, mask, file_mode, folder_mode):
    from dataset_tools.prepare import prepare_folder
    from library.postprocess import __main__ as postprocess_cli
    from library.config import load_config
    from library.generation.pipeline import generate
    from testkit.tiny import save_random_arcface
    from library.training.trainer import MagiCaptureTrainer

    folder, _ = tiny_model
    source, reference = prepared_data
    arcface = save_random_arcface(tmp_path / "arcface.pth")
    umask(mask)
    out = tmp_path / "out"
    cfg = load_config("configs/test_tiny.toml", [
        f'model.pretrained="{folder}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f'output.dir="{out}"', f'loss.identity_weights="{arcface}"', "sample.every=3", "output.embeddings_pt=true",
    ])
    MagiCaptureTrainer(cfg).run()
    generate(cfg, n=2, seed=5, steps=2, width=64, height=64, upscale=2, device="cpu", progress=False)
    rc = postprocess_cli.main([str(out / "generated" / "raw" / "00000-5.png"), str(out / "restored.jpg"),
                               "--restore", "none", "--upscale", "1"])
    assert rc == 0

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(photos / "style.png")
    prepared = tmp_path / "prepared"
    assert prepare_folder("reference", photos, prepared).used == ["style.png"]

    modes = {**{f"out/{k}": v for k, v in _tree_modes(out).items()},
             **{f"prepared/{k}": v for k, v in _tree_modes(prepared).items()}}
    expected_some = {"out/magicapture.safetensors", "out/mcv1.safetensors", "out/mcv2.pt", "out/effective_config.toml",
                     "out/loss_history.jsonl", "out/checkpoint-p2-000002/", "out/checkpoint-p2-000002/state.pt",
                     "out/checkpoint-p2-000002/trainable.safetensors", "out/samples/p2-000003.png",
                     "out/attention/p2-000003.json", "out/attention/p2-000003.png", "out/generated/00001-6.png",
                     "out/generated/grid-00000.png", "out/generated/raw/00000-5.png", "out/restored.jpg",
                     "prepared/style.png", "prepared/style.mask.png", "prepared/style.txt", "prepared/style.json",
                     "prepared/preview/style.jpg", "prepared/preview/contact.jpg"}
    assert expected_some <= set(modes), sorted(expected_some - set(modes))
    assert any(k.startswith("out/logs/") and not k.endswith("/") for k in modes)  # TensorBoard's files too
    wrong = {k: oct(v) for k, v in modes.items() if v != (folder_mode if k.endswith(("/", "/.")) else file_mode)}
    assert wrong == {}
    assert not [k for k in modes if Path(k).name.startswith(".") and k not in ("out/.", "prepared/.")]  # no temporaries
