"""Diffusers module names of the Z-Image and FLUX.2 transformers -> the names of the original checkpoints,
which ComfyUI's models use (its "native" names).

Read from ComfyUI's own conversion tables, which go the other way (diffusers -> native):

* Z-Image (ComfyUI's Lumina2 / NextDiT model, comfy/ldm/lumina/model.py): ``comfy/utils.py``,
  ``z_image_to_diffusers``: ``{layers,noise_refiner,context_refiner}.N.attention.to_q/to_k/to_v`` are the
  three row slices [0, dim), [dim, 2 dim), [2 dim, 3 dim) of ``attention.qkv``; ``attention.to_out.0`` is
  ``attention.out``; ``attention.norm_q/norm_k`` are ``attention.q_norm/k_norm``;
  ``all_final_layer.2-1.*`` is ``final_layer.*``, ``all_x_embedder.2-1`` is ``x_embedder``; every other
  name (``feed_forward.w1/w2/w3``, ``adaLN_modulation.0``, the norms, ``cap_embedder``, ``t_embedder``)
  is the same. diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers`` (loaders/
  single_file_utils.py) is the same table, inverted.
* FLUX.2 (ComfyUI's Flux model, comfy/ldm/flux/model.py and layers.py: DoubleStreamBlock's ``img_attn.qkv``,
  ``img_attn.proj``, ``img_mlp.0/2`` and the ``txt_`` twins, SingleStreamBlock's ``linear1``/``linear2``):
  diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers`` (loaders/single_file_utils.py) gives
  the table: ``transformer_blocks.N.attn.to_q/k/v`` are the thirds of ``double_blocks.N.img_attn.qkv``,
  ``add_q/k/v_proj`` of ``txt_attn.qkv``; the single blocks' ``attn.to_qkv_mlp_proj`` is already one
  matrix (``linear1``); QK-norm weights are ``...norm.query_norm.scale``; ``norm_out.linear`` is
  ``final_layer.adaLN_modulation.1`` with its (scale, shift) halves swapped to (shift, scale).

:func:`native_module` is the one place that maps a module name; :func:`transformer_to_native` converts a
whole state dict with it (the tiny models' ComfyUI-style files), and the LoRA exporter
(library/export/dit_lora.py) names LoRA modules with it.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

ZIMAGE, FLUX2 = "zimage", "flux2"  # transformer architectures (ModelKind.family of klein4b / klein9b is flux2's)

_QKV = {"q": 0, "k": 1, "v": 2}
_BLOCKS = r"(layers|noise_refiner|context_refiner)\.(\d+)"
_ZIMAGE_RULES: tuple[tuple[str, str], ...] = (
    (_BLOCKS + r"\.attention\.to_out\.0", r"\1.\2.attention.out"),
    (_BLOCKS + r"\.attention\.norm_q", r"\1.\2.attention.q_norm"),
    (_BLOCKS + r"\.attention\.norm_k", r"\1.\2.attention.k_norm"),
    (r"all_final_layer\.2-1\.(.+)", r"final_layer.\1"),
    (r"all_x_embedder\.2-1", "x_embedder"),
)
_FLUX2_RULES: tuple[tuple[str, str], ...] = (
    (r"x_embedder", "img_in"),
    (r"context_embedder", "txt_in"),
    (r"time_guidance_embed\.timestep_embedder\.linear_1", "time_in.in_layer"),
    (r"time_guidance_embed\.timestep_embedder\.linear_2", "time_in.out_layer"),
    (r"time_guidance_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer"),
    (r"time_guidance_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer"),
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear", r"\1.lin"),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),
    (r"proj_out", "final_layer.linear"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q", r"double_blocks.\1.img_attn.norm.query_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k", r"double_blocks.\1.img_attn.norm.key_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q", r"double_blocks.\1.txt_attn.norm.query_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k", r"double_blocks.\1.txt_attn.norm.key_norm"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
    (r"transformer_blocks\.(\d+)\.ff\.linear_in", r"double_blocks.\1.img_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff\.linear_out", r"double_blocks.\1.img_mlp.2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_in", r"double_blocks.\1.txt_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_out", r"double_blocks.\1.txt_mlp.2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", r"single_blocks.\1.linear1"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_out", r"single_blocks.\1.linear2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q", r"single_blocks.\1.norm.query_norm"),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k", r"single_blocks.\1.norm.key_norm"),
)
# FLUX.2's RMSNorm keeps its weight as `scale` in the original layout
_FLUX2_SCALE = re.compile(r".*\.(query_norm|key_norm)$")
# diffusers' AdaLayerNormContinuous is (scale, shift); the original final layer is (shift, scale)
_SWAPPED = "final_layer.adaLN_modulation.1"


def native_module(arch: str, module: str) -> tuple[str, int | None]:
    """(native module name, index in its fused q/k/v matrix or None) of diffusers transformer module `module`.

    `arch`: ZIMAGE or FLUX2. The index i of a fused projection says that the module's output rows are the
    i-th third of the native matrix (q = 0, k = 1, v = 2, the order of ComfyUI's slices). Names without a
    rule are the same in both layouts. ValueError for another `arch`.
    """
    if arch == ZIMAGE:
        found = re.fullmatch(_BLOCKS + r"\.attention\.to_([qkv])", module)
        if found:
            return f"{found[1]}.{found[2]}.attention.qkv", _QKV[found[3]]
        rules = _ZIMAGE_RULES
    elif arch == FLUX2:
        found = re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.(to_|add_)([qkv])(_proj)?", module)
        if found and (found[2] == "to_") == (found[4] is None):
            stream = "img_attn" if found[2] == "to_" else "txt_attn"
            return f"double_blocks.{found[1]}.{stream}.qkv", _QKV[found[3]]
        rules = _FLUX2_RULES
    else:
        raise ValueError(f"unknown transformer architecture {arch!r}; expected {ZIMAGE!r} or {FLUX2!r}")
    for pattern, replacement in rules:
        if re.fullmatch(pattern, module):
            return re.sub(f"^{pattern}$", replacement, module), None
    return module, None


def _swap_halves(value: torch.Tensor) -> torch.Tensor:
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_native(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image / FLUX.2 transformer state dict in the original (ComfyUI) layout, without prefix:
    q/k/v concatenated in that order along the output rows, FLUX.2's QK-norm weights as ``.scale``, its
    final modulation's halves swapped. The inverse of diffusers' single-file converters (a test loads the
    result back through them)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if not module:  # a bare parameter (Z-Image's x_pad_token / cap_pad_token)
            out[key] = value.contiguous()
            continue
        name, index = native_module(arch, module)
        if arch == FLUX2 and param == "weight" and _FLUX2_SCALE.fullmatch(name):
            param = "scale"
        if arch == FLUX2 and name == _SWAPPED:
            value = _swap_halves(value)
        if index is None:
            out[f"{name}.{param}"] = value.contiguous()
        else:
            fused.setdefault(f"{name}.{param}", {})[index] = value
    for key, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"{key}: q/k/v parts {sorted(parts)} of 3; the state dict is incomplete")
        out[key] = torch.cat([parts[0], parts[1], parts[2]], dim=0).contiguous()
    return out
