"""What trains, by checkpoint name: each text encoder's new token rows, then (phase 2) the LoRA weights.

:class:`Trainables` is an object the trainer owns, built with the denoiser, the text encoders and the
family. Checkpoint names: ``token_embedding<suffix>.new_vectors`` per text encoder (the suffix is the
encoder's attribute name after ``text_encoder``: "" for the first, as older checkpoints have it),
``unet.<param>`` and ``<text encoder attribute>.<param>`` for LoRA.
"""

from __future__ import annotations

from typing import Sequence

import torch

from library.config import LoraConfig, PhaseConfig
from library.training.interrupt import TrainingStopped
from library.training.lora import add_text_encoder_lora, lora_config
from library.training.tokens import get_token_embedding


class Trainables:
    """Adding LoRA, naming the trainable tensors, their optimiser groups and their restore from a checkpoint.
    ``lora_added`` says whether LoRA is on the models (phase 2)."""

    def __init__(self, family, unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module]) -> None:
        self.family, self.unet, self.text_encoders = family, unet, tuple(text_encoders)
        self.lora_added = False

    def encoder_suffix(self, index: int) -> str:
        """What encoder `index`'s checkpoint and log names carry: its attribute name after "text_encoder"
        ("" for the first, "_2" for the second)."""
        return self.family.text_encoders[index][len("text_encoder"):]

    def embedding_key(self, index: int) -> str:
        """The checkpoint name of encoder `index`'s new rows: ``token_embedding<suffix>.new_vectors``."""
        return f"token_embedding{self.encoder_suffix(index)}.new_vectors"

    def add_lora(self, lcfg: LoraConfig, seed: int) -> None:
        """LoRA (lcfg.rank, lcfg.alpha, lcfg.targets) on the denoiser and, with lcfg.text_encoder, on every text
        encoder's layers that reach it (the family's rule); the init is drawn from `seed`. Its weights train
        in fp32. Once per run."""
        if self.lora_added:
            return
        torch.manual_seed(seed)  # peft draws the LoRA init from the global RNG
        self.unet.add_adapter(lora_config(lcfg.rank, lcfg.alpha, self.family.lora_target_modules(self.unet, lcfg.targets)))
        if lcfg.text_encoder:
            for i, encoder in enumerate(self.text_encoders):
                layers = self.family.text_layers_trained(i, encoder.config.num_hidden_layers)
                if layers:  # 0: the family's text encoder takes no LoRA
                    add_text_encoder_lora(encoder, lcfg.rank, lcfg.alpha, layers=layers)
        for name, p in self.named(phase=2).items():
            if "lora_" in name:
                p.data = p.data.float()  # LoRA weights train in fp32 over fp16/bf16 frozen weights
        self.lora_added = True

    def named(self, phase: int) -> dict[str, torch.nn.Parameter]:
        """What trains in `phase`, by checkpoint name: each encoder's new rows (:meth:`embedding_key`), then in
        phase 2 the LoRA weights as ``unet.<name>`` and ``<text encoder attribute>.<name>``."""
        params = {self.embedding_key(i): get_token_embedding(te).new_vectors for i, te in enumerate(self.text_encoders)}
        if phase == 2:
            models = [("unet.", self.unet)] + [(f"{n}.", te) for n, te in zip(self.family.text_encoders, self.text_encoders)]
            for prefix, model in models:
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        params[prefix + name] = p
        return params

    def param_groups(self, phase: int, pcfg: PhaseConfig) -> list[dict]:
        """Optimiser groups: the embedding rows (lr_embeddings), the denoiser's LoRA (lr_unet), the text
        encoders' LoRA (lr_text_encoder); empty groups left out."""
        named = self.named(phase)
        groups = [{"params": [named.pop(self.embedding_key(i)) for i in range(len(self.text_encoders))],
                   "lr": pcfg.lr_embeddings}]
        unet = [p for n, p in named.items() if n.startswith("unet.")]
        te = [p for n, p in named.items() if not n.startswith("unet.")]
        if unet:
            groups.append({"params": unet, "lr": pcfg.lr_unet})
        if te:
            groups.append({"params": te, "lr": pcfg.lr_text_encoder})
        return groups

    def load(self, named: dict[str, torch.nn.Parameter], trainable: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's trainable tensors into `named` (:meth:`named`); TrainingStopped naming the first
        tensor that is missing, unexpected or of another shape."""
        # a checkpoint without config.toml (older versions) is only checked here
        missing, extra = set(named) - set(trainable), set(trainable) - set(named)
        if missing or extra:
            raise TrainingStopped(f"checkpoint does not match this config: {len(missing)} tensors missing, "
                                  f"{len(extra)} unexpected, e.g. {sorted(missing or extra)[0]}")
        wrong = [n for n, p in named.items() if tuple(p.shape) != tuple(trainable[n].shape)]
        if wrong:
            n = wrong[0]
            raise TrainingStopped(f"checkpoint does not match this config: {n} is {tuple(trainable[n].shape)} "
                                  f"there and {tuple(named[n].shape)} here (tokens.vectors or lora.rank changed?)")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(trainable[name].to(p.device, p.dtype))
