"""The released recipe's schedule pieces, by hand: task mix, LR decay, the phase-1 norm pull, and the
attention-collapse guard with its figures."""

from __future__ import annotations

import math

import pytest
import torch

from library.training.attention_guard import BASELINE_STEPS, EMA_DECAY, AttentionCollapseGuard, attention_figures
from library.config import PhaseConfig
from library.training.data import TaskSampler
from library.training.optim import build_lr_scheduler
from library.training.tokens import pull_norms

TASKS = ["source", "reference", "composed"]


def _sampler(seed=3):
    return TaskSampler(TASKS, 5, 7, "mcv1", "mcv2", seed=seed)


# ------------------------------------------------------------------------------------------ tasks
@pytest.mark.parametrize("batch", [1, 2, 4, 5])
def test_task_mix_is_one_to_one_to_one_over_consecutive_steps(batch):
    sampler = _sampler()
    steps = [[s.task for s in sampler.draw(batch)] for _ in range(12)]
    # any 3 consecutive steps hold 3 * batch samples: exactly `batch` of each task
    for i in range(len(steps) - 2):
        window = sum(steps[i : i + 3], [])
        assert {t: window.count(t) for t in TASKS} == {t: batch for t in TASKS}, (batch, i, window)


def test_sampler_samples_and_resume():
    sampler = _sampler()
    first = sampler.draw(4)
    assert [s.task for s in first] == ["source", "reference", "composed", "source"]
    for s in first:
        assert 0 <= s.index < (5 if s.task == "source" else 7) and 0 <= s.id_source < 5
        assert ("mcv1" in s.prompt) == (s.task != "reference") and ("mcv2" in s.prompt) == (s.task != "source")
        if s.task == "source":
            assert s.id_source == s.index  # the identity target of a source sample is its own face (released)
    saved = sampler.state()
    ahead = [sampler.draw(4) for _ in range(3)]
    again = _sampler(seed=99)
    again.load_state(saved)
    assert [again.draw(4) for _ in range(3)] == ahead
    # a checkpoint of an earlier version held the bare RNG state: it still loads (cursor restarts)
    old = _sampler(seed=99)
    old.load_state(saved["rng"])
    assert old.cursor == 0 and [s.task for s in old.draw(4)] == ["source", "reference", "composed", "source"]


# ---------------------------------------------------------------------------------------------- LR
def _lr_after(pcfg: PhaseConfig, steps: int, base: float = 1e-4) -> float:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_lr_scheduler(pcfg, opt)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_default_lr_schedule_decays_linearly_to_zero():
    pcfg = PhaseConfig(steps=1500)
    assert pcfg.lr_scheduler == "linear" and pcfg.lr_warmup_steps == 0
    # lr(k) = 1e-4 * (1 - k / 1500)
    for k, want in ((0, 1e-4), (300, 8e-5), (750, 5e-5), (1499, 1e-4 / 1500), (1500, 0.0)):
        assert _lr_after(pcfg, k) == pytest.approx(want, abs=1e-12), k
    assert _lr_after(PhaseConfig(steps=1500, lr_scheduler="constant"), 750) == pytest.approx(1e-4)


# --------------------------------------------------------------------------------------- norm pull
def test_pull_norms_by_hand():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.2]])  # norms 5 and 0.2
    # rate 0.1: 5 + 0.1 (0.4 - 5) = 4.54; 0.2 + 0.1 (0.4 - 0.2) = 0.22; directions kept
    out = pull_norms(v, 0.4, 0.1)
    torch.testing.assert_close(out, torch.tensor([[3.0 * 4.54 / 5, 4.0 * 4.54 / 5], [0.0, 0.22]]))
    # rate 1 (the released min(1, 100 lr) at lr >= 1e-2): norms land on the target
    torch.testing.assert_close(pull_norms(v, 0.4, 1.0).norm(dim=-1), torch.tensor([0.4, 0.4]))


# ----------------------------------------------------------------------------------------- figures
def test_attention_figures_by_hand():
    # 2x2 maps, 2x2 masks (no resampling); two maps per token are averaged first
    maps = torch.tensor([[[[0.1, 0.3], [0.5, 0.1]], [[0.3, 0.1], [0.1, 0.1]]],   # [V1]: mean [[.2, .2], [.3, .1]]
                         [[[0.0, 0.4], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.4]]]])  # [V2]: mean [[0, .2], [0, .2]]
    maps = maps[None]  # [1 sample, 2 tokens, 2 maps, 2, 2]
    masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]).reshape(1, 2, 1, 2, 2)
    inside, outside, count = attention_figures(maps, masks, torch.tensor([[True, True]]))
    # [V1]: inside 0.2 / 1 pixel; outside (0.2 + 0.3 + 0.1) / 0.8 = 0.75. [V2]: inside 0.4 / 2 = 0.2; outside 0
    torch.testing.assert_close(inside, torch.tensor([0.2, 0.2]))
    torch.testing.assert_close(outside, torch.tensor([0.75, 0.0]))
    assert count.tolist() == [1.0, 1.0]
    # averaged over the samples where the token is present only
    two = torch.cat([maps, maps * 0.5])
    inside, outside, count = attention_figures(two, masks.expand(2, -1, -1, -1, -1), torch.tensor([[True, False], [True, True]]))
    torch.testing.assert_close(inside, torch.tensor([(0.2 + 0.1) / 2, 0.1]))
    torch.testing.assert_close(outside, torch.tensor([0.75, 0.0]))
    assert count.tolist() == [2.0, 1.0]


# ------------------------------------------------------------------------------------------- guard
def test_guard_trips_once_when_the_ema_falls_below_the_ratio():
    guard = AttentionCollapseGuard(["mcv1", "mcv2"], ratio=0.1)
    for _ in range(BASELINE_STEPS):
        assert guard.update({"mcv1": 1.0, "mcv2": 1.0}) == []
    assert guard.baseline("mcv1") == pytest.approx(1.0)
    # then mcv1 drops to 0.05: ema_n = 0.05 + 0.95 * 0.9^n < 0.1 first at n = 28 (0.9^27 = 0.058, 0.9^28 = 0.052 < 0.05 / 0.95)
    n_needed = next(n for n in range(1, 100) if 0.05 + 0.95 * EMA_DECAY**n < 0.1)
    assert n_needed == 28
    trips = []
    for n in range(1, 40):
        trips.append((n, guard.update({"mcv1": 0.05, "mcv2": 1.0})))
    assert [n for n, t in trips if t] == [28] and trips[27][1] == ["mcv1"]  # once, for mcv1 only
    assert guard.ema["mcv2"] == pytest.approx(1.0)


def test_guard_waits_for_its_baseline_ignores_absent_tokens_and_resumes():
    guard = AttentionCollapseGuard(["mcv1", "mcv2"], ratio=0.1)
    guard.update({"mcv1": 1.0})  # mcv2 absent from this step: not counted
    assert guard.counts == {"mcv1": 1, "mcv2": 0}
    for _ in range(BASELINE_STEPS - 2):
        guard.update({"mcv1": 1.0, "mcv2": 1.0})
    # before the baseline exists nothing trips, however low the values
    assert guard.update({"mcv1": 1e-9}) == [] and guard.baseline("mcv2") is None
    saved = guard.state()
    other = AttentionCollapseGuard(["mcv1", "mcv2"], ratio=0.1)
    other.load_state(saved)
    assert other.state() == saved
    assert AttentionCollapseGuard(["mcv1"], ratio=0.0).update({"mcv1": 0.0}) == []
    off = AttentionCollapseGuard(["mcv1"], ratio=0.0)
    for _ in range(BASELINE_STEPS + 50):
        assert off.update({"mcv1": 1.0 if off.counts["mcv1"] < BASELINE_STEPS else 0.0}) == []  # 0 = off
    assert math.isclose(off.baseline("mcv1"), 1.0)
