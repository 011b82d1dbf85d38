"""Per-image conditioning a family may add beside the prompt: SDXL's size / crop ids. Pure tensor rules,
asked for through :meth:`library.models.family.ModelFamily.size_ids` (the loop never tests the family)."""

from __future__ import annotations

import torch

__all__ = ["size_crop_ids"]


def size_crop_ids(original_hw: tuple[int, int], crop_box: tuple[int, int, int], resolution: int,
                  flipped: bool = False) -> torch.Tensor:
    """The size / crop conditioning of one training image (SDXL's ``add_time_ids``): [6] float32 =
    (original height, original width, crop top, crop left, target height, target width), pixels.

    The rule of diffusers' ``train_text_to_image_sdxl.py`` (``original_sizes`` = the image's size before
    resizing, ``crop_top_left`` = the crop's offset in the resized image, ``compute_time_ids`` = original
    + crop + target) and of kohya sd-scripts (``library/train_util.py``: ``original_sizes_hw``,
    ``crop_top_lefts`` in bucket-resolution pixels, ``target_sizes_hw``). Here the square crop
    (`crop_box` = left, top, side in the original's pixels) is taken first and resized to `resolution`,
    which is the same as resizing the whole image by ``s = resolution / side`` and cropping there, so
    the offset is ``round(top * s), round(left * s)``. For a horizontally flipped copy the left offset
    is measured in the mirrored image: ``round((width - left - side) * s)``, as kohya's train_util does
    ("target_size[0] - crop_ltrb[2] is left in flipped image") and as diffusers gets by flipping before
    it crops. A centred crop of a square image gives (H, W, 0, 0, R, R).
    """
    height, width = original_hw
    left, top, side = crop_box
    if side <= 0:  # no crop recorded (an image made in memory): the image is the training square
        height = width = side = resolution
        left = top = 0
    scale = resolution / side
    if flipped:
        left = width - left - side
    return torch.tensor([height, width, round(top * scale), round(left * scale), resolution, resolution],
                        dtype=torch.float32)
