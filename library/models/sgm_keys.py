"""diffusers UNet module paths -> the original (SGM / LDM) UNet's, as kohya names SDXL LoRA modules.

kohya sd-scripts trains SDXL on the original UNet layout, so its LoRA files name UNet modules by the
original paths (``input_blocks.4.1.transformer_blocks.0.attn2.to_k``), and every frontend reads them that
way. The original layout numbers its blocks in one running sequence, worked out here from the diffusers
UNet config's block layout (``down_block_types``, ``up_block_types``, ``layers_per_block``):

* ``input_blocks.0.0`` is ``conv_in``; then, per down level ``i`` and layer ``j``, one input block holding
  ``down_blocks.i.resnets.j`` at ``.0`` and ``down_blocks.i.attentions.j`` at ``.1``; after each level but
  the last, one block whose ``.0.op`` is ``down_blocks.i.downsamplers.0.conv``.
* ``middle_block.0`` / ``.1`` / ``.2``: ``mid_block.resnets.0``, ``mid_block.attentions.0``,
  ``mid_block.resnets.1``.
* per up level ``i`` and layer ``j`` (``layers_per_block + 1`` of them), one output block holding the
  resnet at ``.0``, the attention at ``.1``, and in the level's last block the upsampler (``.conv``) after
  them (``.2`` with attention, ``.1`` without).
* inside a resnet: ``norm1`` -> ``in_layers.0``, ``conv1`` -> ``in_layers.2``, ``time_emb_proj`` ->
  ``emb_layers.1``, ``norm2`` -> ``out_layers.0``, ``conv2`` -> ``out_layers.3``, ``conv_shortcut`` ->
  ``skip_connection``; inside an attention (``SpatialTransformer``) the names are diffusers' own.
* outside the blocks: ``time_embedding.linear_1/2`` -> ``time_embed.0/2``, ``add_embedding.linear_1/2`` ->
  ``label_emb.0.0/0.2``, ``conv_norm_out`` -> ``out.0``, ``conv_out`` -> ``out.2``.

For SDXL base (layers_per_block 2, three levels): ``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``,
``up_blocks.0.attentions.2`` -> ``output_blocks.2.1``, ``up_blocks.0.upsamplers.0`` -> ``output_blocks.2.2``.
"""

from __future__ import annotations

from typing import Any, Mapping

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _get(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, Mapping) else getattr(config, key)


def _per_level(value: Any, levels: int) -> list[int]:
    return [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def _resnet_tail(rest: list[str]) -> list[str]:
    if rest and rest[0] in _RESNET_PARTS:
        return _RESNET_PARTS[rest[0]].split(".") + rest[1:]
    return rest


def _block_map(unet_config: Any) -> dict[tuple[str, ...], tuple[list[str], str]]:
    """(diffusers block path parts) -> (SGM block path parts, kind: "resnet" | "attention" | "down" | "up")."""
    down_types = list(_get(unet_config, "down_block_types"))
    up_types = list(_get(unet_config, "up_block_types"))
    layers = _per_level(_get(unet_config, "layers_per_block"), len(down_types))
    out: dict[tuple[str, ...], tuple[list[str], str]] = {}
    n = 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            out[("down_blocks", str(i), "resnets", str(j))] = (["input_blocks", str(n), "0"], "resnet")
            if _has_attention(block_type):
                out[("down_blocks", str(i), "attentions", str(j))] = (["input_blocks", str(n), "1"], "attention")
            n += 1
        if i < len(down_types) - 1:
            out[("down_blocks", str(i), "downsamplers", "0")] = (["input_blocks", str(n), "0"], "down")
            n += 1
    out[("mid_block", "resnets", "0")] = (["middle_block", "0"], "resnet")
    out[("mid_block", "attentions", "0")] = (["middle_block", "1"], "attention")
    out[("mid_block", "resnets", "1")] = (["middle_block", "2"], "resnet")
    up_layers = list(reversed(layers))
    n = 0
    for i, block_type in enumerate(up_types):
        attention = _has_attention(block_type)
        count = up_layers[i] + 1
        for j in range(count):
            out[("up_blocks", str(i), "resnets", str(j))] = (["output_blocks", str(n), "0"], "resnet")
            if attention:
                out[("up_blocks", str(i), "attentions", str(j))] = (["output_blocks", str(n), "1"], "attention")
            if j == count - 1 and i < len(up_types) - 1:
                out[("up_blocks", str(i), "upsamplers", "0")] = (["output_blocks", str(n), "2" if attention else "1"], "up")
            n += 1
    return out


def sgm_unet_module_path(diffusers_path: str, unet_config: Any) -> str:
    """The original (SGM) UNet path of a diffusers ``UNet2DConditionModel`` module path.

    `unet_config`: the UNet's config (``unet.config`` or a dict) with ``down_block_types``,
    ``up_block_types`` and ``layers_per_block`` (int or one per level). The path may name a block or any
    module inside one (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn2.to_k`` for SDXL). Raises ValueError naming the path
    when the UNet of that config has no such module in the original layout.
    """
    for prefix, sgm in _TOP_LEVEL.items():
        if diffusers_path == prefix or diffusers_path.startswith(prefix + "."):
            return sgm + diffusers_path[len(prefix) :]
    parts = diffusers_path.split(".")
    blocks = _block_map(unet_config)
    for size in (4, 3):  # down_blocks.i.resnets.j / mid_block.resnets.j
        key = tuple(parts[:size])
        if key in blocks:
            sgm, kind = blocks[key]
            rest = parts[size:]
            if kind == "resnet":
                rest = _resnet_tail(rest)
            elif kind in ("down", "up") and rest[:1] == ["conv"]:
                rest = (["op"] if kind == "down" else ["conv"]) + rest[1:]
            return ".".join(sgm + rest)
    raise ValueError(f"UNet module {diffusers_path!r} has no place in the original (SGM) UNet layout of this config")
