"""CLIP ViT-L/14 image embeddings (with faces masked out for the style score) and the LAION improved
aesthetic predictor on them.

Masking: the face pixels are set to CLIP's normalisation mean (`image_mean` of the folder's
preprocessor, about RGB 122, 116, 104), which becomes 0 after the processor's normalisation, so a
masked face contributes the same neutral input whatever it looked like.

The aesthetic head is christophschuhmann/improved-aesthetic-predictor's MLP (`simple_inference.py`):
`layers` = Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
Linear(64, 16), Linear(16, 1), no activations, on the L2-normalised CLIP ViT-L/14 image embedding;
its state dict keys are `layers.{0,2,4,6,7}.{weight,bias}`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from library.files.messages import UserError, one_line
from library.files.weights import WeightsFileError, load_pickled_weights

AESTHETIC_LINEARS = (0, 2, 4, 6, 7)  # indices of the Linear layers in the predictor's nn.Sequential


class ScoreWeightsError(UserError, ValueError):
    """CLIP or aesthetic weights that cannot be loaded; str() is one line naming the file and the fix."""


class ClipImageEmbedder:
    """A CLIP vision tower with projection, from a local transformers folder.

    `embed(images, face_masks)` -> [N, D] float32, L2-normalised; `dim` is D (768 for ViT-L/14)."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        folder = Path(folder)
        if not folder.is_dir():
            raise ScoreWeightsError(f"{folder}: not a folder ; give a CLIP ViT-L/14 folder in transformers layout "
                                    "(config.json, model.safetensors, preprocessor_config.json)")
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).to(device).eval()
        except Exception as err:  # noqa: BLE001 - every failure of a weights folder is one line
            raise ScoreWeightsError(f"{folder}: not a CLIP model folder ({one_line(err, 160)}) ; give the "
                                    "openai/clip-vit-large-patch14 folder") from err
        size = self.model.config.image_size
        if (folder / "preprocessor_config.json").is_file():
            try:
                self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            except Exception as err:  # noqa: BLE001
                raise ScoreWeightsError(f"{folder}/preprocessor_config.json: unreadable ({one_line(err, 160)})") from err
        else:  # CLIP's own preprocessing at the model's input size
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.device = device
        self.dim = int(self.model.config.projection_dim)
        self.name = f"{folder.name} (CLIP vision, {size} px, {self.dim}-d)"
        self.fill = np.clip(np.round(np.asarray(self.processor.image_mean) * 255), 0, 255).astype(np.uint8)

    def masked(self, rgb: np.ndarray, face_mask: np.ndarray | None) -> np.ndarray:
        """`rgb` [H, W, 3] uint8 with the pixels where `face_mask` [H, W] bool is True set to CLIP's mean."""
        if face_mask is None:
            return rgb
        out = rgb.copy()
        out[face_mask] = self.fill
        return out

    @torch.no_grad()
    def embed(self, images: list[np.ndarray], face_masks: list[np.ndarray | None] | None = None) -> np.ndarray:
        """[N, D] L2-normalised image embeddings of RGB uint8 images, faces masked where masks are given."""
        if face_masks is not None:
            images = [self.masked(im, m) for im, m in zip(images, face_masks)]
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        emb = self.model(pixel_values=pixels).image_embeds.float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor (see the module docstring): [N, D] normalised embeddings -> [N, 1]."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def aesthetic_mlp(input_size: int = 768) -> AestheticMLP:
    """The predictor with random weights, in eval mode (dropout off); its state dict has the real keys."""
    return AestheticMLP(input_size).eval()


def load_aesthetic(path: str | os.PathLike, input_size: int) -> AestheticMLP:
    """The aesthetic predictor from its `.pth` state dict (keys `layers.N.weight`/`bias`), read with
    weights_only. `input_size` is the CLIP embedding width it will be given (768 for ViT-L/14).

    Raises ScoreWeightsError (one line) for a missing, unsafe or differently shaped file."""
    path = Path(path)
    try:
        sd = load_pickled_weights(path)
    except FileNotFoundError as err:
        raise ScoreWeightsError(f"{path}: file not found ; give sac+logos+ava1-l14-linearMSE.pth") from err
    except WeightsFileError as err:
        raise ScoreWeightsError(str(err)) from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # a Lightning checkpoint of the same MLP
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ScoreWeightsError(f"{path}: not a state dict of tensors ; give the aesthetic predictor's .pth")
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    expected = {f"layers.{i}.{p}" for i in AESTHETIC_LINEARS for p in ("weight", "bias")}
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ScoreWeightsError(f"{path}: not the improved aesthetic predictor's MLP (missing {missing[:3]}, "
                                f"unexpected {extra[:3]}) ; give sac+logos+ava1-l14-linearMSE.pth")
    width = sd["layers.0.weight"].shape[-1]
    if width != input_size:
        raise ScoreWeightsError(f"{path}: takes {width}-d CLIP embeddings, the CLIP model gives {input_size}-d ; "
                                "use the predictor made for that CLIP (ViT-L/14: 768)")
    mlp = aesthetic_mlp(input_size)
    try:
        mlp.load_state_dict({k: v.float() for k, v in sd.items()})
    except RuntimeError as err:
        raise ScoreWeightsError(f"{path}: layer shapes differ from the predictor's ({one_line(err, 160)})") from err
    return mlp.eval()


@torch.no_grad()
def aesthetic_scores(mlp: nn.Module, embeddings: np.ndarray) -> np.ndarray:
    """[N] scores (about 1-10 with the real weights) of [N, D] L2-normalised CLIP image embeddings."""
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    return mlp(x)[:, 0].numpy().astype(np.float64)
