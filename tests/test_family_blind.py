"""The training loop never tests which model family it trains: every difference is asked of the family
(library/models/family.py and the objects it builds). The loop modules are grepped for family names."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOP = ["library/training/" + name for name in (
    "trainer.py", "identity_term.py", "data.py", "prompting.py", "trainables.py", "previews.py", "losses.py",
    "batching.py", "trained.py", "outputs.py", "step_log.py", "capture.py", "learning_checks.py",
    "training_scores.py", "checkpoint.py")] + ["train_magicapture.py"]
NAMES = ("sd1", "sdxl", "zimage", "z_image", "z-image", "flux", "klein", "is_sdxl", "text_encoder_2", "sd15", "sd 1.x")


def family_names(text: str) -> list[str]:
    """The family names in `text`, case-insensitive, wherever they stand (code, comments, docstrings)."""
    return [m.group(0) for m in re.finditer("|".join(re.escape(n) for n in NAMES), text, re.IGNORECASE)]


def test_the_grep_finds_names_where_they_are():
    assert family_names('if family.name == "sdxl": x = parts.text_encoder_2  # SD 1.x, FLUX.2 Klein') == [
        "sdxl", "text_encoder_2", "SD 1.x", "FLUX", "Klein"]
    assert family_names("family.encode_prompt(self.text_encoders, ids); sd1x = 0")[:1] == ["sd1"]
    assert family_names("self.family.predict(model, noisy, t, cond)") == []


def test_the_loop_names_no_family():
    found = {path: family_names((ROOT / path).read_text(encoding="utf-8")) for path in LOOP}
    assert {path: names for path, names in found.items() if names} == {}


def test_the_family_answers_the_conditioning():
    """Size ids only where the family takes them (the numbers: test_trainer_sdxl's rule by hand); the
    denoiser call built by the family: SD 1.x passes no added conditioning, SDXL pooled + size ids."""
    import torch

    from library.models.family import SD1, SDXL

    assert SD1.size_ids((120, 200), (53, 0, 120), 64) is None
    assert SDXL.size_ids((120, 200), (53, 0, 120), 64).tolist() == [120, 200, 0, 28, 64, 64]
    calls = []

    def model(noisy, t, hidden, added_cond_kwargs=None):
        calls.append((hidden, added_cond_kwargs))
        return type("Out", (), {"sample": noisy * 2})()

    x, h, pooled, ids = torch.ones(2, 4, 8, 8), torch.zeros(2, 77, 8), torch.ones(2, 16), torch.arange(12.0).view(2, 6)
    assert torch.equal(SD1.predict(model, x, torch.tensor([1, 2]), {"hidden": h}), x * 2)
    assert calls[-1][0] is h and calls[-1][1] is None
    SDXL.predict(model, x, torch.tensor([1, 2]), {"hidden": h, "pooled": pooled, "size_ids": ids})
    assert calls[-1][1]["text_embeds"] is pooled and torch.equal(calls[-1][1]["time_ids"], ids)


def test_latents_follow_the_vae_config():
    """(mean - shift) * scale and back; SD's VAEs have no shift_factor (0)."""
    from types import SimpleNamespace

    import torch

    from library.models.family import SD1

    sd = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5, shift_factor=None))
    dit = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5, shift_factor=0.25))
    mean = torch.tensor([1.0, 2.0])
    assert SD1.latents_from_vae(sd, mean).tolist() == [0.5, 1.0]
    assert SD1.latents_from_vae(dit, mean).tolist() == [0.375, 0.875]  # (1 - 0.25) / 2, (2 - 0.25) / 2
    assert SD1.latents_to_vae(dit, torch.tensor([0.375, 0.875])).tolist() == [1.0, 2.0]
