"""Which modules of a Stable Diffusion UNet a LoRA preset covers (full module names, for peft's exact
matches): model knowledge, so that a model family can answer it (ModelFamily.lora_target_modules) and the
training code (library/training/lora.py) can add the layers.

Presets (docs/method.md, phase 2):
- ``cross_attn`` (paper): ``attn2.to_q / to_k / to_v / to_out.0`` of every transformer block of the UNet.
- ``attn_geglu`` (released code): ``to_q / to_k / to_v / to_out.0`` of ``attn1`` and ``attn2``, plus
  ``ff.net.0.proj`` (the GEGLU projection).
- ``kohya_all`` (kohya's default LoRA network for SD 1.x): every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside the
  UNet's ``Transformer2DModel`` blocks.
"""

from __future__ import annotations

from torch import nn

LORA_TARGET_PRESETS: dict[str, str] = {
    "cross_attn": "attn2 to_q/to_k/to_v/to_out.0 of every UNet transformer block (paper)",
    "attn_geglu": "attn1 and attn2 to_q/to_k/to_v/to_out.0 plus ff.net.0.proj (released code)",
    "kohya_all": "every Linear and 1x1 Conv2d inside the UNet's Transformer2DModel blocks (kohya's default)",
}


_ATTN_PARTS = ("to_q", "to_k", "to_v", "to_out.0")



def is_lora_internal(name: str) -> bool:
    """Modules peft creates inside a LoRA layer (not targets of their own)."""
    parts = name.split(".")
    return any(p.startswith("lora_") or p == "base_layer" for p in parts)


def _transformer_models(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]


def _is_kohya_module(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _wanted(rel: str, preset: str, module: nn.Module) -> bool:
    """Does the module at `rel` (relative to a Transformer2DModel) belong to the preset?"""
    parts = rel.split(".")
    if preset == "kohya_all":
        # a peft-wrapped target (second call) is a LoraLayer around the Linear/Conv2d
        base = getattr(module, "base_layer", module)
        return _is_kohya_module(base)
    if len(parts) < 3 or parts[0] != "transformer_blocks":
        return False
    tail = ".".join(parts[3:])
    attn = parts[2]
    if preset == "cross_attn":
        return attn == "attn2" and tail in _ATTN_PARTS
    if preset == "attn_geglu":
        if attn in ("attn1", "attn2") and tail in _ATTN_PARTS:
            return True
        return ".".join(parts[2:]) == "ff.net.0.proj"
    raise AssertionError(preset)


def unet_lora_target_modules(unet: nn.Module, preset: str) -> list[str]:
    """Full module names (in module order) of the UNet layers the preset puts a LoRA on."""
    if preset not in LORA_TARGET_PRESETS:
        raise ValueError(
            f"unknown LoRA target preset {preset!r}; valid presets: {', '.join(sorted(LORA_TARGET_PRESETS))}"
        )
    names: list[str] = []
    for tname, tmodel in _transformer_models(unet):
        for rel, module in tmodel.named_modules():
            if not rel or is_lora_internal(rel):
                continue
            if _wanted(rel, preset, module):
                names.append(f"{tname}.{rel}")
    if not names:
        raise ValueError(f"preset {preset!r} selected no module: is this a Stable Diffusion UNet with transformer blocks?")
    return names
