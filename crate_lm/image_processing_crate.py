"""Image processor of CRATE-family image checkpoints (ours and the ViT baselines trained beside them).

HF ViT's PIL processor (resize the shorter side, center crop, rescale, normalise) plus one step: images are brought
to the model's channel count. Pipelines hand every image over as RGB; a greyscale model (``num_channels = 1``, e.g.
Fashion-MNIST) then gets the luma ``L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`` of each pixel, exactly what
PIL's ``convert("L")`` — and so the training pipeline — computes.

This file is copied into every saved checkpoint (``trust_remote_code`` loading); it imports only numpy and
transformers.
"""

import numpy as np
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

_LUMA_WEIGHTS = np.array([19595, 38470, 7471], dtype=np.uint32)[:, None, None]  # PIL's ITU-R 601-2, in 1/65536


def _to_luma(image: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` uint8 RGB to ``(1, H, W)`` uint8 luma, rounded as PIL rounds."""
    weighted = (image.astype(np.uint32) * _LUMA_WEIGHTS).sum(0, keepdims=True)
    return ((weighted + 32768) >> 16).astype(image.dtype)


class CrateImageProcessor(ViTImageProcessorPil):
    r"""[`ViTImageProcessorPil`] for a model of ``num_channels`` input channels (1: greyscale, 3: RGB)."""

    def __init__(self, num_channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        if num_channels not in (1, 3):
            raise ValueError(f"CrateImageProcessor.num_channels={num_channels!r} is invalid: must be 1 or 3")
        self.num_channels = num_channels

    def _preprocess(self, images, *args, **kwargs):
        if self.num_channels == 1:
            images = [_to_luma(image) if image.ndim == 3 and image.shape[0] == 3 else image for image in images]
        return super()._preprocess(images, *args, **kwargs)


__all__ = ["CrateImageProcessor"]
