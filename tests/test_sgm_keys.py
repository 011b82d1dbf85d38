"""diffusers UNet module paths -> original (SGM) paths, the names kohya gives SDXL LoRA modules.

Two checks: a few paths pinned by hand from the SDXL 1.0 layout (layers_per_block 2; input_blocks 1-2
level 0, 3 its downsampler, 4-5 level 1, 6 downsampler, 7-8 level 2; output_blocks 0-2, 3-5, 6-8 the up
levels with the upsampler after the attention), and a round trip through an independent converter:
diffusers' own single-file loader (`convert_ldm_unet_checkpoint`, original layout -> diffusers) must turn
the tiny SDXL UNet's weights, renamed by `sgm_unet_module_path`, back into exactly the diffusers weights.
"""

from __future__ import annotations

import json

import pytest
import torch

from library.models.family import SDXL
from library.models.sgm_keys import sgm_unet_module_path

SDXL_UNET = json.loads((SDXL.config_dir / "unet" / "config.json").read_text())


@pytest.mark.parametrize("diffusers_path, sgm_path", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj", "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("mid_block.resnets.0.time_emb_proj", "middle_block.0.emb_layers.1"),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", "middle_block.1.transformer_blocks.0.attn1.to_out.0"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", "output_blocks.0.1.transformer_blocks.0.attn2.to_q"),
    ("up_blocks.0.attentions.2.proj_out", "output_blocks.2.1.proj_out"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v", "output_blocks.5.1.transformer_blocks.1.attn2.to_v"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.2.norm2", "output_blocks.8.0.out_layers.0"),
    ("conv_in", "input_blocks.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_out", "out.2"),
])
def test_sdxl_paths(diffusers_path, sgm_path):
    assert sgm_unet_module_path(diffusers_path, SDXL_UNET) == sgm_path


def test_unknown_paths_are_one_line_errors():
    for path in ("down_blocks.0.attentions.0.proj_in", "down_blocks.2.downsamplers.0.conv", "up_blocks.2.upsamplers.0.conv"):
        with pytest.raises(ValueError, match="is not a module path of this UNet"):
            sgm_unet_module_path(path, SDXL_UNET)


def test_diffusers_single_file_converter_inverts_the_map():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from testkit.tiny_sdxl import build_sdxl_components

    unet = build_sdxl_components(seed=0)["unet"]
    weights = unet.state_dict()
    original = {}
    for key, value in weights.items():
        module, _, param = key.rpartition(".")
        original[f"model.diffusion_model.{sgm_unet_module_path(module, unet.config)}.{param}"] = value
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert sorted(back) == sorted(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)
