"""Z-Image / FLUX.2 Klein without a model: native names, the exact q/k/v fusion, detection from key shapes,
the embedding file and the metadata. Every expected value is written out by hand from ComfyUI's tables,
musubi-tuner's names or the LoRA formula (delta = alpha / rank x up @ down)."""

from __future__ import annotations

import pytest
import torch

from library.export.dit_embeddings import dit_embedding_tensors
from library.export.dit_lora import LoraPiece, dit_lora_metadata, dit_lora_state_dict, fuse_lora, native_pieces
from library.models.dit_family import KLEIN4B, KLEIN9B, ZIMAGE_FAMILY
from library.models.dit_keys import FLUX2, ZIMAGE, native_module
from library.models.dit_kind import identify_dit_configs, identify_transformer_keys
from library.models.kind import ModelKind, identify_state


@pytest.mark.parametrize("arch,module,expected", [
    # comfy/utils.py z_image_to_diffusers: to_q/k/v are the thirds (0, dim, 2 dim) of attention.qkv
    (ZIMAGE, "layers.3.attention.to_q", ("layers.3.attention.qkv", 0)),
    (ZIMAGE, "layers.3.attention.to_k", ("layers.3.attention.qkv", 1)),
    (ZIMAGE, "noise_refiner.0.attention.to_v", ("noise_refiner.0.attention.qkv", 2)),
    (ZIMAGE, "context_refiner.1.attention.to_out.0", ("context_refiner.1.attention.out", None)),
    (ZIMAGE, "layers.0.attention.norm_q", ("layers.0.attention.q_norm", None)),
    (ZIMAGE, "layers.0.feed_forward.w2", ("layers.0.feed_forward.w2", None)),
    (ZIMAGE, "all_final_layer.2-1.linear", ("final_layer.linear", None)),
    (ZIMAGE, "all_x_embedder.2-1", ("x_embedder", None)),
    # diffusers' convert_flux2_transformer_checkpoint_to_diffusers, read backwards
    (FLUX2, "transformer_blocks.0.attn.to_q", ("double_blocks.0.img_attn.qkv", 0)),
    (FLUX2, "transformer_blocks.2.attn.add_v_proj", ("double_blocks.2.txt_attn.qkv", 2)),
    (FLUX2, "transformer_blocks.1.attn.add_k_proj", ("double_blocks.1.txt_attn.qkv", 1)),
    (FLUX2, "transformer_blocks.0.attn.to_out.0", ("double_blocks.0.img_attn.proj", None)),
    (FLUX2, "transformer_blocks.0.attn.to_add_out", ("double_blocks.0.txt_attn.proj", None)),
    (FLUX2, "transformer_blocks.4.ff.linear_in", ("double_blocks.4.img_mlp.0", None)),
    (FLUX2, "transformer_blocks.4.ff_context.linear_out", ("double_blocks.4.txt_mlp.2", None)),
    (FLUX2, "single_transformer_blocks.7.attn.to_qkv_mlp_proj", ("single_blocks.7.linear1", None)),
    (FLUX2, "single_transformer_blocks.7.attn.to_out", ("single_blocks.7.linear2", None)),
    (FLUX2, "x_embedder", ("img_in", None)),
    (FLUX2, "norm_out.linear", ("final_layer.adaLN_modulation.1", None)),
])
def test_native_names_follow_comfyuis_tables(arch, module, expected):
    assert native_module(arch, module) == expected


# three LoRAs with different ranks and scales; their deltas by hand:
# q: alpha/r = 1: [[2],[0]] @ [[1, 0]] = [[2, 0], [0, 0]]
# k: alpha/r = 2: 2 x [[0],[3]] @ [[0, 1]] = [[0, 0], [0, 6]]
# v: alpha/r = 1/2: 0.5 x I @ [[1, 1], [1, -1]] = [[0.5, 0.5], [0.5, -0.5]]
Q = LoraPiece(down=torch.tensor([[1.0, 0.0]]), up=torch.tensor([[2.0], [0.0]]), alpha=1.0)
K = LoraPiece(down=torch.tensor([[0.0, 1.0]]), up=torch.tensor([[0.0], [3.0]]), alpha=2.0)
V = LoraPiece(down=torch.tensor([[1.0, 1.0], [1.0, -1.0]]), up=torch.eye(2), alpha=1.0)
STACKED = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 6.0], [0.5, 0.5], [0.5, -0.5]])


def test_fused_lora_delta_equals_the_three_split_deltas_stacked_q_k_v():
    for arch, names in ((ZIMAGE, ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v")),
                        (FLUX2, ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"))):
        # given in another order than q, k, v: the order comes from the names
        fused = native_pieces({names[2]: V, names[0]: Q, names[1]: K}, arch)
        (piece,) = fused.values()
        assert piece.rank == 4 and tuple(piece.down.shape) == (4, 2) and tuple(piece.up.shape) == (6, 4)
        torch.testing.assert_close(piece.delta(), STACKED, rtol=0, atol=1e-6)
        torch.testing.assert_close(piece.delta(), torch.cat([Q.delta(), K.delta(), V.delta()]), rtol=0, atol=1e-6)


def test_equal_scales_fuse_to_rank_3r_alpha_3_alpha_and_the_ups_block_diagonal():
    a, b, c = (LoraPiece(down=torch.full((2, 3), float(i)), up=torch.full((4, 2), float(i + 1)), alpha=8.0) for i in range(3))
    fused = fuse_lora([a, b, c])
    assert (fused.rank, fused.alpha) == (6, 24.0)  # alpha / rank stays 8 / 2
    expected_up = torch.zeros(12, 6)
    expected_up[0:4, 0:2], expected_up[4:8, 2:4], expected_up[8:12, 4:6] = 1.0, 2.0, 3.0
    torch.testing.assert_close(fused.up, expected_up, rtol=0, atol=0)
    torch.testing.assert_close(fused.down, torch.cat([torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)]), rtol=0, atol=0)


def test_a_projection_without_lora_fuses_as_rank_zero():
    fused = native_pieces({"transformer_blocks.0.attn.add_k_proj": K}, FLUX2)["double_blocks.0.txt_attn.qkv"]
    expected = torch.zeros(6, 2)
    expected[2:4] = torch.tensor([[0.0, 0.0], [0.0, 6.0]])  # only k's rows
    torch.testing.assert_close(fused.delta(), expected, rtol=0, atol=1e-6)


def test_file_tensors_carry_alpha_for_zimage_and_fold_it_for_flux2():
    z = dit_lora_state_dict({"layers.0.feed_forward.w1": V}, ZIMAGE_FAMILY, dtype=torch.float32)
    assert sorted(z) == ["diffusion_model.layers.0.feed_forward.w1.alpha", "diffusion_model.layers.0.feed_forward.w1.lora.down.weight",
                         "diffusion_model.layers.0.feed_forward.w1.lora.up.weight"]
    assert float(z["diffusion_model.layers.0.feed_forward.w1.alpha"]) == 1.0
    f = dit_lora_state_dict({"single_transformer_blocks.0.attn.to_out": V}, KLEIN4B, dtype=torch.float32)
    assert sorted(f) == ["diffusion_model.single_blocks.0.linear2.lora_A.weight", "diffusion_model.single_blocks.0.linear2.lora_B.weight"]
    torch.testing.assert_close(f["diffusion_model.single_blocks.0.linear2.lora_B.weight"], 0.5 * torch.eye(2), rtol=0, atol=0)


def _flux2_shapes(double: int, single: int, text: int, prefix: str = "") -> dict[str, tuple[int, ...]]:
    shapes = {prefix + "single_stream_modulation.lin.weight": (9, 3), prefix + "txt_in.weight": (3, text), prefix + "img_in.weight": (3, 128)}
    shapes.update({f"{prefix}double_blocks.{i}.img_attn.qkv.weight": (9, 3) for i in range(double)})
    shapes.update({f"{prefix}single_blocks.{i}.linear1.weight": (9, 3) for i in range(single)})
    return shapes


def test_klein_size_is_read_from_the_block_counts_and_relatives_are_named():
    assert identify_transformer_keys(_flux2_shapes(5, 20, 7680)).family == "klein4b"
    assert identify_transformer_keys(_flux2_shapes(8, 24, 12288, "model.diffusion_model.")).family == "klein9b"
    dev = identify_transformer_keys(_flux2_shapes(8, 48, 15360))
    assert (dev.family, dev.found) == ("other", "FLUX.2 [dev] (8 double-stream and 48 single-stream blocks, Mistral text encoder), not FLUX.2 Klein")
    odd = identify_transformer_keys(_flux2_shapes(6, 20, 7680))
    assert odd.found == "a FLUX.2 transformer with 6 double-stream and 20 single-stream blocks, neither Klein 4B (5 + 20) nor Klein 9B (8 + 24)"
    flux1 = identify_transformer_keys({"double_blocks.0.img_mod.lin.weight": (18, 3), "double_blocks.0.img_attn.qkv.weight": (9, 3)})
    assert flux1.found == "a FLUX.1 transformer (per-block modulation), not FLUX.2 Klein"


def test_zimage_is_told_from_lumina2_by_its_caption_width_and_turbo_from_base_not_at_all():
    zimage = {"layers.0.attention.qkv.weight": (11520, 3840), "noise_refiner.0.attention.qkv.weight": (11520, 3840),
              "cap_embedder.1.weight": (3840, 2560), "x_embedder.weight": (3840, 64)}
    found = identify_transformer_keys(zimage)
    assert (found.family, found.in_channels) == ("zimage", 16)
    lumina = {**zimage, "cap_embedder.1.weight": (2304, 2304)}
    assert identify_transformer_keys(lumina).found == "Lumina Image 2.0 (a 2304-wide Gemma caption input), not Z-Image"
    # the caption width is the second dimension: a 2304-wide model reading 2560-wide captions is Z-Image-shaped
    assert identify_transformer_keys({**zimage, "cap_embedder.1.weight": (2304, 2560)}).family == "zimage"
    omni = {**zimage, "siglip_embedder.1.weight": (3840, 1152)}
    assert identify_transformer_keys(omni).family == "other"
    kind = identify_state(zimage)
    assert (kind.family, kind.prediction, kind.base_model_version) == ("zimage", "flow", "z_image")
    assert kind.describe() == "a Z-Image model (Z-Image transformer keys: layers.N.attention, noise_refiner, context_refiner)"
    assert identify_transformer_keys({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) is None


def test_folders_name_the_pipeline_and_klein_base():
    base = identify_dit_configs({"_class_name": "Flux2KleinPipeline", "is_distilled": False},
                                {"transformer": {"num_layers": 8, "num_single_layers": 24, "joint_attention_dim": 12288}})
    assert (base.family, base.evidence) == ("klein9b", "Flux2KleinPipeline, Klein Base (undistilled), 8 double-stream and 24 single-stream blocks")
    assert identify_dit_configs({"_class_name": "Flux2Pipeline"}, {}).family == "other"
    assert identify_dit_configs({"_class_name": "ZImageControlNetPipeline"}, {}).found == "a ZImageControlNetPipeline model, not a text-to-image base"
    assert identify_dit_configs({"_class_name": "StableDiffusionPipeline"}, {}) is None
    assert ModelKind(family="klein9b", prediction="flow", evidence=base.evidence).base_model_version == "flux_2_klein_9b"


def test_embedding_files_use_comfyuis_key_per_family():
    rows = torch.arange(6.0).reshape(2, 3)
    assert list(dit_embedding_tensors(torch.zeros(2, 2560), ZIMAGE_FAMILY)) == ["qwen3_4b"]
    assert list(dit_embedding_tensors(torch.zeros(2, 2560), KLEIN4B)) == ["qwen3_4b"]
    nine = dit_embedding_tensors(torch.zeros(3, 4096), KLEIN9B)
    assert list(nine) == ["qwen3_8b"] and tuple(nine["qwen3_8b"].shape) == (3, 4096)
    torch.testing.assert_close(dit_embedding_tensors(rows, KLEIN4B, width=3)["qwen3_4b"], rows, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"FLUX.2 Klein 9B embedding rows must be \[n, 4096\] \(n >= 1\), got \(2, 2560\)"):
        dit_embedding_tensors(torch.zeros(2, 2560), KLEIN9B)


def test_an_embedding_is_one_file_named_after_its_token(tmp_path):
    from safetensors.torch import load_file

    from library.export.dit_embeddings import save_dit_embedding

    path = save_dit_embedding(tmp_path, "sks", torch.ones(2, 4096), KLEIN9B)
    assert path == tmp_path / "sks.safetensors"
    saved = load_file(path)
    assert list(saved) == ["qwen3_8b"] and torch.equal(saved["qwen3_8b"], torch.ones(2, 4096))


def test_metadata_names_the_base_as_musubi_tuner_does():
    meta = dit_lora_metadata(KLEIN9B, "me", "2026-12-07T06:00:00", 16, 8.0)
    assert meta["modelspec.architecture"] == "Flux.2-klein-9b/lora"
    assert meta["ss_base_model_version"] == "flux_2_klein_9b"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux2"
    z = dit_lora_metadata(ZIMAGE_FAMILY, "me", "2026-12-07T06:00:00", 16, 8.0)
    assert (z["modelspec.architecture"], z["ss_base_model_version"], z["modelspec.resolution"]) == ("Z-Image/lora", "z_image", "1024x1024")
    assert dit_lora_metadata(KLEIN4B, "me", "d", 4, 4.0)["modelspec.architecture"] == "Flux.2-klein-4b/lora"


@pytest.mark.parametrize("family,qkv,text,blocks", [
    # Z-Image: dim 3840 = 30 heads x 128, caption width 2560 (Qwen3-4B), 30 layers
    (ZIMAGE_FAMILY, ("layers.29.attention.qkv.weight", (3 * 3840, 3840)), ("cap_embedder.1.weight", (3840, 2560)), None),
    # Klein 4B: 24 heads x 128 = 3072, text input 3 x 2560; Klein 9B: 32 x 128 = 4096, 3 x 4096
    (KLEIN4B, ("double_blocks.4.img_attn.qkv.weight", (3 * 3072, 3072)), ("txt_in.weight", (3072, 7680)), "single_blocks.19.linear1.weight"),
    (KLEIN9B, ("double_blocks.7.txt_attn.qkv.weight", (3 * 4096, 4096)), ("txt_in.weight", (4096, 12288)), "single_blocks.23.linear1.weight"),
])
def test_shipped_configs_build_the_real_shapes_which_detection_names(family, qkv, text, blocks):
    """configs/<family>/ holds the real models' configs (what split files load with): built on the meta
    device, converted to ComfyUI's layout, the keys have the real shapes and are identified as the family."""
    import diffusers
    import transformers

    from library.models.dit_keys import transformer_to_native

    with torch.device("meta"):
        cls = getattr(diffusers, family.transformer_class)
        model = cls.from_config(cls.load_config(family.config_dir / "transformer"))
        text_config = transformers.AutoConfig.from_pretrained(family.config_dir / "text_encoder")
        encoder = getattr(transformers, family.text_encoder_class)(text_config)
    native = {k: tuple(v.shape) for k, v in transformer_to_native(model.state_dict(), family.arch).items()}
    assert native[qkv[0]] == qkv[1] and native[text[0]] == text[1]
    assert blocks is None or blocks in native
    assert identify_transformer_keys(native).family == family.name
    assert identify_transformer_keys({"model.diffusion_model." + k: v for k, v in native.items()}).family == family.name
    assert (text_config.hidden_size, text_config.num_hidden_layers) == (family.text_width, 36)
    assert tuple(encoder.get_input_embeddings().weight.shape) == (151936, family.text_width)
