"""Which flow-matching transformer base a file or diffusers folder holds: Z-Image, FLUX.2 Klein 4B or 9B,
or a relative that is refused (FLUX.1, FLUX.2 [dev], Lumina 2, Z-Image Omni, other pipelines).

Read from the files, never from a flag (library/models/kind.py calls these and builds the ModelKind):

* a transformer file, in the original layout ComfyUI's ``diffusion_models`` files have (bare keys or under
  ``model.diffusion_model.``) or in diffusers' layout:
  - Z-Image: ``layers.N.attention.qkv`` (diffusers: ``.to_q``) with ``noise_refiner.*``; ComfyUI runs
    Lumina 2 on the same NextDiT code, told apart by its caption width: ``cap_embedder.1.weight`` is
    [dim, 2304] there (Gemma-2-2B) and [3840, 2560] for Z-Image (Qwen3-4B). Z-Image Turbo and Z-Image
    Base have the same keys and shapes and no marker in the file or in the diffusers folder, so they are
    one architecture here, identified and trained alike.
  - FLUX.2: ``single_stream_modulation.lin.weight`` (diffusers: ``.linear``; the key diffusers'
    single-file loader also detects FLUX.2 by). The block counts name the model: 5 double-stream + 20
    single-stream blocks is Klein 4B, 8 + 24 Klein 9B; FLUX.2 [dev] (8 + 48, a 15360-wide Mistral text
    input) and anything else are refused. Klein and Klein Base share their keys; a diffusers folder
    says which (``model_index.json`` ``is_distilled``).
  - FLUX.1 (``double_blocks.0.img_mod.lin``: per-block modulation, which FLUX.2 shares across blocks):
    refused.
* a diffusers folder: ``model_index.json`` ``_class_name`` (``ZImagePipeline`` / ``Flux2KleinPipeline``)
  and, for Klein, the transformer config's ``num_layers`` / ``num_single_layers``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from library.models.dit_family import DIT_FAMILIES, KLEIN_BY_BLOCKS, ZIMAGE_FAMILY

USE_DIT = "use a Z-Image (Turbo or Base) or FLUX.2 Klein 4B / 9B model"
ORIGINAL_PREFIX = "model.diffusion_model."
LUMINA2_CAPTION_WIDTH = 2304  # Gemma-2-2B, Lumina Image 2.0's text encoder
FLUX2_DEV_TEXT_WIDTH = 15360  # 3 x Mistral Small 3.1's 5120


@dataclass(frozen=True)
class DitIdentity:
    """family: a DIT_FAMILIES key, or "other" (refused: `found` says what it is, `advice` what to give);
    evidence: what the family was read from, for messages; in_channels: the transformer's input channels."""

    family: str
    evidence: str = ""
    found: str = ""
    advice: str = USE_DIT
    in_channels: int = 0


def _other(found: str) -> DitIdentity:
    return DitIdentity(family="other", found=found)


def _count(keys: list[str], pattern: str) -> int:
    """How many blocks `pattern` (with one (\\d+) group) numbers: the highest index + 1."""
    found = [int(m[1]) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _klein(double: int, single: int, joint: int, evidence: str, in_channels: int) -> DitIdentity:
    family = KLEIN_BY_BLOCKS.get((double, single))
    blocks = f"{double} double-stream and {single} single-stream blocks"
    if family is not None:
        return DitIdentity(family=family.name, evidence=f"{evidence}, {blocks}", in_channels=in_channels)
    if joint == FLUX2_DEV_TEXT_WIDTH:
        return _other(f"FLUX.2 [dev] ({blocks}, Mistral text encoder), not FLUX.2 Klein")
    return _other(f"a FLUX.2 transformer with {blocks}, neither Klein 4B (5 + 20) nor Klein 9B (8 + 24)")


def identify_transformer_keys(shapes: Mapping[str, tuple[int, ...]]) -> DitIdentity | None:
    """The base a transformer file's keys -> shapes belong to (module docstring); None when they are no
    Z-Image / FLUX transformer at all, so that the Stable Diffusion rules go on."""
    keys = [k[len(ORIGINAL_PREFIX):] if k.startswith(ORIGINAL_PREFIX) else k for k in shapes]
    shape = {k: tuple(s) for k, s in zip(keys, shapes.values())}
    if any(k.startswith("noise_refiner.") for k in keys) and any(re.match(r"layers\.\d+\.attention\.(qkv|to_q)\.", k) for k in keys):
        if any(k.startswith("siglip_") for k in keys):
            return _other("Z-Image Omni (a SigLIP image input), not the Z-Image text-to-image model")
        caption = shape.get("cap_embedder.1.weight", (0, 0))
        if len(caption) == 2 and caption[1] == LUMINA2_CAPTION_WIDTH:
            return _other(f"Lumina Image 2.0 (a {LUMINA2_CAPTION_WIDTH}-wide Gemma caption input), not Z-Image")
        embed = shape.get("x_embedder.weight") or shape.get("all_x_embedder.2-1.weight") or (0, 0)
        return DitIdentity(family=ZIMAGE_FAMILY.name, in_channels=embed[1] // 4 if len(embed) == 2 else 0,
                           evidence="Z-Image transformer keys: layers.N.attention, noise_refiner, context_refiner")
    native = "single_stream_modulation.lin.weight" in shape
    if native or "single_stream_modulation.linear.weight" in shape:
        if native:
            double, single = _count(keys, r"double_blocks\.(\d+)\."), _count(keys, r"single_blocks\.(\d+)\.")
            text, image = shape.get("txt_in.weight", (0, 0)), shape.get("img_in.weight", (0, 0))
        else:
            double = _count(keys, r"transformer_blocks\.(\d+)\.")
            single = _count(keys, r"single_transformer_blocks\.(\d+)\.")
            text, image = shape.get("context_embedder.weight", (0, 0)), shape.get("x_embedder.weight", (0, 0))
        return _klein(double, single, text[-1], "FLUX.2 transformer keys (single_stream_modulation)", image[-1])
    if "double_blocks.0.img_mod.lin.weight" in shape:
        return _other("a FLUX.1 transformer (per-block modulation), not FLUX.2 Klein")
    return None


def identify_dit_configs(model_index: Mapping, configs: Mapping[str, dict | None]) -> DitIdentity | None:
    """The base a diffusers folder holds, from model_index.json and the transformer's config.json; None
    when its pipeline is not a Z-Image or FLUX.2 one (the caller's rules go on)."""
    cls = str(model_index.get("_class_name", ""))
    transformer = configs.get("transformer") or {}
    if cls == "ZImagePipeline":
        return DitIdentity(family=ZIMAGE_FAMILY.name, in_channels=int(transformer.get("in_channels", 16)),
                           evidence="ZImagePipeline; Turbo and Base are one architecture")
    if cls == "Flux2KleinPipeline":
        distilled = "Klein (distilled)" if model_index.get("is_distilled") else "Klein Base (undistilled)"
        return _klein(int(transformer.get("num_layers", 0)), int(transformer.get("num_single_layers", 0)),
                      int(transformer.get("joint_attention_dim", 0)), f"Flux2KleinPipeline, {distilled}",
                      int(transformer.get("in_channels", 0)))
    if cls == "Flux2Pipeline":
        return _other("FLUX.2 [dev] (Flux2Pipeline, Mistral text encoder), not FLUX.2 Klein")
    if cls.startswith(("ZImage", "Flux2")):
        return _other(f"a {cls} model, not a text-to-image base")
    return None


def dit_label(family: str) -> str:
    """What messages call a DiT family ("Z-Image", "FLUX.2 Klein 4B", ...)."""
    return DIT_FAMILIES[family].label
