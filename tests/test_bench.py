"""Issue 12: the paper-schedule benchmark (its projection arithmetic and a 2-step dry run), the step path's
freedom from host reads between logging steps, the stage clock, and the speed switches."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from library.config import ConfigError, load_config
from library.training.optim import adam_kernel, build_optimizer
from library.training.speed import compile_enabled
from library.training.step_log import FigureSums, StepLog, logs_due
from library.training.timing import StageClock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import paper_schedule as ps  # noqa: E402


# ------------------------------------------------------------------ projection arithmetic, by hand
def test_scaled_run_and_event_counts():
    # the SD 1.5 config: 1200 + 1500 steps, previews and checkpoints every 500
    assert ps.scaled_steps(1200, 0.17) == 204 and ps.scaled_steps(1500, 0.17) == 255  # 204.0, 255.0
    assert ps.scaled_steps(1200, 0.002) == 2 and ps.scaled_steps(1500, 0.002) == 3  # 2.4 -> 2, 3.0 -> 3
    assert ps.scaled_steps(1200, 0.0001) == 2  # never fewer than a first step and a timed one
    assert ps.scaled_every(500, 0.17) == 85 and ps.scaled_every(500, 0.0001) == 1 and ps.scaled_every(0, 0.5) == 0
    # previews: phase 1 at 500, 1000 and its end (1200); phase 2 at 500, 1000, 1500
    assert ps.preview_count(1, 1200, 500) == 3 and ps.preview_count(2, 1500, 500) == 3
    assert ps.preview_count(1, 1000, 500) == 2  # the end falls on a multiple: no extra one
    # checkpoints: 500, 1000 and the phase's end
    assert ps.checkpoint_count(1200, 500) == 3 and ps.checkpoint_count(1500, 500) == 3
    assert ps.checkpoint_count(1000, 500) == 2 and ps.checkpoint_count(7, 0) == 1


def test_projection_from_a_scaled_run():
    # phase 1: 204 steps in 30 s, the first 6 s -> 6 + 24 x 1199 / 203 = 147.7537 s
    assert ps.project_phase(30.0, 6.0, 204, 1200) == pytest.approx(6 + 24 * 1199 / 203)
    assert ps.project_phase(10.0, 4.0, 1, 1500) == pytest.approx(15000.0)  # one step: plain scaling
    timings = {"seconds": {"load": 20.0, "cache": 3.0, "setup": 2.0, "phase1": 30.0, "phase2": 60.0,
                           "previews": 12.0, "checkpoints": 1.5, "export": 0.5},
               "first_step_seconds": {"phase1": 6.0, "phase2": 9.0}}
    run = {"phase1": 204, "phase2": 255, "previews": 6, "checkpoints": 3}
    full = {"phase1": 1200, "phase2": 1500, "previews": 6, "checkpoints": 6}
    out = ps.project(timings, full, run)
    p1 = 6 + 24 * 1199 / 203  # 147.754
    p2 = 9 + 51 * 1499 / 254  # 309.980
    assert out["phase1"] == pytest.approx(p1) and out["phase2"] == pytest.approx(p2)
    assert out["previews"] == pytest.approx(12.0) and out["checkpoints"] == pytest.approx(3.0)  # 0.5 s x 6
    assert out["total"] == pytest.approx(20 + 3 + 2 + 0.5 + p1 + p2 + 12 + 3)


def test_break_even_of_a_lever_with_a_warm_up():
    # compile: 90 s of warm-up against 2 s eager, 211 instead of 234 ms a step -> 88 / 0.023 = 3826.1 -> 3827
    assert ps.break_even_steps({"ms_per_step": 234.0, "warmup_s": 2.0}, {"ms_per_step": 211.0, "warmup_s": 90.0}) == "3827"
    assert ps.break_even_steps({"ms_per_step": 200.0, "warmup_s": 2.0}, {"ms_per_step": 210.0, "warmup_s": 2.0}) == "never"
    assert ps.break_even_steps({"ms_per_step": 200.0, "warmup_s": 2.0}, {"ms_per_step": 150.0, "warmup_s": 1.0}) == "0"


# ------------------------------------------------------------------ the command
def test_help():
    res = subprocess.run([sys.executable, "bench/paper_schedule.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "--steps-scale" in res.stdout and "--levers" in res.stdout


def test_two_step_dry_run_writes_every_stage(tmp_path):
    report_path = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "bench/paper_schedule.py", "--tiny", "--tiny-resolution", "64", "--steps-scale", "0.002",
         "--work", str(tmp_path / "work"), "--json", str(report_path), "sample.steps=2", "sample.n=1",
         "logging.tensorboard=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads(report_path.read_text())["schedule"]
    assert set(s["measured_seconds"]) == set(ps.STAGES) and set(s["projected_seconds"]) == set(ps.STAGES) | {"total"}
    assert s["projected"] is True and s["peak_gib"] == "n/a"
    # 0.002 x (1200, 1500) = 2.4, 3.0 steps; previews and checkpoints every round(0.002 x 500) = 1 step:
    # previews after each step (2 + 3), checkpoints after each step (2 + 3) - counted by the trainer's clock
    assert s["run_steps"] == {"phase1": 2, "phase2": 3, "previews": 5, "checkpoints": 5}
    assert s["full_steps"] == {"phase1": 1200, "phase2": 1500, "previews": 6, "checkpoints": 6}
    assert all(s["measured_seconds"][k] > 0 for k in ps.STAGES)
    timings = json.loads((tmp_path / "work" / "out_magicapture_sd15" / "timings.json").read_text())
    assert timings["steps"] == {"phase1": 2, "phase2": 3}
    assert s["rates"]["phase2"]["samples_per_s"] == pytest.approx(4 * 3 / timings["seconds"]["phase2"])


def test_sdxl_dry_run_trains_the_sdxl_single_file(tmp_path):
    """--family sdxl: the same public path on an SDXL single file (the tiny one here; SDXL 1.0 shapes on a GPU)."""
    report_path = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "bench/paper_schedule.py", "--tiny", "--family", "sdxl", "--config", "configs/magicapture_sdxl.toml",
         "--tiny-resolution", "64", "--steps-scale", "0.002", "--work", str(tmp_path / "work"), "--json", str(report_path),
         "sample.every=0", "logging.tensorboard=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["model"] == "tiny SDXL 1.0-shaped (CPU, relative only)"
    out = tmp_path / "work" / "out_magicapture_sdxl"
    assert json.loads((out / "timings.json").read_text())["steps"] == {"phase1": 2, "phase2": 3}
    from safetensors import safe_open

    with safe_open(str(out / "magicapture_sdxl.safetensors"), framework="pt") as f:  # kohya's SDXL text-encoder prefixes
        assert {k.split("_text_model")[0] for k in f.keys() if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}


# ------------------------------------------------------------------ the step path
@pytest.fixture
def phase2_trainer(tiny_model, prepared_data, tmp_path):
    from tests.test_trainer import make_config
    from library.training.trainer import MagiCaptureTrainer

    cfg = make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0", "output.save_every=0",
                      "phase2.steps=4", "logging.every=4", "logging.print_every=4", "logging.tensorboard=false",
                      "phase2.batch_size=3", "loss.id_max_timestep=1000")
    return MagiCaptureTrainer(cfg)


# functions documented to work on host tensors only (the batch before it moves to the device)
HOST_PLANNING = {"plan", "face_window", "set_token_positions", "token_positions", "sample_tensors"}
READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__")


def test_a_step_reads_nothing_back_from_the_device(phase2_trainer, monkeypatch):
    """Between logging steps no trainer code reads a tensor on the host (each read is a GPU sync);
    the figures come back in one transfer at the logging step. Reads by host-planning functions on the
    batch's host tensors are allowed (listed above); reads inside torch, diffusers and peft are not ours."""
    trainer = phase2_trainer
    library = str(ROOT / "library")
    calls: list[str] = []
    active = {"on": False}

    def counting(name, real):
        def method(self, *args, **kwargs):
            if active["on"]:
                frame = sys._getframe(1)
                where = frame.f_code.co_filename
                if where.startswith(library) and frame.f_code.co_name not in HOST_PLANNING:
                    calls.append(f"{Path(where).name}:{frame.f_lineno} {frame.f_code.co_name} .{name}")
            return real(self, *args, **kwargs)
        return method

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    real_step = trainer.optimizer_step

    def step(*args, **kwargs):
        active["on"] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            active["on"] = False

    monkeypatch.setattr(trainer, "optimizer_step", step)
    trainer.run_phase(2, 0, None, None)
    assert calls == []
    assert [h["step"] for h in trainer.history] == [1, 2, 3, 4]  # every step still logged, read at step 4
    assert all(set(h) >= {"loss", "mask", "attn", "id"} for h in trainer.history)


def test_phase1_computes_no_weight_gradients(tiny_model, prepared_data, tmp_path):
    from tests.test_trainer import make_config
    from library.training.trainer import MagiCaptureTrainer

    trainer = MagiCaptureTrainer(make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0"))
    pcfg, optimizer, scheduler, sampler, params = trainer.setup_phase(1)
    trainable = [n for m in (trainer.unet, trainer.text_encoder, trainer.vae) for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("embeddings.token_embedding.new_vectors")
    assert not any("lora_" in n for m in (trainer.unet, trainer.text_encoder) for n, _ in m.named_parameters())
    trainer.optimizer_step(sampler.draw(pcfg.batch_size), 0, 1, pcfg, optimizer, scheduler, params)
    with_grad = [n for m in (trainer.unet, trainer.text_encoder, trainer.vae) for n, p in m.named_parameters() if p.grad is not None]
    assert with_grad == []  # zero_grad(set_to_none) ran, and no frozen weight ever had one
    assert [len(g["params"]) for g in optimizer.param_groups] == [1]


# ------------------------------------------------------------------ figures, clock, switches
def test_figures_average_over_micro_batches_and_token_holders():
    sums = FigureSums()
    t = torch.tensor
    nan = float("nan")
    sums.add({"loss": t(1.0), "inside/mcv1": t(0.2), "_count/mcv1": t(2.0), "outside/mcv2": t(nan), "_count/mcv2": t(0.0),
              "inside/mcv3": t(nan), "_count/mcv3": t(0.0)})
    sums.add({"loss": t(3.0), "inside/mcv1": t(0.5), "_count/mcv1": t(1.0), "outside/mcv2": t(0.7), "_count/mcv2": t(1.0),
              "inside/mcv3": t(0.9), "_count/mcv3": t(0.0)})
    log = StepLog()
    log.add(2, 7, 1e-4, sums)
    (entry,) = log.take()
    assert (entry.phase, entry.step, entry.lr) == (2, 7, 1e-4)
    # loss: (1 + 3) / 2; inside/mcv1: (0.2 x 2 + 0.5 x 1) / 3 = 0.3; outside/mcv2: the NaN of the micro-batch
    # without mcv2 stays out -> 0.7; inside/mcv3: no sample held mcv3 -> absent
    assert entry.figures == pytest.approx({"loss": 2.0, "inside/mcv1": 0.3, "outside/mcv2": 0.7})
    assert log.take() == []


def test_stage_clock_counts_nested_stages_once(monkeypatch):
    ticks = iter([0.0, 3.0, 7.0, 10.0, 12.0, 15.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    clock = StageClock()
    with clock.stage("phase2"):  # 0 .. 10, with a preview 3 .. 7 inside
        with clock.stage("previews"):
            pass
    with clock.stage("export"):  # 12 .. 15
        pass
    assert clock.seconds == {"phase2": 6.0, "previews": 4.0, "export": 3.0}
    assert clock.counts == {"phase2": 1, "previews": 1, "export": 1}


def test_adam_runs_fused_on_cuda_and_multi_tensor_elsewhere():
    cuda = SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)
    cpu = torch.zeros(2, requires_grad=True)
    assert adam_kernel([cuda, cuda]) == {"fused": True}
    assert adam_kernel([cuda, cpu]) == {"foreach": True} and adam_kernel([cpu]) == {"foreach": True}
    opt = build_optimizer(load_config(None, ['optimizer.name="AdamW"'], check_paths=False).optimizer, [{"params": [cpu]}])
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")


def test_compile_switch():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # auto: CUDA, and steps x 0.023 s saved > 60 s of compilation, i.e. from 2609 steps on
    assert compile_enabled("auto", cuda, 2609) and not compile_enabled("auto", cuda, 2608)
    assert not compile_enabled("auto", cuda, 1500) and not compile_enabled("auto", cpu, 100_000)
    assert compile_enabled("on", cpu, 1) and not compile_enabled("off", cuda, 100_000)
    with pytest.raises(ConfigError, match="train.compile"):
        compile_enabled("yes", cpu, 10)
    assert load_config(None, ["train.compile=true"], check_paths=False).train.compile == "on"  # the old bool
    assert load_config(None, [], check_paths=False).train.compile == "auto"
    with pytest.raises(ConfigError, match=r"train.compile = 'fast': use auto, on or off"):
        load_config(None, ['train.compile="fast"'])


def test_figures_are_read_at_logging_steps_only():
    cfg = load_config(None, ["logging.every=10", "logging.print_every=25", "output.save_every=40",
                             "output.save_lora_every=63"], check_paths=False)
    # multiples of 10, 25, 40 and (phase 2) 63 up to the last step
    assert [d for d in range(1, 101) if logs_due(cfg, 2, d, 100, False)] == [10, 20, 25, 30, 40, 50, 60, 63, 70, 75, 80, 90, 100]
    assert [d for d in range(1, 98) if logs_due(cfg, 1, d, 97, False)][-4:] == [75, 80, 90, 97]  # 63: phase 2 only
    assert logs_due(cfg, 1, 7, 100, True) and not logs_due(cfg, 1, 7, 100, False)  # a preview or a stop request
