"""Issue 8, item 6: the device and precision are said before any work, and a combination that cannot
train falls back (fp16 on a CPU -> fp32, with a warning line) or is refused in one line (bf16 on a CUDA
GPU without bf16) before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.config import ConfigError, TrainConfig
from library.training.precision import plan_precision
from testkit.tiny import save_random_arcface
from train_magicapture import main

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FALLBACK = ('warning: device: cpu, precision: fp32 instead of fp16 (train.mixed_precision = "fp16": torch cannot '
            'train in fp16 on a CPU, it fails at the first identity-loss step with "mixed dtype (CPU)"); '
            'set train.mixed_precision = "no" or "bf16" here, or train on a CUDA GPU for fp16')


def test_the_plan_for_each_device_and_precision():
    cuda = torch.device("cuda", 0)
    plans = {
        ("cpu", "no"): plan_precision("no", CPU),
        ("cpu", "bf16"): plan_precision("bf16", CPU, vae_fp32=True),
        ("cpu", "fp16"): plan_precision("fp16", CPU, vae_fp32=True),
        ("cuda", "fp16"): plan_precision("fp16", cuda, vae_fp32=True, device_name="cuda:0 (Tesla T4)"),
        ("cuda", "bf16"): plan_precision("bf16", cuda, bf16_supported=True, device_name="cuda:0 (NVIDIA H200)"),
        ("cuda", "no"): plan_precision("no", cuda, vae_fp32=True, device_name="cuda:0 (NVIDIA H200)"),
    }
    assert {k: (p.mixed_precision, p.line) for k, p in plans.items()} == {
        ("cpu", "no"): ("no", 'device: cpu, precision: fp32 (train.mixed_precision = "no")'),
        ("cpu", "bf16"): ("bf16", 'device: cpu, precision: bf16, VAE fp32 (train.mixed_precision = "bf16")'),
        ("cpu", "fp16"): ("no", FALLBACK),
        ("cuda", "fp16"): ("fp16", 'device: cuda:0 (Tesla T4), precision: fp16, VAE fp32 (train.mixed_precision = "fp16")'),
        ("cuda", "bf16"): ("bf16", 'device: cuda:0 (NVIDIA H200), precision: bf16 (train.mixed_precision = "bf16")'),
        ("cuda", "no"): ("no", 'device: cuda:0 (NVIDIA H200), precision: fp32 (train.mixed_precision = "no")'),
    }
    with pytest.raises(ConfigError) as info:
        plan_precision("bf16", cuda, bf16_supported=False, device_name="cuda:0 (Tesla V100-SXM2-16GB)")
    assert str(info.value) == (
        'train.mixed_precision = "bf16": cuda:0 (Tesla V100-SXM2-16GB) has no native bf16 (it needs compute '
        'capability 8.0 or newer); set train.mixed_precision = "fp16" (with train.vae_fp32 = true if images '
        'turn black) or "no"')


def _args(tiny_model, prepared_data, out: Path, *extra: str) -> list[str]:
    source, reference = prepared_data
    return ["--config", str(ROOT / "configs" / "test_tiny.toml"), f'model.pretrained="{tiny_model[0]}"',
            f'data.source_dir="{source}"', f'data.reference_dir="{reference}"', f'output.dir="{out}"', *extra]


def test_fp16_on_the_cpu_falls_back_to_fp32_before_any_work_and_finishes(tiny_model, prepared_data, tmp_path,
                                                                         capsys, monkeypatch):
    """low_vram.toml's fp16 on a machine without a GPU: the warning comes before the model is loaded, and
    the run (identity loss on, which is where CPU fp16 used to stop in phase 2) finishes in fp32 and records it."""
    import library.training.trainer

    said_before_loading = []
    load = library.training.trainer.load_base_model

    def watched_load(*args, **kwargs):
        said_before_loading.append(capsys.readouterr().out)
        return load(*args, **kwargs)

    monkeypatch.setattr(library.training.trainer, "load_base_model", watched_load)
    arcface = save_random_arcface(tmp_path / "arcface.pth")
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(_args(tiny_model, prepared_data, out, 'train.mixed_precision="fp16"', f'loss.identity_weights="{arcface}"',
                    "phase2.steps=2", "loss.id_max_timestep=1000"))
    assert rc == 0
    assert said_before_loading[0].splitlines() == [
        FALLBACK, "processes: 1; batch per process 2 / 3 (phase 1 / 2), effective 2 / 3 per optimiser step"]
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert any(h["phase"] == 2 and h.get("id", 0) > 0 for h in history), "the identity loss never ran"
    assert 'mixed_precision = "no"' in (out / "effective_config.toml").read_text()
    with safe_open(str(out / "magicapture.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_mixed_precision"] == "no"


def test_bf16_on_a_gpu_without_it_is_refused_in_one_line_before_any_work(tiny_model, prepared_data, tmp_path,
                                                                         capsys, monkeypatch):
    """A pre-Ampere GPU stands in through PartialState's device and the capability query."""
    import accelerate

    import library.training.precision
    import library.training.trainer

    class OldGpu:
        device = torch.device("cuda", 0)
        is_main_process = True
        num_processes = 1

        def __init__(self, **kwargs):  # PartialState(cpu=...)
            pass

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the precision was checked")

    monkeypatch.setattr(accelerate, "PartialState", OldGpu)
    monkeypatch.setattr(library.training.precision, "cuda_bf16_supported", lambda: False)
    monkeypatch.setattr(library.training.precision, "describe_device", lambda device: "cuda:0 (Tesla T4)")
    monkeypatch.setattr(library.training.trainer, "load_base_model", forbidden)
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(_args(tiny_model, prepared_data, out, 'train.mixed_precision="bf16"'))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        'error: train.mixed_precision = "bf16": cuda:0 (Tesla T4) has no native bf16 (it needs compute capability '
        '8.0 or newer); set train.mixed_precision = "fp16" (with train.vae_fp32 = true if images turn black) or "no"']
    assert not out.exists()


def test_settle_precision_records_what_runs():
    from library.training.precision import settle_precision

    train = TrainConfig(mixed_precision="fp16")
    plan = settle_precision(train)
    assert train.mixed_precision == plan.mixed_precision == ("fp16" if torch.cuda.is_available() else "no")
