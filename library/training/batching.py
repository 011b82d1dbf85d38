"""The tensors of one micro-batch of MagiCapture's tasks: which latent, which masks, which token meets
which region, which weight and which identity target each sample gets.

Pure indexing into the cached sets (:class:`library.training.data.CachedSet`); the trainer adds the prompt ids,
the noise and the timesteps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from library.training.data import CachedSet, Sample

__all__ = ["prompt_rows", "sample_tensors", "to_device", "token_positions"]


def sample_tensors(samples: Sequence[Sample], source: CachedSet, reference: CachedSet, id_tasks: Sequence[str],
                   recon_weight: float) -> dict[str, torch.Tensor]:
    """Per sample b (B = len(samples)), on the cached sets' device:

    - ``latents`` [B, 4, h, w] and ``recon_masks`` [B, 1, h, w] (softened): the sample's own image;
    - ``ar_masks`` [B, 2, 1, h, w] and ``ar_valid`` [B, 2] bool: the refocusing target of [V1] (k = 0) and
      [V2] (k = 1) and whether the token takes part. Source: [V1] on its face. Reference: [V2] on its
      non-face region. Composed: [V1] on the reference's face (where it has one), [V2] on the rest;
    - ``recon_weights`` [B]: `recon_weight` on reference and composed samples, 1 on source samples (the
      released code's x2 in the first half of a phase);
    - ``id_task`` [B] bool (the task is in `id_tasks`), ``face_landmarks`` [B, 5, 2] pixels and
      ``face_ok`` [B] bool (where the sample's image has its face), ``id_source`` [B] (the source image
      whose embedding is the identity target);
    - ``size_ids`` [B, k]: the image's per-image conditioning ids (``CachedSet.size_ids``; a flipped copy
      has its own), only where the family has them.
    """
    latents, recon, ar_masks, ar_valid, weights, landmarks, face_ok, size_ids = [], [], [], [], [], [], [], []
    for s in samples:
        data = source if s.task == "source" else reference
        latents.append(data.latents[s.index])
        recon.append(data.recon_masks[s.index])
        landmarks.append(data.landmarks[s.index])
        if data.size_ids is not None:
            size_ids.append(data.size_ids[s.index])
        face_ok.append(data.has_face[s.index])
        empty = torch.zeros_like(data.region_masks[s.index])
        if s.task == "source":
            ar_masks.append(torch.stack([source.region_masks[s.index], empty]))
            ar_valid.append([True, False])
        elif s.task == "reference":
            ar_masks.append(torch.stack([empty, reference.region_masks[s.index]]))
            ar_valid.append([False, True])
        else:  # composed: [V1] belongs on the reference's face, [V2] everywhere else
            ar_masks.append(torch.stack([reference.face_masks[s.index], reference.region_masks[s.index]]))
            ar_valid.append([bool(reference.has_face[s.index]), True])
        weights.append(1.0 if s.task == "source" else recon_weight)
    extra = {"size_ids": torch.stack(size_ids)} if size_ids else {}
    return extra | {
        "latents": torch.stack(latents),
        "recon_masks": torch.stack(recon),
        "ar_masks": torch.stack(ar_masks),
        "ar_valid": torch.tensor(ar_valid),
        "recon_weights": torch.tensor(weights),
        "id_task": torch.tensor([s.task in id_tasks for s in samples]),
        "face_landmarks": torch.stack(landmarks),
        "face_ok": torch.stack(face_ok),
        "id_source": torch.tensor([s.id_source for s in samples]),
    }


def prompt_rows(prompts: Sequence[str], encoder_ids: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ids of a batch's prompts with each distinct prompt once. `encoder_ids(prompt)` -> [E, L] ids in
    each of the E tokenizers. Returns ``input_ids`` [B, L] (first tokenizer, per sample: where the tokens'
    positions are read), ``unique_input_ids`` [E, U, L] (the U distinct prompts, first-seen order) and
    ``prompt_index`` [B] (sample -> its row in U). The tasks' templates repeat within a batch, and the text
    encoders then run U < B rows.
    """
    unique = list(dict.fromkeys(prompts))
    rows = {p: encoder_ids(p) for p in unique}
    return {"input_ids": torch.stack([rows[p][0] for p in prompts]),
            "unique_input_ids": torch.stack([rows[p] for p in unique], 1),
            "prompt_index": torch.tensor([unique.index(p) for p in prompts])}


def token_positions(ids: torch.Tensor, first_ids: Sequence[int]) -> torch.Tensor:
    """ids [B, L] token ids -> [B, K] long: the position of `first_ids[k]` (the first vector of token k)
    in each prompt, -1 where it is absent (e.g. cut by the 77-token limit)."""
    pos = torch.full((ids.shape[0], len(first_ids)), -1, dtype=torch.long)
    for k, tid in enumerate(first_ids):
        hit = ids == tid
        found = hit.any(1)
        pos[found, k] = hit[found].float().argmax(1)
    return pos


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for CUDA goes through pinned memory without blocking, since a
    plain ``.to("cuda")`` of pageable memory waits for every kernel already queued (a sync per tensor)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
