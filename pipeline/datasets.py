"""Labelled cell crops for training and evaluation: sources, caching, splits and sampling.

A *sample* is one labelled cell: an image file, a label, the file's µm/px and optionally a
centre (else the image centre). Sources:

- a manifest CSV with ``path,label`` columns (the ../shared/data/pbc format), paths relative
  to the CSV's folder;
- a folder-per-class tree (``root/<class name>/*.png|jpg|…``), how a lab brings its crops;
- Pascal VOC boxes (../shared/data/bccd) turned into non-leukocyte samples: crops centred on
  RBC and platelet boxes, and background patches away from every white cell;
- cells marked by their centres on whole fields or slides (``points``): a truth JSON in the
  format ``marrowcount make-slide`` writes and ``eval-analyze`` reads, its image beside it.
  Training on cells in their field teaches what a crop cut *from a field* looks like:
  neighbours reaching into it, another background, the detector's centring.

A source marked ``train_only`` (e.g. virtual slides composed from training cells) only ever
adds to the training split: the split of every other source stays exactly as it was, so a
test split is never contaminated and earlier figures stay comparable.

A sample labelled ``ANY_LEUKOCYTE`` is a white cell whose type is not known (a VOC "WBC" box,
or a lab's unsorted white cells from its own scanner). It teaches the model that such a cell
is one of the counted classes without saying which; see ``pipeline.train``.

``load_crops`` cuts every sample once, at the model's working scale, into a square a little
larger than the model input (``CACHE_SIZE``), so training can re-crop at shifted centres and
jittered scales without touching the disk again.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from pipeline.errors import ImageError, MarrowError
from pipeline.imaging import CROP_SIZE, check_scale, crop_at, read_rgb
from pipeline.params import Params

CACHE_SIZE = 128
"""Edge of the cached square at working scale: room for ±15% scale and a few µm of shift."""
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
ANY_LEUKOCYTE = "leukocyte"
"""Label of a white cell of unknown type; its index is ``len(classes)`` (see label_index)."""


class DatasetError(MarrowError):
    """A training or evaluation source that cannot be used (missing, empty, unknown class)."""


class SourceParams(Params):
    """One labelled source. ``rename`` maps source labels to taxonomy names; ``exclude``
    lists source labels left out; ``max_per_label`` caps each label (0 = all), drawn from
    the seed.

    Only ``kind``, ``path`` and ``um_per_px`` must be given. The other keys default here, not
    in config/default.yaml: an item of a list a lab writes cannot take defaults from there."""

    kind: Literal["manifest", "folder", "voc", "points"]
    path: Path
    um_per_px: float = Field(gt=0)
    train_only: bool = False
    """Only ever in the training split, never validated or tested on."""
    exclude: tuple[str, ...] = ()
    rename: dict[str, str] = {}
    max_per_label: int = Field(0, ge=0)
    background_per_image: int = Field(0, ge=0)
    """voc only: background patches per image, labelled ``non_leukocyte``."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: str
    um_per_px: float
    center: tuple[float, float] | None = None
    """(x, y) in pixels of the file; None means the image centre."""
    train_only: bool = False


def read_manifest(csv_path: Path, um_per_px: float) -> list[Sample]:
    """Samples from a ``path,label`` CSV; paths are relative to the CSV's folder."""
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: manifest not found")
    out = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{csv_path}: a manifest needs 'path' and 'label' columns")
        for row in reader:
            out.append(Sample(str(csv_path.parent / row["path"]), row["label"], um_per_px))
    if not out:
        raise DatasetError(f"{csv_path}: manifest lists no images")
    return out


def read_folder_tree(root: Path, um_per_px: float) -> list[Sample]:
    """Samples from ``root/<label>/<image>``; every sub-folder name is taken as a label."""
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found")
    out, unread = [], []
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            unread.append(f.name)  # no class folder: whose is it?
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                out.append(Sample(str(f), sub.name, um_per_px))
            elif f.is_dir() and any(x.suffix.lower() in IMAGE_SUFFIXES for x in f.rglob("*")):
                unread.append(f"{sub.name}/{f.name}/")  # crops sorted by batch or date
    if unread:
        # Silently skipped, a class sorted into sub-folders looked empty ("no training cells").
        raise DatasetError(f"{root}: images outside the class folders are not read: "
                           f"{', '.join(unread[:5])}{' …' if len(unread) > 5 else ''}; put "
                           "each class's images directly in root/<class>/")
    if not out:
        raise DatasetError(f"{root}: no images in class sub-folders (expected root/<class>/*.png)")
    return out


def _voc_boxes(xml_path: Path) -> list[tuple[str, float, float, float, float]]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        name = (obj.findtext("name") or "").strip()
        x0, y0, x1, y1 = (float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((name, x0, y0, x1, y1))
    return boxes


def read_voc(root: Path, um_per_px: float, background_per_image: int,
             rng: np.random.Generator) -> list[Sample]:
    """Samples centred on every VOC box (label = box name), plus background patches.

    Non-WBC boxes whose centre lies inside a (slightly enlarged) WBC box are skipped, so a
    "not a leukocyte" crop never centres on a white cell. Background patches are drawn at
    least 12 µm from every WBC box and labelled ``background``.
    """
    ann = root / "Annotations"
    if not ann.is_dir():
        raise DatasetError(f"{root}: no Annotations folder (Pascal VOC layout expected)")
    margin = 3.0 / um_per_px
    keep_out = 12.0 / um_per_px
    out = []
    for xml in sorted(ann.glob("*.xml")):
        img = root / "JPEGImages" / (xml.stem + ".jpg")
        if not img.is_file():
            continue
        boxes = _voc_boxes(xml)
        wbc = [b[1:] for b in boxes if b[0] == "WBC"]
        for name, x0, y0, x1, y1 in boxes:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if name != "WBC" and any(a - margin <= cx <= c + margin and b - margin <= cy <= d + margin
                                     for a, b, c, d in wbc):
                continue
            out.append(Sample(str(img), name, um_per_px, (cx, cy)))
        for _ in range(background_per_image):
            for _try in range(20):
                cx, cy = rng.uniform(0, 640), rng.uniform(0, 480)
                if all(cx < a - keep_out or cx > c + keep_out or cy < b - keep_out or cy > d + keep_out
                       for a, b, c, d in wbc):
                    out.append(Sample(str(img), "background", um_per_px, (cx, cy)))
                    break
    return out


def read_points(truth_path: Path, um_per_px: float) -> list[Sample]:
    """Samples at the cell centres of a truth JSON (``cells``: ``x, y, class``; ``others``:
    ``x, y, kind``, e.g. platelet, debris) whose image is the ``.tif`` of the same name.

    Raises DatasetError when the JSON or its image is missing, or when the JSON's
    ``um_per_px`` differs from the source's by more than 1%."""
    image = truth_path.with_suffix(".tif")
    try:
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
        cells, others = truth["cells"], truth.get("others", [])
        stated = float(truth["um_per_px"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{truth_path}: not a readable truth JSON with um_per_px and cells "
                           f"({str(exc).splitlines()[0]})") from None
    if not image.is_file():
        raise DatasetError(f"{truth_path}: its image {image.name} is not beside it")
    if abs(stated / um_per_px - 1) > 0.01:
        raise DatasetError(f"{truth_path}: the truth says {stated} µm/px, the source "
                           f"{um_per_px}")
    return ([Sample(str(image), c["class"], um_per_px, (float(c["x"]), float(c["y"])))
             for c in cells]
            + [Sample(str(image), o["kind"], um_per_px, (float(o["x"]), float(o["y"])))
               for o in others])


def read_source(src: SourceParams, root: Path, seed: int) -> list[Sample]:
    """Read one configured source, apply ``exclude``, ``rename`` and ``max_per_label``."""
    path = src.path if src.path.is_absolute() else root / src.path
    rng = np.random.default_rng(seed)
    if src.kind == "manifest":
        samples = read_manifest(path, src.um_per_px)
    elif src.kind == "folder":
        samples = read_folder_tree(path, src.um_per_px)
    elif src.kind == "points":
        samples = read_points(path, src.um_per_px)
    else:
        samples = read_voc(path, src.um_per_px, src.background_per_image, rng)
    samples = [s for s in samples if s.label not in src.exclude]
    if src.max_per_label:  # capped per source label, before renaming merges labels
        by: dict[str, list[Sample]] = {}
        for s in samples:
            by.setdefault(s.label, []).append(s)
        samples = []
        for label in sorted(by):
            items = by[label]
            if len(items) > src.max_per_label:
                pick = np.sort(rng.choice(len(items), src.max_per_label, replace=False))
                items = [items[i] for i in pick]
            samples += items
    return [Sample(s.path, src.rename.get(s.label, s.label), s.um_per_px, s.center,
                   src.train_only) for s in samples]


def label_index(classes: Sequence[str]) -> dict[str, int]:
    """Label name to integer label: the classes in order, then ``ANY_LEUKOCYTE`` as
    ``len(classes)``, so splits of the real classes do not move when such cells are added."""
    if ANY_LEUKOCYTE in classes:
        raise DatasetError(f"{ANY_LEUKOCYTE!r} is reserved for white cells of unknown type; "
                           "rename that class in the taxonomy")
    return {**{c: i for i, c in enumerate(classes)}, ANY_LEUKOCYTE: len(classes)}


def check_labels(samples: Sequence[Sample], classes: Sequence[str], *, where: str = "",
                 reviewer_only: Sequence[str] = ()) -> None:
    """Raise DatasetError naming every label that is neither one of ``classes`` (a model's)
    nor ``ANY_LEUKOCYTE``, with what to do: a ``reviewer_only`` class of the taxonomy is left
    out or given a model, a near miss is probably a typo. ``where`` names the source."""
    unknown = sorted({s.label for s in samples} - set(label_index(classes)))
    if not unknown:
        return
    parts = []
    named = [u for u in unknown if u in reviewer_only]
    if named:
        parts.append(f"{named}: reviewer_only class(es) of the taxonomy, which the model does "
                     f"not learn: leave them out of this source (exclude: {named}, under the "
                     "source's own label names if it renames them) or set reviewer_only: "
                     "false on them in the taxonomy to train them")
    other = [u for u in unknown if u not in reviewer_only]
    if other:
        hints = [f"{u!r} -> {m[0]!r}?" for u in other
                 for m in [difflib.get_close_matches(u, [*classes, *reviewer_only], 1, 0.8)]
                 if m]
        parts.append(f"{other}: not classes of the taxonomy"
                     + (f" (a typo? {', '.join(hints)})" if hints else ""))
    raise DatasetError(f"{where + ': ' if where else ''}{'; '.join(parts)}. The model's classes: "
                       f"{list(classes)} (and {ANY_LEUKOCYTE!r} for a white cell of unknown "
                       "type)")


def data_hash(samples: Iterable[Sample]) -> str:
    """SHA-1 over every sample's file name, size, label, scale and centre (order-free)."""
    rows = sorted(f"{Path(s.path).name}|{os.path.getsize(s.path)}|{s.label}|{s.um_per_px}|{s.center}"
                  for s in samples)
    return hashlib.sha1("\n".join(rows).encode()).hexdigest()


def cut(sample: Sample, rgb: np.ndarray, work_um_per_px: float, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    c = sample.center if sample.center is not None else ((w - 1) / 2, (h - 1) / 2)
    return crop_at(rgb, sample.um_per_px, c, work_um_per_px, size=size)


@dataclass(frozen=True)
class CropSet:
    """Samples cut at working scale: ``crops`` uint8 ``(N, S, S, 3)``, ``labels`` int64 (N),
    ``samples`` the N kept samples, ``problems`` one line per sample that could not be read."""

    crops: np.ndarray
    labels: np.ndarray
    samples: tuple[Sample, ...]
    problems: tuple[str, ...]

    @property
    def train_only(self) -> np.ndarray:
        """Bool ``(N,)``: the samples that only ever train (see ``split``)."""
        return np.array([s.train_only for s in self.samples], dtype=bool)


def load_crops(samples: Sequence[Sample], classes: Sequence[str], work_um_per_px: float,
               size: int = CACHE_SIZE, threads: int = 2) -> CropSet:
    """Read and cut every sample; unreadable files are reported in ``problems`` and skipped."""
    check_scale(work_um_per_px, "work_um_per_px")
    index = label_index(classes)
    by_file: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_file.setdefault(s.path, []).append(i)
    crops: list[np.ndarray | None] = [None] * len(samples)
    problems: list[str] = []

    def work(path: str) -> None:
        try:
            rgb = read_rgb(path)
        except ImageError as exc:
            problems.append(str(exc))
            return
        for i in by_file[path]:
            crops[i] = cut(samples[i], rgb, work_um_per_px, size)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(work, by_file))
    keep = [i for i, c in enumerate(crops) if c is not None]
    arr = np.stack([crops[i] for i in keep]) if keep else np.zeros((0, size, size, 3), np.uint8)
    return CropSet(arr, np.array([index[samples[i].label] for i in keep], dtype=np.int64),
                   tuple(samples[i] for i in keep), tuple(sorted(problems)))


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Assign each item a fold 0..k-1, stratified by label and reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        folds[idx] = (np.arange(len(idx)) + rng.integers(k)) % k
    return folds


def split(labels: np.ndarray, seed: int, val_fraction: float,
          train_only: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Stratified 5:1 train+val/test split, then ``val_fraction`` of train+val held out for
    validation (monitoring and temperature fitting). Returns index arrays into ``labels``.

    Items marked in the bool mask ``train_only`` all go to train; the others are split exactly
    as they would be without them."""
    rest = np.arange(len(labels)) if train_only is None else np.flatnonzero(~train_only)
    test = stratified_folds(labels[rest], 6, seed) == 0
    trainval = rest[~test]
    k = max(2, int(round(1.0 / val_fraction)))
    val_mask = stratified_folds(labels[trainval], k, seed + 1) == 0
    extra = np.zeros(0, np.int64) if train_only is None else np.flatnonzero(train_only)
    return {"train": np.sort(np.concatenate([trainval[~val_mask], extra])),
            "val": trainval[val_mask], "test": rest[test]}


def epoch_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch's sample order. ``per_class`` > 0 draws exactly that many of each class
    (without replacement while it can, then repeats, which re-cropping makes distinct);
    0 takes every item once."""
    if per_class <= 0:
        return rng.permutation(len(labels))
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        reps, rest = divmod(per_class, len(idx))
        out += [idx] * reps + [rng.choice(idx, rest, replace=False)]
    return rng.permutation(np.concatenate(out))


def recrop(cached: np.ndarray, work_um_per_px: float, rng: np.random.Generator,
           shift_px: float, scale_jitter: float, size: int = CROP_SIZE) -> np.ndarray:
    """Cut ``size``×``size`` crops from cached squares ``(N, S, S, 3)`` at random shifted
    centres (uniform in ±``shift_px``) and scales (factor in 1 ± ``scale_jitter``)."""
    n, s = cached.shape[:2]
    out = np.empty((n, size, size, 3), np.uint8)
    c = (s - 1) / 2
    for i in range(n):
        dx, dy = rng.uniform(-shift_px, shift_px, 2) if shift_px > 0 else (0.0, 0.0)
        f = 1.0 + rng.uniform(-scale_jitter, scale_jitter) if scale_jitter > 0 else 1.0
        out[i] = crop_at(cached[i], work_um_per_px, (c + dx, c + dy), work_um_per_px * f, size)
    return out


def centre(cached: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The central ``size``×``size`` window of cached squares (no resampling)."""
    a = (cached.shape[1] - size) // 2
    return np.ascontiguousarray(cached[:, a:a + size, a:a + size])


def load_sources(sources: Sequence[SourceParams], root: Path, classes: Sequence[str], seed: int,
                 work_um_per_px: float, cache_dir: Path | None = None,
                 threads: int = 2, reviewer_only: Sequence[str] = ()) -> tuple[CropSet, str]:
    """Read every source, check its labels against ``classes`` (``check_labels``), cut the
    crops (reusing ``cache_dir/crops-<hash>.npz`` when present). Returns the crops and the
    data hash."""
    samples: list[Sample] = []
    for i, src in enumerate(sources):
        got = read_source(src, root, seed + i)
        check_labels(got, classes, where=f"train.sources[{i}] ({src.kind} {src.path})",
                     reviewer_only=reviewer_only)
        samples += got
    dhash = data_hash(samples)
    key = hashlib.sha1(f"{dhash}|{work_um_per_px}|{CACHE_SIZE}|{list(classes)}".encode()).hexdigest()
    cached = None if cache_dir is None else Path(cache_dir) / f"crops-{key[:16]}.npz"
    if cached is not None and cached.is_file():
        z = np.load(cached, allow_pickle=False)
        keep = z["keep"]
        return CropSet(z["crops"], z["labels"], tuple(samples[i] for i in keep),
                       tuple(str(x) for x in z["problems"])), dhash
    data = load_crops(samples, classes, work_um_per_px, threads=threads)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        pos = {id(s): i for i, s in enumerate(samples)}
        keep = np.array([pos[id(s)] for s in data.samples], dtype=np.int64)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, crops=data.crops, labels=data.labels, keep=keep,
                 problems=np.array(data.problems, dtype=str))
        tmp.replace(cached)
    return data, dhash
