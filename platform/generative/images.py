"""Image grids as PNG files (no torchvision): images in [0, 1], shaped (N, C, H, W)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile N images into one uint8 array (rows of `nrow`, default a square), grey or RGB."""
    x = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    out = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    arr = (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return arr[..., 0] if c == 1 else arr


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """Write a grid PNG; small images (8x8 digits) are enlarged so the grid is readable."""
    img = Image.fromarray(grid(images, nrow))
    scale = max(1, 256 // max(img.size))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
