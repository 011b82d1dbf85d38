"""A Z-Image / FLUX.2 Klein LoRA in the layout ComfyUI and diffusers both load: ComfyUI's native module names,
with the q/k/v LoRAs of a fused projection fused exactly.

Names: ``diffusion_model.`` + the native module (library/models/dit_keys.py). comfy/lora.py
``model_lora_keys_unet`` maps every weight ``diffusion_model.<module>.weight`` of the loaded model to the
LoRA name ``diffusion_model.<module>`` ("generic lora format"), and ``load_lora`` reads under that name
``.lora_up/.lora_down``, ``.lora_B/.lora_A`` or ``.lora.up/.lora.down`` weights and an optional ``.alpha``
(delta = alpha / rank x up @ down; without alpha, up @ down). Which of these each family's file uses is
set by what diffusers' converters accept (diffusers/loaders/lora_conversion_utils.py):

* Z-Image: ``.lora.down.weight`` / ``.lora.up.weight`` / ``.alpha``. ``_convert_non_diffusers_z_image_lora_to_diffusers``
  splits a fused ``attention.qkv`` LoRA into to_q/to_k/to_v only in this spelling (the ``lora_down`` /
  ``lora_A`` spellings keep ``attention.qkv``, which the diffusers model does not have).
* FLUX.2: ``.lora_A.weight`` / ``.lora_B.weight``, no alpha (folded into up): ``Flux2LoraLoaderMixin``
  sends ``lora_down`` files to its kohya converter (``lora_unet_*`` names only), and
  ``_convert_non_diffusers_flux2_lora_to_diffusers`` (ai-toolkit's ``diffusion_model.`` layout) refuses
  alpha keys.

Fusion (:func:`fuse_lora`): LoRAs on q, k, v (ranks r_i, scales s_i = alpha_i / r_i) become one LoRA on
the fused matrix of rank R = sum r_i: down = [dq; dk; dv] (rows stacked), up = block-diagonal of
(s_q uq, s_k uk, s_v uv) / s, alpha = s R, with s = s_q; so up @ down x alpha / R stacks the three
deltas s_i u_i d_i, exactly. Both converters split such a file back by copying the down to each of q/k/v
and cutting the up into thirds along its rows, which gives back [0 .. u_i .. 0] @ [dq; dk; dv] = u_i d_i.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from library.files.atomic import write_safetensors
from library.models.dit_family import DitFamily
from library.models.dit_keys import ZIMAGE, native_module

PREFIX = "diffusion_model."


@dataclass(frozen=True)
class LoraPiece:
    """One LoRA: delta W = alpha / rank x up @ down; down [rank, in], up [out, rank]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """alpha / rank x up @ down, [out, in] (zero for rank 0)."""
        if self.rank == 0:
            return torch.zeros(self.up.shape[0], self.down.shape[1], dtype=self.down.dtype)
        return self.alpha / self.rank * (self.up @ self.down)


def fuse_lora(parts: list[LoraPiece]) -> LoraPiece:
    """The LoRA on the row-stacked matrix [W_0; W_1; ...] whose delta is the stacked deltas of `parts`
    (module docstring): rank sum r_i, down stacked, up block-diagonal with each part's scale relative to
    the first non-empty part's folded in. ValueError if the parts' input widths differ."""
    if len({p.down.shape[1] for p in parts}) != 1:
        raise ValueError(f"cannot fuse LoRAs of input widths {[p.down.shape[1] for p in parts]}")
    scales = [p.alpha / p.rank for p in parts if p.rank]
    scale = scales[0] if scales else 1.0
    ups = [p.up * (p.alpha / p.rank / scale) if p.rank else p.up for p in parts]
    rank = sum(p.rank for p in parts)
    return LoraPiece(down=torch.cat([p.down for p in parts], dim=0), up=torch.block_diag(*ups), alpha=scale * rank)


def native_pieces(pieces: Mapping[str, LoraPiece], arch: str) -> dict[str, LoraPiece]:
    """diffusers module name -> LoRA, as native module name -> LoRA: q/k/v of one fused native matrix fused
    in q, k, v order (a part without a LoRA counts as rank 0). ValueError if two modules map to one
    unfused native name."""
    out: dict[str, LoraPiece] = {}
    groups: dict[str, dict[int, LoraPiece]] = {}
    for module, piece in pieces.items():
        name, index = native_module(arch, module)
        if index is None:
            if name in out:
                raise ValueError(f"two LoRA modules map to the native name {name}")
            out[name] = piece
        else:
            groups.setdefault(name, {})[index] = piece
    for name, parts in groups.items():
        some = next(iter(parts.values()))
        empty = LoraPiece(down=some.down[:0], up=some.up[:, :0], alpha=0.0)
        out[name] = fuse_lora([parts.get(i, empty) for i in range(3)])
    return out


def dit_lora_state_dict(pieces: Mapping[str, LoraPiece], family: DitFamily,
                        dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors of the exported file (module docstring) from diffusers-named LoRAs of `family`'s
    transformer. Z-Image: ``diffusion_model.<native>.lora.down.weight`` [R, in], ``.lora.up.weight``
    [out, R], ``.alpha`` (0-dim); FLUX.2: ``diffusion_model.<native>.lora_A.weight`` [R, in],
    ``.lora_B.weight`` [out, R] with alpha / R folded into it."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        out[key] = value.detach().to(device="cpu", dtype=dtype).contiguous()

    for name, piece in sorted(native_pieces(pieces, family.arch).items()):
        if family.arch == ZIMAGE:
            put(f"{PREFIX}{name}.lora.down.weight", piece.down)
            put(f"{PREFIX}{name}.lora.up.weight", piece.up)
            put(f"{PREFIX}{name}.alpha", torch.tensor(float(piece.alpha)))
        else:
            put(f"{PREFIX}{name}.lora_A.weight", piece.down)
            put(f"{PREFIX}{name}.lora_B.weight", piece.up * (piece.alpha / piece.rank))
    return out


def peft_pieces(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraPiece]:
    """The peft LoRA layers of `model` (adapter `adapter_name`) as module path -> LoraPiece; ValueError if
    there are none, NotImplementedError for DoRA or LoRA bias (no LoRA file holds them here)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter_name, False) or getattr(layer, "lora_bias", {}).get(adapter_name, False):
            raise NotImplementedError(f"{path}: DoRA / LoRA bias layers are not exported")
        rank = layer.r[adapter_name]
        # peft's scaling is alpha / r (alpha / sqrt(r) with rsLoRA): the file's alpha is scaling x r
        out[path] = LoraPiece(down=layer.lora_A[adapter_name].weight.detach(), up=layer.lora_B[adapter_name].weight.detach(),
                              alpha=float(layer.scaling[adapter_name]) * rank)
    if not out:
        raise ValueError(f"no LoRA layers of adapter {adapter_name!r} found to export")
    return out


def dit_lora_metadata(family: DitFamily, title: str, date: str, rank: int, alpha: float) -> dict[str, str]:
    """The metadata naming the base, as musubi-tuner writes it for these families
    (library/models/dit_family.py): ``modelspec.architecture`` = ``<architecture>/lora``, its
    implementation, resolution and title, and kohya's ``ss_base_model_version`` / ``ss_network_*``."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.architecture}/lora",
        "modelspec.implementation": family.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{family.resolution}x{family.resolution}",
        "modelspec.date": date,
        "ss_base_model_version": family.base_model_version,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }


def save_dit_lora(path: str | os.PathLike, pieces: Mapping[str, LoraPiece], family: DitFamily,
                  metadata: Mapping[str, str], dtype: torch.dtype = torch.float16) -> None:
    """Write :func:`dit_lora_state_dict` with `metadata` (string values) as a .safetensors, atomically."""
    write_safetensors(path, dit_lora_state_dict(pieces, family, dtype), metadata=dict(metadata))
