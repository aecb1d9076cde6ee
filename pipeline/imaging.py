"""Image I/O, scale conversion and fixed-size cropping shared by every pipeline stage.

All images are RGB ``uint8`` arrays of shape ``(H, W, 3)``. Positions are ``(x, y)`` in
pixels of the array they refer to. Scales are in µm per pixel.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import ImageError

CROP_SIZE = 96
"""Edge of a cell crop in pixels at the model's working scale (the seed's 96×96)."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 ``(H, W, 3)``.

    Raises ImageError for a missing, unreadable, corrupt or grayscale file. 16-bit images
    are scaled to 8 bits; an alpha channel is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{path}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f"{path}: not a readable image (corrupt or unsupported format)")
    return as_rgb(_to_uint8(img, path), str(path), from_bgr=True)


def _to_uint8(img: np.ndarray, name: object) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    raise ImageError(f"{name}: unsupported pixel type {img.dtype}")


def as_rgb(img: np.ndarray, name: str = "image", *, from_bgr: bool = False) -> np.ndarray:
    """Validate a colour image and return it as contiguous RGB uint8 ``(H, W, 3)``.

    Grayscale images are refused: the pipeline depends on stain colour.
    """
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        raise ImageError(f"{name}: grayscale image; a colour (RGB) image is required")
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ImageError(f"{name}: expected an RGB image, got array of shape {img.shape}")
    img = _to_uint8(img, name)
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if from_bgr:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


#: The coarsest pixel size any microscope image can have here: a 2× objective gives ~3 µm/px.
#: A larger value is a typo (13 for 0.13) or another unit, and enlarging the image to a working
#: scale would take more memory than the machine has.
MAX_UM_PER_PX = 5.0


def check_scale(um_per_px: float, name: str = "um_per_px") -> float:
    """Return ``um_per_px`` as float after checking it is a positive finite number no coarser
    than ``MAX_UM_PER_PX``."""
    value = float(um_per_px)
    if not np.isfinite(value) or value <= 0:
        raise ImageError(f"{name} must be a positive number of µm per pixel, got {um_per_px}")
    if value > MAX_UM_PER_PX:
        raise ImageError(f"{name} {um_per_px:g} µm per pixel is coarser than any microscope "
                         f"image (≤ {MAX_UM_PER_PX:g}; a 100× oil objective gives ~0.05–0.15): "
                         "a typo or another unit?")
    return value


def resample(rgb: np.ndarray, um_per_px: float, target_um_per_px: float) -> np.ndarray:
    """Resample an image from ``um_per_px`` to ``target_um_per_px``.

    Shrinking uses area averaging (no aliasing); enlarging uses bilinear interpolation.
    Returns the input unchanged when the scales agree within 0.5%.
    """
    f = check_scale(um_per_px) / check_scale(target_um_per_px, "target_um_per_px")
    if abs(f - 1.0) < 0.005:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * f)), max(1, round(h * f)))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp)


def crop_at(
    rgb: np.ndarray,
    um_per_px: float,
    center_xy: tuple[float, float],
    out_um_per_px: float,
    size: int = CROP_SIZE,
) -> np.ndarray:
    """Cut a ``size``×``size`` crop centred on ``center_xy`` at scale ``out_um_per_px``.

    ``center_xy`` is in pixels of ``rgb``. Only the window around the centre is resampled, so
    the cost does not grow with the field. Pixels outside the image are filled by reflection.
    Returns uint8 ``(size, size, 3)``.
    """
    f = check_scale(out_um_per_px, "out_um_per_px") / check_scale(um_per_px)
    cx, cy = center_xy
    # Affine map from output pixel centres to input pixel centres.
    m = np.array(
        [[f, 0.0, cx - f * (size - 1) / 2.0], [0.0, f, cy - f * (size - 1) / 2.0]],
        dtype=np.float64,
    )
    if f > 1.5:
        # Downscaling by more than ~1.5x: pre-blur the source window so warpAffine does not alias.
        half = int(np.ceil(f * size / 2)) + 4
        x0, y0 = max(0, int(cx) - half), max(0, int(cy) - half)
        x1, y1 = min(rgb.shape[1], int(cx) + half), min(rgb.shape[0], int(cy) + half)
        window = rgb[y0:y1, x0:x1]
        if window.size:
            sigma = 0.5 * (f - 1.0)
            window = cv2.GaussianBlur(window, (0, 0), sigma)
            m[0, 2] -= x0
            m[1, 2] -= y0
            rgb = window
    return cv2.warpAffine(
        rgb,
        m,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def rgb_to_yuv_u8(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 ``(..., 3)`` to YUV uint8 (BT.601, Y in [0, 255], U/V centred on 128)."""
    flat = rgb.reshape(-1, rgb.shape[-2], 3)
    return cv2.cvtColor(np.ascontiguousarray(flat), cv2.COLOR_RGB2YUV).reshape(rgb.shape)


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 ``(..., 3)`` to YUV float32 (BT.601, Y in [0, 255], U/V centred on 128)."""
    return rgb_to_yuv_u8(rgb).astype(np.float32)
