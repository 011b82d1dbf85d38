"""Names in the original single-file layout (Stability's generative-models "SGM" / CompVis LDM) against
diffusers' names, for the UNet of SD 1.x and SDXL and for SDXL's two text encoders.

UNet: diffusers groups the network by level (``down_blocks.1.attentions.0``); the original numbers the
blocks in one running sequence (``input_blocks.4.1``): ``input_blocks.0`` is conv_in, then per level one
block per layer (``.0`` its resnet, ``.1`` its attention when the level has one) and one downsampler
block (``.0.op``) after every level but the last; ``middle_block.0/1/2`` are resnet, attention, resnet;
``output_blocks`` count the up levels the same way with one layer more each, the upsampler sitting after
the resnet (``.1``) or after the attention (``.2``) of a level's last block. Inside a resnet the
original keeps its Sequential indices (``in_layers.0`` = norm1, ``in_layers.2`` = conv1, ...). This is
the inverse of diffusers' ``convert_ldm_unet_checkpoint`` and the naming kohya's SDXL LoRA files use
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``).

Text encoders in an SDXL file: ``conditioner.embedders.0.transformer.text_model.*`` is CLIP-L in
transformers' own naming; ``conditioner.embedders.1.model.*`` is OpenCLIP ViT-bigG in open_clip's naming
(q, k, v in one ``in_proj_weight``; ``text_projection`` stored as [hidden, projection], the transpose of
transformers' ``text_projection.weight``). The inverse of diffusers' ``convert_open_clip_checkpoint``.
"""

from __future__ import annotations

from typing import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's first text encoder
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's second text encoder

# modules outside the numbered blocks
_UNET_WHOLE = (
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),  # SDXL's pooled-text + size/crop embedding
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
# inside a resnet: diffusers' attribute -> the original Sequential index
_RESNET_PARTS = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _per_level(value: int | list[int], levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * levels


def unet_block_map(unet_config: Mapping) -> list[tuple[str, str]]:
    """(diffusers block path, original block path) for every numbered block of a UNet2DConditionModel.

    `unet_config`: the UNet's config (``unet.config`` or its config.json as a dict); read are
    ``down_block_types``, ``up_block_types`` (a "CrossAttn" type has attentions) and ``layers_per_block``
    (an int, or one per level). Resnets and attentions map to ``input_blocks.N.0`` / ``.N.1``; samplers to
    the module holding their conv (``down_blocks.0.downsamplers.0.conv`` -> ``input_blocks.3.0.op``,
    ``up_blocks.0.upsamplers.0`` -> ``output_blocks.2.2``).
    """
    down, up = list(unet_config["down_block_types"]), list(unet_config["up_block_types"])
    layers = _per_level(unet_config["layers_per_block"], len(down))
    pairs: list[tuple[str, str]] = []
    index = 1  # input_blocks.0 is conv_in
    for level, kind in enumerate(down):
        for j in range(layers[level]):
            pairs.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0"))
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1"))
            index += 1
        if level < len(down) - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1
    pairs += [("mid_block.resnets.0", "middle_block.0"), ("mid_block.attentions.0", "middle_block.1"),
              ("mid_block.resnets.1", "middle_block.2")]
    index = 0
    for level, (kind, n) in enumerate(zip(up, reversed(layers))):
        cross = "CrossAttn" in kind
        for j in range(n + 1):  # an up level has one layer more than its down level
            pairs.append((f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0"))
            if cross:
                pairs.append((f"up_blocks.{level}.attentions.{j}", f"output_blocks.{index}.1"))
            if j == n and level < len(up) - 1:
                pairs.append((f"up_blocks.{level}.upsamplers.0", f"output_blocks.{index}.{2 if cross else 1}"))
            index += 1
    return pairs


def _rename(path: str, pairs: list[tuple[str, str]], resnet_parts: tuple[tuple[str, str], ...]) -> str | None:
    """`path` with its longest matching block prefix renamed (and a resnet's parts); None if none matches."""
    best = None
    for src, dst in pairs:
        if (path == src or path.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    if best is None:
        return None
    src, dst = best
    rest = path[len(src):]
    if ".resnets." in src or ".resnets." in dst:  # the one block kind whose inner names differ
        for a, b in resnet_parts:
            if rest == "." + a or rest.startswith("." + a + "."):
                rest = "." + b + rest[len(a) + 1:]
                break
    return dst + rest


def sgm_unet_module_path(diffusers_path: str, unet_config: Mapping) -> str:
    """The original (SGM / LDM) name of a diffusers UNet module or parameter, without ``model.diffusion_model.``.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` -> ``input_blocks.4.1.transformer_blocks.0.attn2.to_k``
    for SDXL (kohya's ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``);
    ``down_blocks.0.resnets.0.conv1.weight`` -> ``input_blocks.1.0.in_layers.2.weight``. The block
    numbering comes from `unet_config` (see :func:`unet_block_map`); names inside attention blocks are
    the same in both layouts. Raises ValueError naming the path when it is no UNet module.
    """
    pairs = unet_block_map(unet_config) + list(_UNET_WHOLE)
    found = _rename(diffusers_path, pairs, _RESNET_PARTS)
    if found is None:
        raise ValueError(f"{diffusers_path!r} is not a module path of this UNet (diffusers naming, e.g. 'down_blocks.1.attentions.0')")
    return found


def diffusers_unet_module_path(sgm_path: str, unet_config: Mapping) -> str:
    """The inverse of :func:`sgm_unet_module_path`: ``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in``.

    `sgm_path` without ``model.diffusion_model.``; ValueError naming it when it is no UNet module.
    """
    pairs = [(b, a) for a, b in unet_block_map(unet_config) + list(_UNET_WHOLE)]
    found = _rename(sgm_path, pairs, tuple((b, a) for a, b in _RESNET_PARTS))
    if found is None:
        raise ValueError(f"{sgm_path!r} is not a module path of this UNet (original naming, e.g. 'input_blocks.4.1')")
    return found


def unet_to_sgm(state: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in the original layout, keys prefixed ``model.diffusion_model.``; tensors unchanged."""
    pairs = unet_block_map(unet_config) + list(_UNET_WHOLE)
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs, _RESNET_PARTS)
        if new is None:
            raise ValueError(f"{key!r} is not a parameter of this UNet")
        out[UNET_PREFIX + new] = value
    return out


def clip_to_sgm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict under `prefix` (``cond_stage_model.transformer.`` for SD 1.x,
    :data:`CLIP_L_PREFIX` for SDXL), with the ``text_model.`` level that files on disk keep (transformers 5
    dropped it from CLIPTextModel)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


_OPEN_CLIP_LAYER_PARTS = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
_OPEN_CLIP_WHOLE = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def open_clip_to_sgm(state: Mapping[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in open_clip's layout under `prefix`.

    Per layer N: q/k/v projections concatenated (q first) into ``transformer.resblocks.N.attn.in_proj_weight``
    [3 hidden, hidden] and ``in_proj_bias`` [3 hidden]; ``text_projection`` is [hidden, projection] (the
    transpose of ``text_projection.weight``). ValueError naming a key it does not know.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif name in _OPEN_CLIP_WHOLE:
            out[prefix + _OPEN_CLIP_WHOLE[name]] = value
        elif name.startswith("encoder.layers."):
            layer, rest = name[len("encoder.layers."):].split(".", 1)
            block = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                which, kind = rest[len("self_attn."):].split(".", 1)
                qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[which[0]] = value
                continue
            for a, b in _OPEN_CLIP_LAYER_PARTS:
                if rest.startswith(a):
                    out[block + b + rest[len(a):]] = value
                    break
            else:
                raise ValueError(f"{key!r}: not a CLIP text-encoder parameter")
        elif name != "embeddings.position_ids":  # a buffer older transformers saved; open_clip has none
            raise ValueError(f"{key!r}: not a CLIP text-encoder parameter")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def vae_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under ``first_stage_model.`` in the original layout (SD 1.x and SDXL
    VAEs share it: four levels, two resnets down, three up, 1x1-conv mid attention)."""
    prefixes = []
    for i in range(4):
        for j in range(2):
            prefixes.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        if i < 3:
            prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{3 - i}.upsample."))
        for j in range(3):
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}."))
    for part in ("encoder", "decoder"):
        for j in range(2):
            prefixes.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}."))
        prefixes.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        prefixes.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
    attn_parts = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in prefixes:
            if new.startswith(hf):
                new = sd + new[len(hf) :]
                break
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for hf, sd in attn_parts:
                new = new.replace("attn_1." + hf, "attn_1." + sd)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
                value = value[:, :, None, None]  # the original VAE uses 1x1 convolutions there
        out["first_stage_model." + new] = value
    return out
