"""Training-time augmentation of cell crops: dihedral, stain/colour, optics and compression.

Works on a batch of RGB uint8 crops ``(N, S, S, 3)`` and returns a new batch of the same
shape and dtype. Every random draw comes from the ``numpy.random.Generator`` passed in, so a
batch is reproducible from a seed. Colour operations are vectorised over the batch (a
per-image 3×3 matrix in optical-density space for HED jitter and one in RGB for white
balance, hue and saturation); blur and JPEG go through OpenCV per image.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field

from pipeline.params import Params


class AugmentParams(Params):
    """Ranges of the random colour, optics and geometry perturbations (0 disables one)."""

    hed_sigma: float = Field(ge=0, le=0.5)
    """Std of the multiplicative jitter of each haematoxylin/eosin/DAB channel."""
    hed_bias: float = Field(ge=0, le=0.5)
    hue_deg: float = Field(ge=0, le=90)
    saturation: float = Field(ge=0, lt=1)
    """Saturation is scaled by a factor in [1 - s, 1 + s]."""
    white_balance: float = Field(ge=0, lt=1)
    """Per-channel gains in [1 - w, 1 + w]."""
    gamma: float = Field(ge=0, lt=1)
    """Gamma in [1 - g, 1 + g]."""
    brightness: float = Field(ge=0, lt=1)
    contrast: float = Field(ge=0, lt=1)
    grayscale_p: float = Field(ge=0, le=1)
    blur_p: float = Field(ge=0, le=1)
    blur_sigma_max: float = Field(ge=0)
    """Gaussian blur (defocus) sigma in pixels of the working scale."""
    noise_sigma_max: float = Field(ge=0)
    """Std of additive Gaussian noise, on the [0, 1] intensity scale."""
    jpeg_p: float = Field(ge=0, le=1)
    jpeg_quality_min: int = Field(ge=5, le=100)
    shrink_p: float = Field(ge=0, le=1)
    """Chance of keeping only a central window and reflecting it out to the full size, as
    happens to cells cut from small source images."""
    shrink_min: float = Field(gt=0, le=1)


# Ruifrok & Johnston stain vectors (as in skimage.color.rgb2hed).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# BT.601 RGB -> YUV (U, V centred on 0) and back, for hue rotation and saturation.
_YUV_FROM_RGB = np.array([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436],
                          [0.615, -0.51499, -0.10001]])
_RGB_FROM_YUV = np.linalg.inv(_YUV_FROM_RGB)


# Quarter turns counter-clockwise, as np.rot90 counts them.
_CV_ROTATE = (None, cv2.ROTATE_90_COUNTERCLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_CLOCKWISE)


def dihedral(crops: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Apply dihedral transform ``k[i]`` in 0..7 (4 rotations × optional flip) to each crop."""
    out = np.empty_like(crops)
    for i, (c, t) in enumerate(zip(crops, k)):
        # OpenCV's rotate and flip equal np.rot90 / [:, ::-1] at a fraction of the copy cost.
        r = int(t) % 4
        c = cv2.rotate(c, _CV_ROTATE[r]) if r else c
        out[i] = cv2.flip(c, 1) if t >= 4 else c
    return out


def _shrink(crop: np.ndarray, frac: float) -> np.ndarray:
    s = crop.shape[0]
    k = max(8, int(round(s * frac)))
    a = (s - k) // 2
    inner = crop[a:a + k, a:a + k]
    pad = s - k
    return cv2.copyMakeBorder(inner, pad // 2, pad - pad // 2, pad // 2, pad - pad // 2,
                              cv2.BORDER_REFLECT_101)


def augment(crops: np.ndarray, rng: np.random.Generator, p: AugmentParams) -> np.ndarray:
    """Randomly perturb a batch of RGB uint8 crops ``(N, S, S, 3)``; returns the same shape.

    Includes a random dihedral transform (8 variants) per crop.
    """
    n = crops.shape[0]
    crops = dihedral(crops, rng.integers(0, 8, n))
    if p.shrink_p > 0:
        for i in np.flatnonzero(rng.random(n) < p.shrink_p):
            crops[i] = _shrink(crops[i], rng.uniform(p.shrink_min, 1.0))
    x = crops.astype(np.float32) / 255.0
    flat = x.reshape(n, -1, 3)

    # Stain jitter in optical-density space: od' = od @ A_i + b_i.
    alpha = 1.0 + rng.normal(0.0, p.hed_sigma, (n, 3))
    beta = rng.normal(0.0, p.hed_bias, (n, 3))
    a = np.einsum("ij,nj,jk->nik", _HED_FROM_RGB, alpha, _RGB_FROM_HED).astype(np.float32)
    b = (beta @ _RGB_FROM_HED).astype(np.float32)
    od = -np.log(np.clip(flat, 1.0 / 255.0, 1.0))
    od = np.einsum("npc,ncd->npd", od, a) + b[:, None, :]
    flat = np.exp(-np.maximum(od, 0.0))

    # White balance, hue rotation and saturation as one linear map per image.
    gains = 1.0 + rng.uniform(-p.white_balance, p.white_balance, (n, 3))
    theta = np.deg2rad(rng.uniform(-p.hue_deg, p.hue_deg, n))
    sat = 1.0 + rng.uniform(-p.saturation, p.saturation, n)
    gray = rng.random(n) < p.grayscale_p
    sat[gray] = 0.0
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1] = rot[:, 2, 2] = np.cos(theta) * sat
    rot[:, 1, 2] = -np.sin(theta) * sat
    rot[:, 2, 1] = np.sin(theta) * sat
    m = np.einsum("nc,cd,nde,ef->ncf", gains, _YUV_FROM_RGB.T, rot.transpose(0, 2, 1),
                  _RGB_FROM_YUV.T, optimize=True).astype(np.float32)
    flat = np.einsum("npc,ncd->npd", flat, m)
    np.clip(flat, 0.0, 1.0, out=flat)

    gamma = (1.0 + rng.uniform(-p.gamma, p.gamma, n)).astype(np.float32)
    flat = flat ** gamma[:, None, None]
    contrast = (1.0 + rng.uniform(-p.contrast, p.contrast, n)).astype(np.float32)
    bright = rng.uniform(-p.brightness, p.brightness, n).astype(np.float32)
    mean = flat.mean(axis=(1, 2), keepdims=True)
    flat = (flat - mean) * contrast[:, None, None] + mean + bright[:, None, None]
    x = flat.reshape(crops.shape)

    if p.blur_p > 0 and p.blur_sigma_max > 0:
        for i in np.flatnonzero(rng.random(n) < p.blur_p):
            x[i] = cv2.GaussianBlur(x[i], (0, 0), rng.uniform(0.3, p.blur_sigma_max))
    if p.noise_sigma_max > 0:
        sigma = rng.uniform(0.0, p.noise_sigma_max, n).astype(np.float32)
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * sigma[:, None, None, None]
    out = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if p.jpeg_p > 0:
        for i in np.flatnonzero(rng.random(n) < p.jpeg_p):
            q = int(rng.integers(p.jpeg_quality_min, 96))
            ok, buf = cv2.imencode(".jpg", out[i], [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok:
                out[i] = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out
