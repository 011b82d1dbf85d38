"""Eq. 7 inside a training step: Tweedie's x0_hat, decoded by the VAE with gradient, aligned, embedded by
a frozen ArcFace, compared with the embedding of the sample's source image.

The trainer asks :class:`IdentityTerm` for a per-sample loss; which samples take part (``loss.id_tasks``,
t < T', a face on both sides) is read from the batch the trainer built. Decoding only the latent window
around the face (``loss.id_decode_window``) is what keeps the decode affordable.
"""

from __future__ import annotations

import math

import torch

from library.config import LossConfig
from library.training.data import CachedSet
from library.training.losses import identity_loss, tweedie_x0

__all__ = ["IdentityTerm", "face_window"]


def face_window(landmarks: torch.Tensor, latent_size: int) -> tuple[torch.Tensor, int]:
    """Top-left latent corner [b, 2] (x, y) and side (latent pixels, a multiple of 8) of a window that
    holds each face; landmarks [b, 5, 2] in image pixels (8 per latent pixel).

    The ArcFace crop spans about 3x the landmarks' spread, so the window does too.
    """
    spread = (landmarks.amax(1) - landmarks.amin(1)).amax(-1)  # [b] pixels
    side = int(min(latent_size, max(8, math.ceil(spread.max().item() * 3.2 / 8 / 8) * 8)))
    centre = landmarks.mean(1) / 8
    corner = (centre - side / 2).round().clamp(0, latent_size - side).long()
    return corner, side


class IdentityTerm:
    """The identity loss of a batch. ``encoder`` maps (images [n, 3, H, W] in [-1, 1], landmarks [n, 5, 2]
    pixels) to embeddings [n, d]; ``source`` is the cached source set, whose faces are embedded once here
    (``source_embeddings`` [N, d], zeros where an image has no face)."""

    def __init__(self, encoder, source: CachedSet, vae, alphas_cumprod: torch.Tensor, cfg: LossConfig,
                 device: torch.device) -> None:
        self.encoder, self.source, self.vae, self.cfg, self.device = encoder, source, vae, cfg, device
        self.alphas_cumprod = alphas_cumprod
        with torch.no_grad():
            faces = source.has_face
            emb = encoder(source.images[faces.cpu()].to(device), source.landmarks[faces])
            self.source_embeddings = torch.zeros(len(source), emb.shape[-1], device=device)
            self.source_embeddings[faces] = emb.float()

    def __call__(self, batch: dict, noisy: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7 on the samples of ``loss.id_tasks`` whose image has a face, whose identity target has one,
        and whose t < T'. noisy, pred [B, 4, h, w]; returns (loss [B], 0 where not applied; applied [B] bool)."""
        b = noisy.shape[0]
        valid = batch["id_task"] & batch["face_ok"] & (batch["timesteps"] < self.cfg.id_max_timestep)
        valid &= self.source.has_face[batch["id_source"]]
        out = torch.zeros(b, device=self.device)
        if not valid.any():
            return out, valid
        idx = valid.nonzero().squeeze(1)
        a_t = self.alphas_cumprod[batch["timesteps"][idx]]
        x0 = tweedie_x0(noisy[idx].float(), pred[idx].float(), a_t)
        landmarks = batch["face_landmarks"][idx]
        if self.cfg.id_face == "detector":
            return self._by_detector(x0, idx, valid, batch, out)
        if self.cfg.id_decode_window:
            corner, side = face_window(landmarks, x0.shape[-1])
            x0 = torch.stack([x0[i, :, y : y + side, x : x + side] for i, (x, y) in enumerate(corner.tolist())])
            landmarks = landmarks - corner.float()[:, None, :] * 8
        return self._loss_at(self.decode(x0), landmarks, idx, batch, out), valid

    def _loss_at(self, image, landmarks, idx, batch, out) -> torch.Tensor:
        """1 - cos between the faces in `image` and the samples' source identities, written into `out` at `idx`."""
        # ArcFace runs in fp32 whatever the mixed precision: it is frozen and cheap at 112 px, and an
        # iresnet's activations can leave fp16's range (a random-weight r50 reaches 1e26)
        with torch.autocast(device_type=self.device.type, enabled=False):
            emb = self.encoder(image.float(), landmarks.float())
        target = self.source_embeddings[batch["id_source"][idx]]
        return out.index_put((idx,), identity_loss(emb, target))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE decode with gradient, in the VAE's own dtype (fp32 with train.vae_fp32, even under autocast)."""
        latents = (x0 / self.vae.config.scaling_factor).to(self.vae.dtype)
        with torch.autocast(device_type=self.device.type, enabled=self.vae.dtype != torch.float32):
            return self.vae.decode(latents).sample

    def _by_detector(self, x0, idx, valid, batch, out):
        """The released code's way: find the face on a detached decode of x0_hat; skip samples without one."""
        from library.faces import detect_face_landmarks

        image = self.decode(x0)
        pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        found = [detect_face_landmarks(p) for p in pixels]
        keep = [i for i, faces in enumerate(found) if faces]
        valid = valid.clone()
        valid[idx[[i for i in range(len(found)) if not found[i]]]] = False
        if not keep:
            return out, valid
        landmarks = torch.stack([torch.as_tensor(found[i][0]) for i in keep]).to(self.device)
        return self._loss_at(image[keep], landmarks, idx[keep], batch, out), valid
