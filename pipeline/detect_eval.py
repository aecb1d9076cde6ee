"""Score leukocyte detections against Pascal VOC boxes with the seed's four categories.

Per true leukocyte box: **correct** (exactly one detection centre inside), **missing** (none),
**multiple** (more than one). Per detection: **false** when its centre lies in no leukocyte box.
Accuracy = correct / true leukocytes. Boxes and centres are in the image's own pixels.

The detector leaves out cells cut by the field edge (the seed's rule: a partial cell cannot be
classified, and a tiled scan sees it whole in the next field). Scored the same way, a true box
that touches the edge is a **border** cell: it is not scored, and detections inside it are
neither correct nor false. ``border_px=None`` scores every box (for a detector run with the
border rule off).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.errors import ImageError

LEUKOCYTE_NAMES = ("WBC",)
"""VOC object names that mark a leukocyte in BCCD; RBC and Platelets are not leukocytes."""


@dataclass(frozen=True)
class VocImage:
    """One annotated image: file name, size and leukocyte boxes ``(x0, y0, x1, y1)``."""

    filename: str
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass(frozen=True)
class Score:
    """Counts for one image or a whole set."""

    leukocytes: int = 0
    correct: int = 0
    missing: int = 0
    multiple: int = 0
    false: int = 0
    detections: int = 0
    border: int = 0
    """True boxes touching the field edge: not scored."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.leukocytes if self.leukocytes else 1.0

    def __add__(self, other: "Score") -> "Score":
        return Score(*(a + b for a, b in zip(_fields(self), _fields(other))))


def _fields(s: Score) -> tuple[int, ...]:
    return (s.leukocytes, s.correct, s.missing, s.multiple, s.false, s.detections, s.border)


@dataclass(frozen=True)
class ImageScore:
    image: str
    score: Score
    # Per detection: index of the leukocyte box holding its centre, or None for a false one.
    matched: tuple[int | None, ...] = field(default=())
    # Per true box: whether it touches the field edge (not scored).
    on_border: tuple[bool, ...] = field(default=())


def read_voc(path: str | Path, names: Sequence[str] = LEUKOCYTE_NAMES) -> VocImage:
    """Parse a VOC XML file; keep only objects whose name is in ``names``.

    Raises ImageError naming the file when the XML is unreadable or lacks a size.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        width = int(size.findtext("width"))  # type: ignore[union-attr, arg-type]
        height = int(size.findtext("height"))  # type: ignore[union-attr, arg-type]
        boxes = []
        for obj in root.iter("object"):
            if (obj.findtext("name") or "").strip() not in names:
                continue
            bb = obj.find("bndbox")
            boxes.append(
                tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr, arg-type]
            )
    except (ET.ParseError, OSError, AttributeError, TypeError, ValueError) as exc:
        raise ImageError(f"{path}: not a readable VOC annotation ({exc})") from None
    filename = (root.findtext("filename") or path.stem).strip()
    return VocImage(filename, width, height, tuple(boxes))  # type: ignore[arg-type]


def touches_border(
    box: tuple[float, float, float, float], width: int, height: int, border_px: float
) -> bool:
    """Whether a VOC box (1-based, inclusive corners) reaches within ``border_px`` of the edge."""
    x0, y0, x1, y1 = box
    return x0 <= 1 + border_px or y0 <= 1 + border_px or x1 >= width - border_px or y1 >= height - border_px


def score_image(
    boxes: Sequence[tuple[float, float, float, float]],
    centres: Iterable[tuple[float, float]],
    image: str = "",
    on_border: Sequence[bool] = (),
) -> ImageScore:
    """Score detection centres ``(x, y)`` against true leukocyte boxes.

    A centre inside two overlapping boxes is given to the box whose centre is nearest. Boxes
    flagged in ``on_border`` are not scored; a centre given to one of them is ignored.
    """
    border = list(on_border) or [False] * len(boxes)
    hits = [0] * len(boxes)
    matched: list[int | None] = []
    for x, y in centres:
        inside = [i for i, (x0, y0, x1, y1) in enumerate(boxes) if x0 <= x <= x1 and y0 <= y <= y1]
        if not inside:
            matched.append(None)
            continue
        best = min(
            inside,
            key=lambda i: (x - (boxes[i][0] + boxes[i][2]) / 2) ** 2
            + (y - (boxes[i][1] + boxes[i][3]) / 2) ** 2,
        )
        hits[best] += 1
        matched.append(best)
    scored = [h for h, b in zip(hits, border) if not b]
    score = Score(
        leukocytes=len(scored),
        correct=sum(h == 1 for h in scored),
        missing=sum(h == 0 for h in scored),
        multiple=sum(h > 1 for h in scored),
        false=sum(m is None for m in matched),
        detections=sum(m is None or not border[m] for m in matched),
        border=sum(border),
    )
    return ImageScore(image, score, tuple(matched), tuple(border))


def total(scores: Iterable[ImageScore]) -> Score:
    out = Score()
    for s in scores:
        out = out + s.score
    return out
