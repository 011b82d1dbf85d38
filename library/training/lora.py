"""LoRA layers for the UNet and the CLIP text encoder, through peft, selected so that they export to kohya names.

The layers are plain peft `LoraLayer`s (adapter "default"); `library.export.kohya` walks them and writes kohya's
format. Targets are given to peft as *full* module names (exact matches), so a preset selects exactly the
modules it names and nothing that merely ends the same way.

Presets (docs/method.md, phase 2):
- ``cross_attn`` (paper): ``attn2.to_q / to_k / to_v / to_out.0`` of every transformer block of the UNet.
- ``attn_geglu`` (released code): ``to_q / to_k / to_v / to_out.0`` of ``attn1`` and ``attn2``, plus
  ``ff.net.0.proj`` (the GEGLU projection).
- ``kohya_all`` (kohya's default LoRA network for SD 1.x): every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside the
  UNet's ``Transformer2DModel`` blocks (``proj_in``, ``proj_out``, attn1/attn2 q/k/v/out.0, ``ff.net.0.proj``,
  ``ff.net.2``).

Text encoders (released code): the ``self_attn`` q/k/v/out projections of every CLIP encoder layer; the same
transformers module names in SD 1.x's CLIP-L and in both SDXL encoders (CLIP-L, and OpenCLIP-G as
``CLIPTextModelWithProjection``), so one call per encoder covers SDXL. The presets select by the
diffusers module names inside ``Transformer2DModel`` blocks, which SD 1.x and SDXL UNets share.

Note on versions: transformers 5.24's own ``add_adapter`` refuses peft < 0.22 (the newest peft on the index is
0.21.2), so the text encoder gets its adapter from ``peft.inject_adapter_in_model`` directly; the UNet goes
through diffusers' ``add_adapter`` as docs/design.md says.

Both ``add_*`` functions leave only the LoRA parameters with ``requires_grad=True`` in the model they touch
(peft freezes every other parameter). Code that also trains something else in that model (the token
embedding rows) must switch it back on *after* adding the LoRA.
"""

from __future__ import annotations

from torch import nn

LORA_TARGET_PRESETS: dict[str, str] = {
    "cross_attn": "attn2 to_q/to_k/to_v/to_out.0 of every UNet transformer block (paper)",
    "attn_geglu": "attn1 and attn2 to_q/to_k/to_v/to_out.0 plus ff.net.0.proj (released code)",
    "kohya_all": "every Linear and 1x1 Conv2d inside the UNet's Transformer2DModel blocks (kohya's default)",
}

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

_ATTN_PARTS = ("to_q", "to_k", "to_v", "to_out.0")

DEFAULT_ADAPTER = "default"


def _is_lora_internal(name: str) -> bool:
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
            if not rel or _is_lora_internal(rel):
                continue
            if _wanted(rel, preset, module):
                names.append(f"{tname}.{rel}")
    if not names:
        raise ValueError(f"preset {preset!r} selected no module: is this a Stable Diffusion UNet with transformer blocks?")
    return names


def text_encoder_lora_target_modules(text_encoder: nn.Module, layers: int | None = None) -> list[str]:
    """Full module names of the CLIP self-attention projections of encoder layers 0 to `layers` - 1 (all
    when None): a layer past the hidden state the family conditions on gets no gradient
    (:meth:`~library.models.family.ModelFamily.text_layers_trained`)."""
    def layer(name: str) -> int:
        return int(name.split(".layers.", 1)[1].split(".", 1)[0]) if ".layers." in name else 0

    names = [
        n
        for n, _ in text_encoder.named_modules()
        if not _is_lora_internal(n) and ".self_attn." in n and n.rsplit(".", 1)[-1] in TEXT_ENCODER_TARGETS
        and (layers is None or layer(n) < layers)
    ]
    if not names:
        raise ValueError("found no self_attn q/k/v/out projections in the text encoder")
    return names


def _config(rank: int, alpha: float, targets: list[str]):
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian", target_modules=targets)


def add_unet_lora(unet: nn.Module, rank: int, alpha: float, preset: str, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Add a LoRA (lora_A gaussian, lora_B zero, scale alpha / rank) to the preset's UNet modules."""
    targets = unet_lora_target_modules(unet, preset)
    unet.add_adapter(_config(rank, alpha, targets), adapter_name=adapter_name)


def add_text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float, adapter_name: str = DEFAULT_ADAPTER,
                          layers: int | None = None) -> None:
    """Add a LoRA to the self-attention projections of the first `layers` CLIP encoder layers (all: None)."""
    from peft import inject_adapter_in_model

    targets = text_encoder_lora_target_modules(text_encoder, layers)
    # transformers 5.24's PreTrainedModel.add_adapter requires peft >= 0.22 (not released as of peft 0.21.2);
    # inject_adapter_in_model is what it would call.
    inject_adapter_in_model(_config(rank, alpha, targets), text_encoder, adapter_name)


def lora_layers(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> list[tuple[str, nn.Module]]:
    """(name, peft LoraLayer) for each layer of `model` that holds the adapter."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            out.append((name, module))
    return out


def lora_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The lora_A / lora_B parameters of `model` (of one adapter, or of all when adapter_name is None)."""
    params = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "lora_A" not in parts and "lora_B" not in parts:
            continue
        if adapter_name is not None and adapter_name not in parts:
            continue
        params.append(p)
    return params


def set_lora_scale(model: nn.Module, scale: float, adapter_name: str = DEFAULT_ADAPTER) -> int:
    """Set every LoRA layer's scale to `scale` x alpha / rank (peft's set_scale); returns layers touched."""
    layers = lora_layers(model, adapter_name)
    for _, module in layers:
        module.set_scale(adapter_name, scale)
    return len(layers)


def lora_relative_change(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> float | None:
    """How much the LoRA changes `model`: the largest ``||scale B A||_F / ||W||_F`` over its LoRA layers
    (W the layer's frozen weight; Linear and Conv2d alike, flattened to [out, in * k * k]).

    0 for a LoRA that has not trained (peft starts B at zero); None when `model` holds no LoRA layer.
    """
    worst = None
    for _, layer in lora_layers(model, adapter_name):
        down = layer.lora_A[adapter_name].weight.detach().float().flatten(1)  # [r, in * k * k]
        up = layer.lora_B[adapter_name].weight.detach().float().flatten(1)  # [out, r]
        delta = (up @ down) * layer.scaling[adapter_name]
        weight = layer.get_base_layer().weight.detach().float()
        change = (delta.norm() / weight.norm().clamp_min(1e-12)).item()
        worst = change if worst is None else max(worst, change)
    return worst
