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

from library.models.lora_targets import LORA_TARGET_PRESETS, is_lora_internal, unet_lora_target_modules

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

DEFAULT_ADAPTER = "default"

def text_encoder_lora_target_modules(text_encoder: nn.Module, layers: int | None = None) -> list[str]:
    """Full module names of the CLIP self-attention projections of encoder layers 0 to `layers` - 1 (all
    when None): a layer past the hidden state the family conditions on gets no gradient
    (:meth:`~library.models.family.ModelFamily.text_layers_trained`)."""
    def layer(name: str) -> int:
        return int(name.split(".layers.", 1)[1].split(".", 1)[0]) if ".layers." in name else 0

    names = [
        n
        for n, _ in text_encoder.named_modules()
        if not is_lora_internal(n) and ".self_attn." in n and n.rsplit(".", 1)[-1] in TEXT_ENCODER_TARGETS
        and (layers is None or layer(n) < layers)
    ]
    if not names:
        raise ValueError("found no self_attn q/k/v/out projections in the text encoder")
    return names


def lora_config(rank: int, alpha: float, targets: list[str]):
    """peft's LoraConfig: rank, alpha, gaussian A / zero B init, `targets` as full module names.
    ValueError for a rank below 1."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian", target_modules=targets)


def add_unet_lora(unet: nn.Module, rank: int, alpha: float, preset: str, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Add a LoRA (lora_A gaussian, lora_B zero, scale alpha / rank) to the preset's UNet modules."""
    targets = unet_lora_target_modules(unet, preset)
    unet.add_adapter(lora_config(rank, alpha, targets), adapter_name=adapter_name)


def add_text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float, adapter_name: str = DEFAULT_ADAPTER,
                          layers: int | None = None) -> None:
    """Add a LoRA to the self-attention projections of the first `layers` CLIP encoder layers (all: None)."""
    from peft import inject_adapter_in_model

    targets = text_encoder_lora_target_modules(text_encoder, layers)
    # transformers 5.24's PreTrainedModel.add_adapter requires peft >= 0.22 (not released as of peft 0.21.2);
    # inject_adapter_in_model is what it would call.
    inject_adapter_in_model(lora_config(rank, alpha, targets), text_encoder, adapter_name)


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
