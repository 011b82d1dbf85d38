"""Eq. 7 inside a training step: x0_hat from the prediction (the family's objective: Tweedie's formula for
epsilon prediction, x_t - sigma v for flow matching), decoded by the VAE with gradient, aligned, embedded by
the frozen identity network (dlib's ResNet v1 in PyTorch by default, or an ArcFace file), compared with
the embedding of the sample's source image.

The trainer asks :class:`IdentityTerm` for a per-sample loss; which samples take part (``loss.id_tasks``,
t < T', a face on both sides) is read from the batch the trainer built. Decoding only the latent window
around the face (``loss.id_decode_window``) is what keeps the decode affordable.
"""

from __future__ import annotations

import math

import torch

from library.config import LossConfig
from library.training.data import CachedSet
from library.training.losses import identity_loss

__all__ = ["IdentityTerm", "face_window", "window_side"]


def window_side(landmarks: torch.Tensor, latent_size: int, scale: int = 8) -> int:
    """The side (latent pixels, a multiple of 8, at most `latent_size`) of a window that holds the largest
    of the faces whose landmarks [n, 5, 2] (image pixels, `scale` per latent pixel: the family's
    ``latent_pixels``) are given: the ArcFace crop spans about 3x the landmarks' spread (dlib's padded chip
    about 2.9 eye distances), so the window does too."""
    if not len(landmarks):
        return latent_size
    spread = (landmarks.amax(1) - landmarks.amin(1)).amax(-1)  # [n] pixels
    return int(min(latent_size, max(8, math.ceil(spread.max().item() * 3.2 / scale / 8) * 8)))


def face_window(landmarks: torch.Tensor, latent_size: int, side: int | None = None,
                scale: int = 8) -> tuple[torch.Tensor, int]:
    """Top-left latent corner [b, 2] (x, y) and side (latent pixels) of a window that holds each face;
    landmarks [b, 5, 2] in image pixels (`scale` per latent pixel). `side` defaults to :func:`window_side` of
    these faces; the trainer passes the side of every face in its sets, so that a sample's window does
    not depend on which other samples share its micro-batch or process."""
    side = window_side(landmarks, latent_size, scale) if side is None else side
    centre = landmarks.mean(1) / scale
    corner = (centre - side / 2).round().clamp(0, latent_size - side).long()
    return corner, side


class IdentityTerm:
    """The identity loss of a batch. ``encoder`` maps (images [n, 3, H, W] in [-1, 1], landmarks [n, 5, 2]
    pixels) to embeddings [n, d]; ``source`` is the cached source set, whose faces are embedded once here
    (``source_embeddings`` [N, d], zeros where an image has no face)."""

    def __init__(self, encoder, source: CachedSet, vae, objective, cfg: LossConfig,
                 device: torch.device, reference: CachedSet | None = None, *, family) -> None:
        self.encoder, self.source, self.vae, self.cfg, self.device = encoder, source, vae, cfg, device
        self.family = family  # how its latents map to the VAE's (ModelFamily.latents_to_vae)
        self.objective = objective  # x0 from a prediction; which noise levels are under T' (models/objectives.py)
        # one decode window for the run: the largest face of both sets (a composed sample keeps the
        # reference's layout), so the loss of a sample is the same however the batch is split
        sets = [source] + ([reference] if reference is not None else [])
        faces = torch.cat([c.landmarks[c.has_face.cpu()].cpu() for c in sets])
        self.scale = family.latent_pixels  # image pixels per latent cell
        self.window = window_side(faces, source.latents.shape[-1], self.scale)
        with torch.no_grad():
            faces = source.has_face.cpu()
            emb = encoder(source.images[faces].to(device), source.landmarks[faces].to(device))
            self.source_embeddings = torch.zeros(len(source), emb.shape[-1], device=device)
            self.source_embeddings[faces] = emb.float()

    def plan(self, batch: dict) -> dict:
        """Which samples of a batch take the term, and where their face windows lie, from the batch's *host*
        tensors (before they move to the device), so that the step never waits on the GPU to decide:
        ``valid`` [B] bool (a task of ``loss.id_tasks``, a face in the image and in its identity target,
        t < T'), ``idx`` [n] their indices, ``corner`` [n, 2] (and as a list, ``corner_xy``) / ``side`` the
        latent windows (see :func:`face_window`; None without ``loss.id_decode_window``)."""
        valid = batch["id_task"] & batch["face_ok"] & self.objective.below(batch["timesteps"], self.cfg.id_max_timestep)
        valid &= self.source.has_face.cpu()[batch["id_source"]]
        idx = valid.nonzero().squeeze(1)
        corner = side = xy = None
        if self.cfg.id_decode_window and self.cfg.id_face != "detector" and len(idx):
            corner, side = face_window(batch["face_landmarks"][idx], batch["latents"].shape[-1], self.window, self.scale)
            xy = corner.tolist()
        return {"valid": valid, "idx": idx, "corner": corner, "side": side, "corner_xy": xy}

    def __call__(self, batch: dict, noisy: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7 on the samples of ``loss.id_tasks`` whose image has a face, whose identity target has one,
        and whose t < T'. noisy, pred [B, 4, h, w]; returns (loss [B], 0 where not applied; applied [B] bool).
        ``batch["id_plan"]`` (:meth:`plan`, made by the trainer on the host) says which samples; without it the
        plan is made here from the batch, at the cost of reading it back from the device."""
        b = noisy.shape[0]
        plan = batch.get("id_plan") or self.plan({k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)})
        valid = plan["valid"].to(self.device, non_blocking=True)
        out = torch.zeros(b, device=self.device)
        host_idx = plan["idx"]
        if not len(host_idx):
            return out, valid
        idx = host_idx.to(self.device, non_blocking=True)
        x0 = self.objective.x0(noisy[idx].float(), pred[idx].float(), batch["timesteps"][idx])
        landmarks = batch["face_landmarks"][idx]
        if self.cfg.id_face == "detector":
            return self._by_detector(x0, idx, valid, batch, out)
        if plan["corner"] is not None:
            corner, side = plan["corner"], plan["side"]
            x0 = torch.stack([x0[i, :, y : y + side, x : x + side] for i, (x, y) in enumerate(plan["corner_xy"])])
            landmarks = landmarks - corner.to(landmarks.device, non_blocking=True).float()[:, None, :] * self.scale
        return self._loss_at(self.decode(x0), landmarks, idx, batch, out), valid

    def _loss_at(self, image, landmarks, idx, batch, out) -> torch.Tensor:
        """1 - cos between the faces in `image` and the samples' source identities, written into `out` at `idx`."""
        # the identity network runs in fp32 whatever the mixed precision: it is frozen and cheap at 112-150 px,
        # and an iresnet's activations can leave fp16's range (a random-weight r50 reaches 1e26)
        with torch.autocast(device_type=self.device.type, enabled=False):
            emb = self.encoder(image.float(), landmarks.float())
        target = self.source_embeddings[batch["id_source"][idx]]
        return out.index_put((idx,), identity_loss(emb, target))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """VAE decode with gradient, in the VAE's own dtype (fp32 with train.vae_fp32, even under autocast)."""
        latents = self.family.latents_to_vae(self.vae, x0).to(self.vae.dtype)
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
