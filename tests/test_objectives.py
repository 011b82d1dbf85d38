"""The families' prediction objectives (library/models/objectives.py): values worked out by hand, and the
flow-matching noise levels against the schedule diffusers' own scheduler and pipelines produce."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from library.models.objectives import (EpsilonObjective, FlowMatchObjective, Flux2FlowMatchObjective,
                                       calculate_shift, empirical_mu)
from library.training.losses import masked_reconstruction_loss


# ------------------------------------------------------------------------------------------ flow matching
X0 = torch.tensor([[[[1.0, 2.0]]]])  # [1, 1, 1, 2]
NOISE = torch.tensor([[[[3.0, -1.0]]]])


def test_flow_target_is_velocity_and_its_loss():
    obj = FlowMatchObjective()
    v = obj.target(X0, NOISE)
    assert v.flatten().tolist() == [2.0, -3.0]  # noise - x0
    # a zero prediction misses by v: mean(2^2, 3^2) = 6.5 (epsilon would give mean(9, 1) = 5)
    loss = masked_reconstruction_loss(torch.zeros_like(v), v, torch.ones(1, 1, 1, 2), area_normalize=False)
    assert loss.tolist() == [6.5]


def test_flow_noisy_latents_and_x0_from_velocity():
    obj = FlowMatchObjective()
    sigma = torch.tensor([0.25])
    x_t = obj.add_noise(X0, NOISE, sigma)
    assert x_t.flatten().tolist() == [1.5, 1.25]  # 0.75 x0 + 0.25 noise
    v = torch.tensor([[[[2.0, -3.0]]]])
    assert obj.x0(x_t, v, sigma).flatten().tolist() == [1.0, 2.0]  # x_t - 0.25 v
    assert obj.model_timesteps(torch.tensor([0.25])).tolist() == [250.0]


def test_flow_shift_values_by_hand():
    static = FlowMatchObjective(shift=3.0)  # 3u / (1 + 2u)
    assert static.sigmas(torch.tensor([0.25, 0.5, 1.0])).tolist() == pytest.approx([0.5, 0.75, 1.0])
    dynamic = FlowMatchObjective(mu=math.log(3.0))  # e^mu / (e^mu + 1/u - 1) = 3 / (3 + 1) at u = 0.5
    assert dynamic.sigmas(torch.tensor([0.5])).item() == pytest.approx(0.75)
    linear = FlowMatchObjective(mu=3.0, time_shift_type="linear")
    assert linear.sigmas(torch.tensor([0.5])).item() == pytest.approx(0.75)
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(2176) == pytest.approx(0.825)  # half-way
    # FLUX.2 at 4096 tokens, 50 steps: m200 = 1.15000, m10 = 2.25625, mu = m200 - 150 (m200 - m10) / 190
    m200, m10 = 0.00016927 * 4096 + 0.45666666, 8.73809524e-05 * 4096 + 1.89833333
    assert empirical_mu(4096, 50) == pytest.approx(m200 - 150 * (m200 - m10) / 190)
    assert empirical_mu(4096, 50) == pytest.approx(2.02335, abs=1e-4)
    assert empirical_mu(5000, 50) == pytest.approx(0.00016927 * 5000 + 0.45666666)


def test_flow_below_is_a_fraction_of_the_schedule():
    obj = FlowMatchObjective(shift=3.0)
    # id_max_timestep 500 of 1000: u < 0.5, i.e. sigma < 0.75 after the shift
    assert obj.below(torch.tensor([0.7, 0.75, 0.8]), 500).tolist() == [True, False, False]


def _pipeline_sigmas(scheduler, n: int, mu: float | None) -> np.ndarray:
    """The sigmas the pipelines set with n steps: ``sigmas = linspace(1, 1/n, n)`` then the scheduler's shift."""
    kwargs = {"mu": mu} if mu is not None else {}
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n).tolist(), **kwargs)
    return scheduler.sigmas[:-1].numpy()


def test_flow_levels_match_the_zimage_pipeline_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift as zimage_shift

    # Z-Image's scheduler: a static shift of 3 (the pipeline passes mu, which a static shift ignores)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    obj = FlowMatchObjective.from_scheduler(sched, image_seq_len=4096)
    assert obj.mu is None
    expected = _pipeline_sigmas(sched, 1000, zimage_shift(4096))
    grid = torch.arange(1000, 0, -1) / 1000
    assert np.allclose(obj.sigmas(grid).numpy(), expected, atol=1e-6)
    levels = obj.sample_levels(4000, 1000, torch.Generator().manual_seed(0))
    assert np.isin(levels.numpy(), expected).all()
    low = obj.sample_levels(4000, 250, torch.Generator().manual_seed(0))
    assert low.max().item() <= 0.5 + 1e-6  # u <= 0.25 -> sigma <= 3 * 0.25 / 1.5
    assert (obj.sample_levels(10, 1, torch.Generator()) == expected[-1]).all()


def test_flow_levels_match_the_dynamic_shift_pipelines():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift as pipeline_shift

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    grid = torch.arange(1000, 0, -1) / 1000
    flux = FlowMatchObjective.from_scheduler(sched, image_seq_len=1024)
    assert flux.mu == pytest.approx(pipeline_shift(1024))
    assert np.allclose(flux.sigmas(grid).numpy(), _pipeline_sigmas(sched, 1000, pipeline_shift(1024)), atol=1e-6)
    klein = Flux2FlowMatchObjective.from_scheduler(sched, image_seq_len=4096)
    assert klein.mu == pytest.approx(compute_empirical_mu(4096, 50))
    assert np.allclose(klein.sigmas(grid).numpy(), _pipeline_sigmas(sched, 1000, compute_empirical_mu(4096, 50)),
                       atol=1e-5)


# ---------------------------------------------------------------------------------------------- epsilon
def test_epsilon_objective_by_hand():
    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=4),
                            alphas_cumprod=torch.tensor([1.0, 0.25, 0.5, 0.75]))
    obj = EpsilonObjective(sched)
    x_t, eps = torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    # (1 - sqrt(0.75)) / sqrt(0.25) = 2 - sqrt(3)
    assert obj.x0(x_t, eps, torch.tensor([1])).item() == pytest.approx(2 - math.sqrt(3))
    assert obj.target(X0, NOISE) is NOISE
    assert obj.below(torch.tensor([1, 2, 3]), 3).tolist() == [True, True, False]
    # the draws SD runs have always made: randint(0, max_timestep) from the trainer's generator
    drawn = obj.sample_levels(6, 3, torch.Generator().manual_seed(5))
    assert drawn.tolist() == torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(5)).tolist()


def test_levels_at_one_point_of_the_schedule():
    assert FlowMatchObjective(shift=3.0).levels_at(2, 500).tolist() == pytest.approx([0.75, 0.75])
    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000), alphas_cumprod=torch.ones(1000))
    assert EpsilonObjective(sched).levels_at(2, 500).tolist() == [500, 500]
