"""What a model family predicts and how its training noise is made: one small class per objective,
swappable like diffusers' schedulers, built from the family's scheduler (``ModelFamily.objective``).

Every objective answers the same questions, in the same units, so the training loop never asks which
one it has:
  * ``sample_levels(n, max_timestep, generator)``: the noise levels of n samples ([n], the objective's
    own unit: integer DDPM timesteps for :class:`EpsilonObjective`, sigmas in (0, 1] for
    :class:`FlowMatchObjective`); ``max_timestep`` counts training timesteps (out of
    ``num_train_timesteps``), so the same config value is a fraction of the schedule for flow models;
  * ``levels_at(n, timestep)``: n levels at one point of the schedule given in training timesteps;
  * ``add_noise(x0, noise, levels)``: the noisy latents x_t;
  * ``target(x0, noise)``: what the model's prediction is regressed on;
  * ``x0(x_t, prediction, levels)``: the clean latents the prediction implies (the identity term
    decodes them);
  * ``model_timesteps(levels)``: the timestep the denoiser is called with (the family's call may rescale
    it further: Z-Image wants ``1 - t / 1000``, FLUX.2 ``t / 1000``);
  * ``below(levels, timestep)``: bool [n], whether a level is under a threshold given in training
    timesteps (``loss.id_max_timestep``); for flow models the threshold is the fraction
    ``timestep / num_train_timesteps`` of the unshifted schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["EpsilonObjective", "FlowMatchObjective", "Flux2FlowMatchObjective", "calculate_shift",
           "empirical_mu", "tweedie_x0"]


def tweedie_x0(z_t: Tensor, eps_hat: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """x0_hat = (z_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t); a_t [B] (or a scalar) broadcast per sample.

    Computed in at least float32, returned in ``z_t``'s dtype."""
    ct = torch.promote_types(z_t.dtype, torch.float32)
    a = torch.as_tensor(alphas_cumprod_t, device=z_t.device).to(ct)
    if a.dim() > 0:
        a = a.reshape(-1, *([1] * (z_t.dim() - 1)))
    x0 = (z_t.to(ct) - (1.0 - a).sqrt() * eps_hat.to(ct)) / a.sqrt()
    return x0.to(z_t.dtype)


def _per_sample(levels: Tensor, like: Tensor) -> Tensor:
    """levels [B] -> [B, 1, ...] in `like`'s device and (at least float32) dtype, to broadcast over a sample."""
    ct = torch.promote_types(like.dtype, torch.float32)
    return levels.to(like.device, ct).reshape(-1, *([1] * (like.dim() - 1)))


class EpsilonObjective:
    """DDPM noise prediction (SD 1.x, SDXL): levels are integer timesteps t ~ U{0, ..., max_timestep - 1};
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (the scheduler's ``add_noise``); the target is the noise;
    x0 by Tweedie's formula (:func:`tweedie_x0`) with the scheduler's ``alphas_cumprod``."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod

    @classmethod
    def from_scheduler(cls, scheduler, image_seq_len: int) -> "EpsilonObjective":
        """The objective of `scheduler` (a DDPM-style scheduler with ``alphas_cumprod``); the image's
        sequence length does not change it."""
        return cls(scheduler)

    def to(self, device: torch.device) -> "EpsilonObjective":
        """Keep ``alphas_cumprod`` on `device` (x0 indexes it every step); returns self."""
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def sample_levels(self, n: int, max_timestep: int, generator: torch.Generator) -> Tensor:
        """[n] int64 timesteps ~ U{0, ..., max_timestep - 1}, drawn from `generator`."""
        return torch.randint(0, max_timestep, (n,), generator=generator)

    def levels_at(self, n: int, timestep: int) -> Tensor:
        """[n] int64, all `timestep`."""
        return torch.full((n,), timestep, dtype=torch.long)

    def add_noise(self, x0: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (diffusers' DDPM ``add_noise``)."""
        return self.scheduler.add_noise(x0, noise, levels)

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The noise (epsilon prediction)."""
        return noise

    def x0(self, x_t: Tensor, prediction: Tensor, levels: Tensor) -> Tensor:
        """Tweedie: (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)."""
        return tweedie_x0(x_t, prediction, self.alphas_cumprod[levels.to(self.alphas_cumprod.device)])

    def model_timesteps(self, levels: Tensor) -> Tensor:
        """The UNet takes the integer timestep itself."""
        return levels

    def below(self, levels: Tensor, timestep: int) -> Tensor:
        """levels < timestep."""
        return levels < timestep


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift, linear in the image's token count: base_shift at
    base_seq_len, max_shift at max_seq_len (diffusers' ``calculate_shift`` of the FLUX and Z-Image
    pipelines, read from the scheduler's ``base_image_seq_len`` ... ``max_shift`` config)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """mu of FLUX.2 (diffusers' ``compute_empirical_mu`` in ``pipeline_flux2_klein.py``): two lines in
    the token count, for 10 and 200 sampling steps, interpolated linearly in `num_steps`; above 4300
    tokens the 200-step line alone."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


class FlowMatchObjective:
    """Rectified flow (Z-Image, FLUX.2): x_t = (1 - sigma) x0 + sigma noise, the target is the velocity
    v = noise - x0 (what ``FlowMatchEulerDiscreteScheduler.step`` integrates), x0 = x_t - sigma v.

    Noise levels follow the schedule the family's diffusers pipeline samples with: a grid position
    u = k / N, k ~ U{1, ..., max_timestep} (N = ``num_train_timesteps``; the scheduler's training grid
    ``linspace(1, N, N) / N``), shifted as ``FlowMatchEulerDiscreteScheduler.set_timesteps`` shifts it:
    with ``use_dynamic_shifting``, the time shift of mu (exponential: e^mu / (e^mu + (1/u - 1)),
    linear: mu / (mu + (1/u - 1))), mu from the image's token count (:meth:`mu`); otherwise the static
    shift s u / (1 + (s - 1) u). The shift is monotone, so ``below`` compares grid positions.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None,
                 time_shift_type: str = "exponential") -> None:
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type is 'exponential' or 'linear', not {time_shift_type!r}")
        self.num_train_timesteps, self.shift, self.mu = int(num_train_timesteps), float(shift), mu
        self.time_shift_type = time_shift_type

    @classmethod
    def mu_for(cls, config: dict, image_seq_len: int) -> float:
        """mu for `image_seq_len` image tokens: :func:`calculate_shift` with the scheduler config's
        ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift`` (the Z-Image and FLUX.1
        pipelines' rule)."""
        return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    @classmethod
    def from_scheduler(cls, scheduler, image_seq_len: int) -> "FlowMatchObjective":
        """The objective a ``FlowMatchEulerDiscreteScheduler`` (its config) samples with at `image_seq_len`
        image tokens (the transformer's patches: (H / 16) (W / 16) at 2 x 2 patches of an 8x VAE)."""
        config = dict(scheduler.config)
        mu = cls.mu_for(config, image_seq_len) if config.get("use_dynamic_shifting") else None
        return cls(config.get("num_train_timesteps", 1000), config.get("shift", 1.0), mu,
                   config.get("time_shift_type", "exponential"))

    def to(self, device: torch.device) -> "FlowMatchObjective":
        """Nothing lives on a device; returns self."""
        return self

    def sigmas(self, u: Tensor) -> Tensor:
        """Grid positions u in (0, 1] -> shifted sigmas (see the class docstring), float32."""
        u = u.float()
        if self.mu is None:
            return self.shift * u / (1 + (self.shift - 1) * u)
        scale = math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu
        return scale / (scale + (1 / u - 1))

    def sample_levels(self, n: int, max_timestep: int, generator: torch.Generator) -> Tensor:
        """[n] float32 sigmas: u = k / N, k ~ U{1, ..., min(max_timestep, N)}, shifted (:meth:`sigmas`)."""
        k = torch.randint(1, min(max_timestep, self.num_train_timesteps) + 1, (n,), generator=generator)
        return self.sigmas(k / self.num_train_timesteps)

    def levels_at(self, n: int, timestep: int) -> Tensor:
        """[n] float32, the shifted sigma of u = timestep / N."""
        return self.sigmas(torch.full((n,), timestep / self.num_train_timesteps))

    def add_noise(self, x0: Tensor, noise: Tensor, levels: Tensor) -> Tensor:
        """x_t = (1 - sigma) x0 + sigma noise, in x0's dtype."""
        s = _per_sample(levels, x0)
        return ((1 - s) * x0.to(s.dtype) + s * noise.to(s.dtype)).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity v = noise - x0."""
        return noise - x0

    def x0(self, x_t: Tensor, prediction: Tensor, levels: Tensor) -> Tensor:
        """x0 = x_t - sigma v (at least float32 inside, returned in x_t's dtype)."""
        s = _per_sample(levels, x_t)
        return (x_t.to(s.dtype) - s * prediction.to(s.dtype)).to(x_t.dtype)

    def model_timesteps(self, levels: Tensor) -> Tensor:
        """sigma N, the scheduler's timesteps (the family's call rescales them for its transformer)."""
        return levels * self.num_train_timesteps

    def below(self, levels: Tensor, timestep: int) -> Tensor:
        """sigma < the shifted sigma of u = timestep / N: the sample's grid position is under that fraction."""
        return levels < self.sigmas(torch.tensor([timestep / self.num_train_timesteps])).to(levels.device)


class Flux2FlowMatchObjective(FlowMatchObjective):
    """FLUX.2 (Klein): mu from :func:`empirical_mu` at the pipeline's default step count instead of
    :func:`calculate_shift` (``Flux2KleinPipeline.__call__`` computes it so, num_inference_steps = 50)."""

    num_steps = 50

    @classmethod
    def mu_for(cls, config: dict, image_seq_len: int) -> float:
        """:func:`empirical_mu` (`image_seq_len`, :attr:`num_steps`)."""
        return empirical_mu(image_seq_len, cls.num_steps)
