"""Lazy, region-wise reading of slide files: whole-slide images, pyramidal TIFF and single fields.

``open_slide(path)`` picks a backend from the file's content (never from its name alone):

- OpenSlide for vendor whole-slide formats (Aperio SVS, Hamamatsu NDPI/VMS, MIRAX MRXS,
  Leica, Philips, Sakura, Trestle, Ventana, Zeiss) and DICOM VL Whole Slide Microscopy
  series: a series is one ``.dcm`` instance file per pyramid level (plus label/overview
  images), and ``path`` may be the folder holding it (every ``.dcm`` file in it must be an
  instance of one series) or any one instance file of it; the pixel size is the base level's
  PixelSpacing;
- tifffile for every other TIFF (OME-TIFF, generic tiled or striped TIFF, pyramids written
  with tifffile, single-field TIFFs), decoding only the tiles or strips a region touches, with
  a small LRU cache of decoded tiles so consecutive camera frames are cheap;
- OpenCV for small PNG, JPEG and BMP fields, decoded once into memory.

Every backend returns RGB ``uint8`` ``(h, w, 3)`` at full resolution; pixels outside the image
(or in transparent/empty tiles) are white, like empty glass. A broken file raises ImageError
with a reason at open time where it can be detected cheaply (empty, truncated, undecodable,
content that does not match the extension); a tile that fails later raises ImageError from
``read_region``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.errors import ImageError
from pipeline.imaging import read_rgb

BACKGROUND = 255
"""Fill value for pixels outside the image or in empty tiles (white glass)."""

PLAUSIBLE_UM_PER_PX = (0.01, 20.0)
"""Pixel sizes outside this range are not a microscope scale: they are display DPI defaults
(72 dpi = 352.8 µm/px) that imaging software writes when it knows nothing better, so they are
treated as missing."""

TILE_CACHE_BYTES = 96 * 2**20

DICOM_SUFFIX = ".dcm"
_NOT_WSI_INSTANCE = ("DICOM, but not a whole-slide image instance that OpenSlide can read "
                     "(truncated, or another kind of DICOM object)")
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_KIND_BY_EXTENSION = {
    ".tif": "tiff", ".tiff": "tiff", ".svs": "tiff", ".ndpi": "tiff", ".scn": "tiff",
    ".bif": "tiff", ".qptiff": "tiff", ".btf": "tiff", ".tf8": "tiff",
    ".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".bmp": "bmp",
    ".mrxs": "mirax", ".dcm": "dicom",
}
_OME_UNITS_UM = {
    "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "pm": 1e-6,
    "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6,
}


def open_slide(path: str | os.PathLike[str]) -> "SlideImage":
    """Open a slide or field image for lazy region reading.

    Raises ImageError with a one-line reason when the file is missing, empty, truncated,
    undecodable, not a colour image, or its content does not match its extension.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p.name}: no such file")
    if p.is_dir():
        if dicom_series_files(p):
            return OpenSlideImage(p, "dicom", start=_dicom_series_start(p))
        vendor = _openslide_vendor(p)
        if vendor is None:
            raise ImageError(f"{p.name}: a folder with no .dcm series in it, and not one "
                             "OpenSlide can read")
        return OpenSlideImage(p, vendor)
    size = p.stat().st_size
    if size == 0:
        raise ImageError(f"{p.name}: empty file (0 bytes)")
    with open(p, "rb") as fh:
        head = fh.read(132)
    kind = _sniff(head)
    vendor = _openslide_vendor(p) if kind in ("tiff", "dicom", None) else None
    if vendor == "mirax":
        kind = "mirax"
    expected = _expected_kind(p)
    if expected is not None and kind is not None and expected != kind:
        raise ImageError(f"{p.name}: extension says {expected.upper()} but the content is "
                         f"{kind.upper()}")
    if vendor is not None and vendor != "generic-tiff":
        if kind == "tiff":
            _check_tiff_whole(p, size)
        return OpenSlideImage(p, vendor)
    if kind == "tiff":
        return TiffImage(p)
    if kind in ("jpeg", "png", "bmp"):
        return RasterImage(p, kind)
    if kind == "dicom":
        raise ImageError(f"{p.name}: {_NOT_WSI_INSTANCE}")
    raise ImageError(f"{p.name}: not a slide or image file that can be read (content is not "
                     "TIFF, SVS, NDPI, MRXS, DICOM, JPEG, PNG or BMP)")


def dicom_series_files(folder: Path) -> list[Path]:
    """The ``.dcm`` files directly in ``folder``, by name (hidden ones left out): a series."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries
            if e.name.lower().endswith(DICOM_SUFFIX) and not e.name.startswith((".", "~"))
            and e.is_file()]


WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage."""


def _dicom_series_start(folder: Path) -> Path:
    """The instance file to open ``folder``'s whole-slide series by, once every ``.dcm`` file
    in it is known to be a whole-slide instance and all the pyramid (VOLUME) images to be
    one series that OpenSlide reads.

    Scanners often write the slide label and the overview photograph as series of their own
    beside the pyramid: those series (no VOLUME image) are left to themselves. OpenSlide
    silently skips files of the folder it cannot read, so each pyramid file is opened on its
    own first: a truncated or foreign file fails the slide instead of losing a level.
    """
    import openslide

    files = dicom_series_files(folder)
    volume: dict[str, list[Path]] = {}
    for f in files:
        try:
            ds = _wsi_header(f, "SeriesInstanceUID", "ImageType")
        except ImageError as exc:
            raise ImageError(f"{folder.name}: {exc}") from None
        uid = str(ds.SeriesInstanceUID)
        kind = list(ds.get("ImageType") or [])
        if len(kind) > 2 and str(kind[2]).upper() == "VOLUME":
            volume.setdefault(uid, []).append(f)
    if not volume:
        raise ImageError(f"{folder.name}: none of its {len(files)} DICOM files is a pyramid "
                         "(VOLUME) image: only labels or overviews")
    if len(volume) > 1:
        raise ImageError(f"{folder.name}: holds {len(volume)} DICOM series of pyramid images; "
                         "a slide's folder must hold one")
    (pyramid,) = volume.values()
    for f in pyramid:
        try:
            with openslide.OpenSlide(str(f)):
                pass
        except Exception as exc:  # noqa: BLE001  (OpenSlideError or unsupported-format)
            raise ImageError(f"{folder.name}: {f.name}: {_dicom_file_problem(f, exc)}") from None
    return pyramid[0]


def dicom_slide_key(path: Path) -> tuple[str, str]:
    """``(StudyInstanceUID, ContainerIdentifier)`` of a whole-slide DICOM instance file: the
    slide it shows. A slide's pyramid, label and overview series all carry both (the
    container identifier is the slide's barcode, type 1 in the WSI IOD); the series UID
    stands in when a file lacks it. Raises ImageError when ``path`` is not a readable
    whole-slide instance."""
    ds = _wsi_header(path, "SeriesInstanceUID", "StudyInstanceUID", "ContainerIdentifier")
    return str(ds.get("StudyInstanceUID", "")), str(ds.get("ContainerIdentifier", "")
                                                    or ds.SeriesInstanceUID)


def _wsi_header(path: Path, *tags: str) -> Any:
    """The ``tags`` of a whole-slide DICOM instance file (pydicom Dataset, pixels not read);
    a series UID is required. Raises ImageError "<name>: <why>" when ``path`` is not a
    readable whole-slide instance."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", *tags])
        sop, uid = str(ds.get("SOPClassUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if sop != WSI_SOP_CLASS or not uid:
            raise ValueError(f"SOP class {sop or 'missing'}, series {uid or 'missing'}")
    except Exception as exc:  # noqa: BLE001  (InvalidDicomError, EOF, bad element)
        raise ImageError(f"{path.name}: {_dicom_file_problem(path, exc)}") from None
    return ds


def _dicom_file_problem(f: Path, exc: BaseException) -> str:
    try:
        with open(f, "rb") as fh:
            head = fh.read(132)
    except OSError as err:
        return f"cannot read ({err.strerror})"
    if _sniff(head) != "dicom":
        return "not a DICOM file (no DICM preamble)"
    return f"{_NOT_WSI_INSTANCE} ({_reason(exc)})"


def _expected_kind(p: Path) -> str | None:
    return _KIND_BY_EXTENSION.get(p.suffix.lower())


def _sniff(head: bytes) -> str | None:
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM":
        return "bmp"
    if head[128:132] == b"DICM":
        return "dicom"
    return None


def _openslide_vendor(p: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(p))
    except Exception:  # noqa: BLE001  (detect_format raises on some unreadable inputs)
        return None


def plausible_um_per_px(value: float | None) -> float | None:
    """``value`` if it is a finite microscope-like pixel size, else None."""
    if value is None or not math.isfinite(value):
        return None
    lo, hi = PLAUSIBLE_UM_PER_PX
    # Rationals such as 10000/0.072 round-trip with float noise: keep 6 significant digits.
    return float(f"{value:.6g}") if lo <= value <= hi else None


class SlideImage:
    """A slide opened for reading; subclasses provide the pixel levels.

    Attributes: ``path``, ``format`` (backend/vendor name), ``width``/``height`` (full
    resolution, px), ``um_per_px`` (from metadata, or None), ``um_per_px_source`` (which
    metadata gave it), ``levels`` (``(width, height, downsample)`` per pyramid level, level 0
    first).
    """

    path: Path
    format: str
    width: int
    height: int
    um_per_px: float | None
    um_per_px_source: str | None
    levels: tuple[tuple[int, int, float], ...]

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the full-resolution region with top-left ``(x, y)``.

        Parts outside the image are white.
        """
        return self.read_level_region(0, x, y, w, h)

    def read_level_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Like ``read_region`` in the pixel grid of pyramid ``level``."""
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        lw, lh, _ = self.levels[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._read(level, x0, y0, x1, y1)
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read(level, x0, y0, x1, y1)
        return out

    def read_overview(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole slide shrunk so its longer side is at most ``max_side`` px.

        Returns ``(rgb, downsample)``: ``rgb`` is uint8 ``(h, w, 3)``; a pixel of it spans
        ``downsample`` full-resolution pixels. Reads the coarsest pyramid level that is still
        at least as detailed as asked.
        """
        want = max(1.0, max(self.width, self.height) / float(max_side))
        level = 0
        for i, (_, _, ds) in enumerate(self.levels):
            if ds <= want * 1.001:
                level = i
        lw, lh, _ = self.levels[level]
        rgb = self.read_level_region(level, 0, 0, lw, lh)
        ow = max(1, round(self.width / want))
        oh = max(1, round(self.height / want))
        if (ow, oh) != (lw, lh):
            rgb = cv2.resize(rgb, (ow, oh), interpolation=cv2.INTER_AREA)
        return rgb, self.width / ow

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file; further reads are an error."""

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path.name} {self.format} {self.width}x{self.height}"
                f" um_per_px={self.um_per_px}>")


class OpenSlideImage(SlideImage):
    """Vendor whole-slide formats through OpenSlide (openslide-bin).

    ``start`` is the file OpenSlide opens when ``path`` is a DICOM series folder (OpenSlide
    finds the other instances of the series beside it).
    """

    def __init__(self, path: Path, vendor: str, start: Path | None = None) -> None:
        import openslide

        self.path, self.format = path, vendor
        try:
            self._slide = openslide.OpenSlide(str(start or path))
        except Exception as exc:  # noqa: BLE001  (OpenSlideError, or unsupported-format)
            raise ImageError(f"{path.name}: cannot open {vendor} slide: {_reason(exc)}") from None
        self.width, self.height = self._slide.dimensions
        self.levels = tuple(
            (int(w), int(h), float(ds))
            for (w, h), ds in zip(self._slide.level_dimensions, self._slide.level_downsamples)
        )
        props = self._slide.properties
        self.um_per_px, self.um_per_px_source = None, None
        try:
            mpp = plausible_um_per_px(float(props.get("openslide.mpp-x", "nan")))
        except ValueError:
            mpp = None
        if mpp is not None:
            self.um_per_px, self.um_per_px_source = mpp, f"OpenSlide {vendor} mpp-x"
        self._lock = threading.Lock()
        try:
            self._check_readable(vendor)
        except ImageError:
            self.close()
            raise

    def _check_readable(self, vendor: str) -> None:
        # OpenSlide reports a corrupt tile only when it is decoded: read the coarsest level
        # (cheap) so that a file broken from the start is refused at open time.
        lw, lh, _ = self.levels[-1]
        self._read(len(self.levels) - 1, 0, 0, min(lw, 4096), min(lh, 4096))
        if vendor != "dicom":
            return
        # A DICOM level is a file of its own, written last-frame-last: reading each level's
        # last frame finds a truncated instance; without the ...\NONE (not resampled) level
        # OpenSlide would present a downsampled level as full resolution.
        kind = self._slide.properties.get("dicom.ImageType[3]")
        if kind != "NONE":
            raise ImageError(f"{self.path.name}: the series has no full-resolution level "
                             f"(its largest level is {kind or 'of unknown type'}); the base "
                             "level file is missing")
        for level, (lw, lh, _) in enumerate(self.levels[:-1]):
            try:
                self._read(level, lw - 1, lh - 1, lw, lh)
            except ImageError as exc:
                raise ImageError(f"{self.path.name}: level {level} ({lw}x{lh}) cannot be read to "
                                 f"its last frame (a truncated instance file?): "
                                 f"{str(exc).split(': ', 1)[-1]}") from None

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        ds = self.levels[level][2]
        try:
            with self._lock:
                img = self._slide.read_region(
                    (int(round(x0 * ds)), int(round(y0 * ds))), level, (x1 - x0, y1 - y0))
        except Exception as exc:  # noqa: BLE001
            raise ImageError(f"{self.path.name}: cannot decode region: {_reason(exc)}") from None
        rgba = np.asarray(img)
        alpha = rgba[:, :, 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[:, :, :3])
        # Transparent = no tissue scanned there: composite over white glass.
        a = alpha[:, :, None].astype(np.uint16)
        rgb = (rgba[:, :, :3] * a + BACKGROUND * (255 - a) + 127) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None


def _check_tiff_whole(path: Path, size: int) -> None:
    """ImageError unless every page of a TIFF-based slide (SVS, NDPI, …) and all its image
    data lie inside the file: OpenSlide opens a file cut short (still being copied) and
    reads the pages before the cut, so a partial slide was counted, then counted again."""
    import tifffile

    with _TiffErrors() as damage:
        try:
            with tifffile.TiffFile(str(path)) as tif:
                end = 0
                for page in tif.pages:
                    offsets = getattr(page, "dataoffsets", ())
                    if len(offsets):
                        end = max(end, int(np.max(np.asarray(offsets, np.int64)
                                                  + np.asarray(page.databytecounts, np.int64))))
        except Exception as exc:  # noqa: BLE001  (TiffFileError, struct errors on truncation)
            raise ImageError(f"{path.name}: truncated or damaged TIFF: {_reason(exc)}") from None
    if damage.messages:
        raise ImageError(f"{path.name}: truncated or damaged TIFF: {damage.messages[0][:200]}")
    if end > size:
        raise ImageError(f"{path.name}: truncated: image data runs to byte {end} but the file "
                         f"has {size} bytes")


class _TiffErrors(logging.Handler):
    """Collects what tifffile logs as an error while a file opens (an IFD offset past the end
    of the file, a corrupted tag list): it reads on and only logs them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []
        # The logger is the process's: the watcher thread plans one file while the counting
        # thread reads another, and neither may take the other's damage for its own.
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            self.messages.append(record.getMessage())

    def __enter__(self) -> "_TiffErrors":
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tifffile").removeHandler(self)


class TiffImage(SlideImage):
    """OME-TIFF, pyramidal and generic TIFF through tifffile, decoding only touched tiles."""

    def __init__(self, path: Path, cache_bytes: int = TILE_CACHE_BYTES) -> None:
        import tifffile

        self.path = path
        with _TiffErrors() as damage:
            try:
                self._tif = tifffile.TiffFile(str(path))
            except Exception as exc:  # noqa: BLE001  (TiffFileError, struct errors on truncation)
                raise ImageError(f"{path.name}: not a readable TIFF: {_reason(exc)}") from None
            try:
                len(self._tif.pages)  # index every page: a cut IFD chain shows only now
                self._init(tifffile, cache_bytes)
            except ImageError:
                self.close()
                raise
            except Exception as exc:  # noqa: BLE001  (malformed tags surface as many types)
                self.close()
                raise ImageError(f"{path.name}: malformed TIFF: {_reason(exc)}") from None
        if damage.messages:
            # tifffile reads past a page chain cut short (a file still being copied) and only
            # logs it: the pages before the cut open, and a partial slide was counted.
            self.close()
            raise ImageError(f"{path.name}: truncated or damaged TIFF: "
                             f"{damage.messages[0][:200]}")

    def _init(self, tifffile: Any, cache_bytes: int) -> None:
        tif, name = self._tif, self.path.name
        series = [s for s in tif.series if s.keyframe is not None]
        if not series:
            raise ImageError(f"{name}: TIFF holds no image")
        main = max(series, key=lambda s: s.keyframe.imagewidth * s.keyframe.imagelength)
        self.format = "ome-tiff" if tif.is_ome else "tiff"
        pages = [lvl.keyframe for lvl in main.levels]
        base = pages[0]
        self.width, self.height = int(base.imagewidth), int(base.imagelength)
        for page in pages:
            if page.samplesperpixel not in (3, 4):
                raise ImageError(f"{name}: not an RGB colour image ({page.samplesperpixel} "
                                 "sample(s) per pixel); a colour image is required")
            if page.imagedepth != 1:
                raise ImageError(f"{name}: volumetric TIFF (depth {page.imagedepth}) not supported")
            if np.dtype(page.dtype) not in (np.uint8, np.uint16):
                raise ImageError(f"{name}: unsupported pixel type {page.dtype}")
        # Keep only levels that shrink monotonically (some files carry unrelated pages).
        kept = [base]
        for page in pages[1:]:
            if page.imagewidth < kept[-1].imagewidth and page.imagelength < kept[-1].imagelength:
                kept.append(page)
        self._pages = kept
        self.levels = tuple(
            (int(p.imagewidth), int(p.imagelength), self.width / float(p.imagewidth))
            for p in kept
        )
        size = os.fstat(tif.filehandle.fileno()).st_size if tif.filehandle else 0
        for page in kept:
            ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
            if ends.size and int(ends.max()) > size:
                raise ImageError(f"{name}: truncated: image data runs to byte {int(ends.max())} "
                                 f"but the file has {size} bytes")
        self.um_per_px, self.um_per_px_source = _tiff_um_per_px(tif, base)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        self._lock = threading.Lock()
        # Decode one segment per level now so an unsupported codec is refused at open time.
        for level, page in enumerate(kept):
            counts = np.asarray(page.databytecounts)
            nonempty = np.flatnonzero(counts)
            if nonempty.size:
                self._segment(level, int(nonempty[0]))

    def _grid(self, page: Any) -> tuple[int, int, int, int]:
        """(segment width, segment height, columns, rows) of a page's tiles or strips."""
        if page.is_tiled:
            sw, sh = int(page.tilewidth), int(page.tilelength)
        else:
            sw, sh = int(page.imagewidth), int(page.rowsperstrip or page.imagelength)
            sh = min(sh, int(page.imagelength))
        return sw, sh, math.ceil(page.imagewidth / sw), math.ceil(page.imagelength / sh)

    def _segment(self, level: int, index: int) -> np.ndarray | None:
        """Decoded segment ``index`` of a level as uint8 ``(h, w, samples)``; None if empty."""
        key = (level, index)
        with self._lock:
            seg = self._cache.get(key, False)
            if seg is not False:
                self._cache.move_to_end(key)
                return seg
        page = self._pages[level]
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0 or offset == 0:
            seg = None
        else:
            data = os.pread(self._fd, count, offset)
            if len(data) != count:
                raise ImageError(f"{self.path.name}: truncated tile {index} at level {level}")
            try:
                arr, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
            except Exception as exc:  # noqa: BLE001  (codec errors come in many types)
                raise ImageError(f"{self.path.name}: cannot decode tile {index} at level {level} "
                                 f"({_codec_name(page.compression)}): {_reason(exc)}") from None
            seg = np.asarray(arr)[0]
            if seg.dtype == np.uint16:
                seg = (seg >> 8).astype(np.uint8)
            seg = seg[: shape[1], : shape[2]]
        with self._lock:
            self._cache[key] = seg
            self._cache_bytes += 0 if seg is None else seg.nbytes
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= 0 if old is None else old.nbytes
        return seg

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if getattr(self, "_fd", None) is None:
            raise ImageError(f"{self.path.name}: slide is closed")
        page = self._pages[level]
        sw, sh, nx, ny = self._grid(page)
        separate = page.planarconfig == 2 and page.samplesperpixel > 1
        planes = 3 if separate else 1
        out = np.full((y1 - y0, x1 - x0, 3), BACKGROUND, np.uint8)
        for row in range(y0 // sh, (y1 - 1) // sh + 1):
            for col in range(x0 // sw, (x1 - 1) // sw + 1):
                tx, ty = col * sw, row * sh
                ax0, ay0 = max(x0, tx), max(y0, ty)
                ax1, ay1 = min(x1, tx + sw), min(y1, ty + sh)
                for plane in range(planes):
                    seg = self._segment(level, plane * nx * ny + row * nx + col)
                    if seg is None:
                        continue
                    part = seg[ay0 - ty:ay1 - ty, ax0 - tx:ax1 - tx]
                    dst = out[ay0 - y0:ay0 - y0 + part.shape[0], ax0 - x0:ax0 - x0 + part.shape[1]]
                    if separate:
                        dst[:, :, plane] = part[:, :, 0]
                    else:
                        dst[:] = part[:, :, :3]
        return out

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None
        if hasattr(self, "_cache"):
            self._cache.clear()


def _tiff_um_per_px(tif: Any, page: Any) -> tuple[float | None, str | None]:
    """Pixel size from OME PhysicalSizeX, ImageJ units or the TIFF resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            for el in root.iter():
                if el.tag.endswith("}Pixels") or el.tag == "Pixels":
                    value = el.get("PhysicalSizeX")
                    if value is not None:
                        factor = _OME_UNITS_UM.get(el.get("PhysicalSizeXUnit", "µm"))
                        if factor is not None:
                            um = plausible_um_per_px(float(value) * factor)
                            if um is not None:
                                return um, "OME PhysicalSizeX"
                    break
        except (ET.ParseError, ValueError):
            pass
    tags = page.tags
    xres = tags.get("XResolution")
    if xres is None:
        return None, None
    try:
        num, den = xres.value
        ppu = num / den
    except (TypeError, ValueError, ZeroDivisionError):
        return None, None
    if not ppu or not math.isfinite(ppu) or ppu <= 0:
        return None, None
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    if unit == 1:
        ij = (tif.imagej_metadata or {}) if tif.is_imagej else {}
        if str(ij.get("unit", "")).lower() in ("micron", "um", "µm", "\\u00b5m"):
            um = plausible_um_per_px(1.0 / ppu)
            return (um, "ImageJ resolution") if um is not None else (None, None)
        return None, None
    per_unit_um = {2: 25400.0, 3: 10000.0}.get(unit)
    if per_unit_um is None:
        return None, None
    um = plausible_um_per_px(per_unit_um / ppu)
    return (um, "TIFF resolution tags") if um is not None else (None, None)


class RasterImage(SlideImage):
    """A small PNG, JPEG or BMP field decoded once into memory with OpenCV."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.format = path, kind
        data = path.read_bytes()
        if kind == "jpeg" and b"\xff\xd9" not in data[-4096:]:
            # libjpeg pads a truncated JPEG with grey and only warns: refuse it instead.
            raise ImageError(f"{path.name}: truncated JPEG (no end-of-image marker)")
        if kind == "png" and b"IEND" not in data[-64:]:
            raise ImageError(f"{path.name}: truncated PNG (no IEND chunk)")
        self._rgb = read_rgb(path)
        self.height, self.width = self._rgb.shape[:2]
        self.levels = ((self.width, self.height, 1.0),)
        self.um_per_px, self.um_per_px_source = _raster_um_per_px(path)

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._rgb is None:
            raise ImageError(f"{self.path.name}: image is closed")
        return self._rgb[y0:y1, x0:x1].copy()

    def close(self) -> None:
        self._rgb = None


def _raster_um_per_px(path: Path) -> tuple[float | None, str | None]:
    """Pixel size from a PNG pHYs chunk or JPEG JFIF/EXIF density, via Pillow's lazy header read."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            dpi = im.info.get("dpi")
    except Exception:  # noqa: BLE001  (header parsing only; the pixels were decoded already)
        return None, None
    if not dpi:
        return None, None
    try:
        um = plausible_um_per_px(25400.0 / float(dpi[0]))
    except (TypeError, ValueError, ZeroDivisionError):
        return None, None
    return (um, "image DPI header") if um is not None else (None, None)


def _codec_name(compression: Any) -> str:
    return getattr(compression, "name", None) or f"compression {int(compression)}"


def pyramid_levels(rgb: np.ndarray, min_level_side: int = 512) -> list[np.ndarray]:
    """``rgb`` and its halvings (area-averaged) until the longer side is below ``min_level_side``."""
    levels = [rgb]
    while max(levels[-1].shape[:2]) >= 2 * min_level_side:
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    return levels


def write_pyramid(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    um_per_px: float,
    *,
    tile: int = 256,
    compression: str = "jpeg",
    ome: bool = False,
    min_level_side: int = 512,
) -> Path:
    """Write RGB uint8 ``(H, W, 3)`` as a tiled pyramidal TIFF that ``open_slide`` reads lazily.

    Levels halve until the longer side is below ``min_level_side`` and are stored as SubIFDs
    of the full-resolution page. The pixel size goes into the resolution tags (centimetre
    unit) and, with ``ome=True``, into OME PhysicalSizeX/Y. ``compression`` is a tifffile
    codec name ("jpeg", "zlib", "none"...). Returns ``path``.
    """
    import tifffile

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"write_pyramid needs RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    levels = pyramid_levels(rgb, min_level_side)
    ppcm = 1e4 / float(um_per_px)
    opts: dict[str, Any] = dict(tile=(tile, tile), photometric="rgb",
                                compression=None if compression == "none" else compression,
                                resolutionunit="CENTIMETER")
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31, ome=ome) as tw:
        meta = {"PhysicalSizeX": um_per_px, "PhysicalSizeY": um_per_px} if ome else None
        tw.write(levels[0], subifds=len(levels) - 1, resolution=(ppcm, ppcm), metadata=meta,
                 **opts)
        for i, level in enumerate(levels[1:], start=1):
            ds = rgb.shape[1] / level.shape[1]
            tw.write(level, subfiletype=1, resolution=(ppcm / ds, ppcm / ds), **opts)
    return path


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"\s+", " ", text)[:300]
