"""Shared fixtures: the tiny SD 1.x model (built once per session) and small prepared data folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from library.models.tiny import write_prepared

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: one thread is faster than torch's pool, and immune to a busy CPU."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a test that asks for bf16 must not inherit an earlier "no"."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def model_loads(monkeypatch) -> dict[str, int]:
    """Counts base-model loads (``load_stable_diffusion``, where the trainer calls it): a refusal "before any
    work" must leave ``model_loads["n"]`` at 0."""
    import library.models.loading
    import library.training.trainer

    calls = {"n": 0}
    real = library.models.loading.load_stable_diffusion

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(library.models.loading, "load_stable_diffusion", counted)
    monkeypatch.setattr(library.training.trainer, "load_stable_diffusion", counted)
    return calls


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, original-layout single .safetensors) of the tiny SD 1.x model."""
    from library.models.tiny import save_model

    return save_model(tmp_path_factory.mktemp("model") / "tiny_sd")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, SGM-layout single .safetensors) of the tiny SDXL model, written by the command line
    `python -m library.models.tiny DEST --sdxl`."""
    from library.models.tiny import main

    dest = tmp_path_factory.mktemp("model") / "tiny_sdxl"
    assert main([str(dest), "--sdxl"]) == 0
    return dest, dest.with_suffix(".safetensors")


@pytest.fixture
def prepared_data(tmp_path) -> tuple[Path, Path]:
    return (write_prepared(tmp_path / "source", "source", "mcv1", seed=1),
            write_prepared(tmp_path / "reference", "reference", "mcv2", seed=2))


@pytest.fixture
def fake_python(tmp_path):
    """Stands in for the interpreter the page starts training with: ignores train_magicapture.py, says
    what it was given and sleeps until SIGTERM (tests of library/app's runs)."""
    script = tmp_path / "fake_python"
    script.write_text("#!/bin/sh\necho started \"$@\"\nexec sleep 30\n")
    script.chmod(script.stat().st_mode | 0o111)
    return str(script)
