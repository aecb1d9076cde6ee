"""Classifier metrics: accuracy, macro precision/recall/F1, per-class specificity,
confusion matrix (and its PNG), expected calibration error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets import CropSet, centre
from pipeline.taxonomy import Taxonomy


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """``(k, k)`` int64 counts, rows = true class, columns = predicted class."""
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class probability over equal-width confidence bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def metrics(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro P/R/F1 and per-class precision/recall/F1/specificity from a confusion
    matrix. Classes with no true samples are left out of the macro averages."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(predicted > 0, tp / predicted, 0.0)
        rec = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(prec + np.nan_to_num(rec) > 0, 2 * prec * rec / (prec + rec), 0.0)
        tn = total - support - predicted + tp
        spec = tn / (total - support)
    present = support > 0
    per_class = {c: {"n": int(support[i]), "precision": float(prec[i]), "recall": float(rec[i]),
                     "f1": float(f1[i]), "specificity": float(spec[i])}
                 for i, c in enumerate(classes) if present[i]}
    return {
        "n": int(total),
        "accuracy": float(tp.sum() / max(1, total)),
        "macro_precision": float(prec[present].mean()),
        "macro_recall": float(rec[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": per_class,
        "confusion": cm.tolist(),
    }


def save_confusion_png(cms: dict[str, np.ndarray], classes: Sequence[str], path: Path,
                       row_labels: Sequence[str] | None = None) -> None:
    """Side-by-side row-normalised confusion matrices (one panel per entry of ``cms``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(row_labels or classes)
    fig, axes = plt.subplots(1, len(cms), figsize=(6.5 * len(cms), 6), squeeze=False)
    for ax, (title, cm) in zip(axes[0], cms.items()):
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_split(checkpoint: Path, data: CropSet, idx: np.ndarray, taxonomy: Taxonomy,
                   png: Path | None = None, params: Any = None) -> dict[str, Any]:
    """Global-only and dual-stage metrics of a checkpoint on ``data[idx]`` (centre crops).

    White cells of unknown type (``ANY_LEUKOCYTE``) are left out of the confusion matrix;
    ``any_leukocyte`` gives how many there were and the share called non-leukocyte."""
    from pipeline.classify import load_classifier

    clf = load_classifier(checkpoint, taxonomy, params=params)
    k = len(clf.classes)
    coarse = idx[data.labels[idx] >= k]
    idx = idx[data.labels[idx] < k]
    crops = centre(data.crops[idx])
    y = data.labels[idx]
    res = clf.classify(crops)
    out: dict[str, Any] = {}
    cms = {}
    for name, probs in (("global", res.global_probs), ("dual", res.probs)):
        cm = confusion(y, probs.argmax(1), k)
        cms[f"{name} ({(np.diag(cm).sum() / cm.sum()):.2%})"] = cm
        m = metrics(cm, clf.classes)
        m["ece"] = expected_calibration_error(probs, y)
        leuk = y != clf.classes.index("non_leukocyte") if "non_leukocyte" in clf.classes else \
            np.ones(len(y), bool)
        m["accuracy_leukocytes_only"] = float((probs.argmax(1) == y)[leuk].mean())
        out[name] = m
    out["unknown_flag_rate"] = float(res.unknown.mean())
    if len(coarse):
        wbc = clf.classify(centre(data.crops[coarse]))
        nl = clf.classes.index("non_leukocyte") if "non_leukocyte" in clf.classes else -1
        out["any_leukocyte"] = {"n": int(len(coarse)), **{
            f"{name}_called_non_leukocyte": float((probs.argmax(1) == nl).mean())
            for name, probs in (("global", wbc.global_probs), ("dual", wbc.probs))}}
    out["summary"] = {
        "n_test": int(len(y)),
        **{f"{n}_{key}": round(out[n][key], 4) for n in ("global", "dual")
           for key in ("accuracy", "macro_f1", "ece", "accuracy_leukocytes_only")},
        **{f"dual_recall_{c}": round(out["dual"]["per_class"][c]["recall"], 4)
           for c in ("band_neutrophil", "segmented_neutrophil") if c in out["dual"]["per_class"]},
        "unknown_flag_rate": round(out["unknown_flag_rate"], 4),
        **({"white_cells_called_non_leukocyte": round(
            out["any_leukocyte"]["dual_called_non_leukocyte"], 4)} if len(coarse) else {}),
    }
    if png is not None:
        save_confusion_png(cms, clf.classes, png)
    return out


def image_files(paths: Sequence[Path]) -> list[Path]:
    """Expand folders (sorted, image suffixes only) and keep files as given."""
    from pipeline.datasets import IMAGE_SUFFIXES

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


#: A single-cell image narrower than this holds no whole leukocyte (a small lymphocyte is
#: ~7 µm across).
MIN_CROP_UM = 6.0


def crops_from_files(files: Sequence[Path], um_per_px: float, work_um_per_px: float
                     ) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """Centre crop of each single-cell image at the classifier's scale. Returns the crops
    ``(M, 96, 96, 3)``, the M files they came from, and ``(file, reason)`` per failure."""
    from pipeline.errors import ImageError
    from pipeline.imaging import CROP_SIZE, check_scale, crop_at, read_rgb

    check_scale(um_per_px)
    crops, ok, errors = [], [], []
    for f in files:
        try:
            rgb = read_rgb(f)
        except ImageError as exc:
            errors.append((f, str(exc)))
            continue
        h, w = rgb.shape[:2]
        if min(h, w) * um_per_px < MIN_CROP_UM:
            errors.append((f, f"image of {w}×{h} px at {um_per_px:g} µm/px covers "
                              f"{min(h, w) * um_per_px:.1f} µm, less than any leukocyte "
                              f"(≥ {MIN_CROP_UM:g} µm): not a cell crop, or the wrong "
                              "--um-per-px"))
            continue
        crops.append(crop_at(rgb, um_per_px, ((w - 1) / 2, (h - 1) / 2), work_um_per_px))
        ok.append(f)
    arr = np.stack(crops) if crops else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    return arr, ok, errors


COARSE = {"band_neutrophil": "neutrophil", "segmented_neutrophil": "neutrophil"}
"""Model classes scored as one coarse class when a reference only says 'neutrophil'."""


def _read_label_csv(path: Path, files: Sequence[Path], label_names: Sequence[str] | None
                    ) -> tuple[dict[Path, str], list[str]]:
    import csv

    from pipeline.datasets import DatasetError

    if not path.is_file():
        raise DatasetError(f"{path}: label CSV not found")
    by_key: dict[str, Path] = {}
    for f in files:
        by_key[f.name] = by_key[f.stem] = f
        if f.stem.isdigit():
            by_key[str(int(f.stem))] = f
    out: dict[Path, str] = {}
    problems = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    for row in rows[1:]:
        if len(row) < 2:
            continue
        key, lab = row[0].strip(), row[1].strip()
        key = str(int(key)) if key.isdigit() else key
        f = by_key.get(key)
        if f is None:
            problems.append(f"{path}: no image for row {row[0]!r}")
            continue
        if label_names is not None and lab.isdigit():
            i = int(lab) - 1
            if not 0 <= i < len(label_names):
                problems.append(f"{path}: label {lab} of {row[0]!r} has no name")
                continue
            lab = label_names[i]
        out[f] = lab
    return out, problems


def evaluate_folder(checkpoint: Path, folder: Path, um_per_px: float, taxonomy: Taxonomy, *,
                    labels_csv: Path | None = None, label_names: Sequence[str] | None = None,
                    coarse: bool = False, png: Path | None = None, params: Any = None
                    ) -> dict[str, Any]:
    """Score a checkpoint on labelled crops in ``folder`` (flat + label CSV, or a
    folder-per-class tree). Unreadable images and labels outside the taxonomy are listed in
    ``problems`` and skipped; the rest are still scored. With ``coarse``, band and segmented
    predictions count as 'neutrophil'. Also reports accuracy when the prediction is restricted
    to the classes present in the labels (probabilities summed within a coarse class)."""
    from pipeline.classify import load_classifier
    from pipeline.datasets import DatasetError, read_folder_tree

    clf = load_classifier(checkpoint, taxonomy, params=params)
    problems: list[str] = []
    if labels_csv is not None:
        files = image_files([folder])
        truth, problems = _read_label_csv(labels_csv, files, label_names)
    else:
        truth = {Path(s.path): s.label for s in read_folder_tree(folder, um_per_px)}
    mapping = {c: (COARSE.get(c, c) if coarse else c) for c in clf.classes}
    allowed = set(mapping.values())
    bad = sorted({lab for lab in truth.values() if lab not in allowed})
    if bad:
        problems.append(f"label(s) {bad} are not classes of the model; those images are skipped")
        truth = {f: lab for f, lab in truth.items() if lab in allowed}
    if not truth:
        raise DatasetError(f"{folder}: no labelled images to evaluate")
    files = sorted(truth)
    crops, ok, errors = crops_from_files(files, um_per_px, clf.um_per_px)
    problems += [f"{f}: {e}" for f, e in errors]
    names = [n for n in (label_names or []) if n in set(truth.values())] or \
        sorted(set(truth.values()))
    space = names + ["other"]
    col = np.array([space.index(mapping[c]) if mapping[c] in names else len(names)
                    for c in clf.classes])
    y = np.array([names.index(truth[f]) for f in ok])
    res = clf.classify(crops)
    out: dict[str, Any] = {"problems": problems}
    cms = {}
    for stage, probs in (("global", res.global_probs), ("dual", res.probs)):
        merged = np.zeros((len(ok), len(space)), np.float32)
        np.add.at(merged.T, col, probs.T)
        cm = confusion(y, merged.argmax(1), len(space))
        m = metrics(cm, space)
        m["ece"] = expected_calibration_error(merged, y)
        m["accuracy_restricted_to_label_classes"] = float(
            (merged[:, :len(names)].argmax(1) == y).mean())
        out[stage] = m
        cms[f"{stage} ({m['accuracy']:.1%})"] = cm[:len(names)]
    out["unknown_flag_rate"] = float(res.unknown.mean())
    out["predicted_fine_classes"] = {c: int(n) for c, n in zip(
        clf.classes, np.bincount(res.probs.argmax(1), minlength=len(clf.classes))) if n}
    out["summary"] = {
        "n": int(len(ok)), "skipped": len(problems),
        **{f"{s}_{k}": round(out[s][k], 4) for s in ("global", "dual")
           for k in ("accuracy", "macro_f1", "ece", "accuracy_restricted_to_label_classes")},
        "unknown_flag_rate": round(out["unknown_flag_rate"], 4),
    }
    if png is not None:
        save_confusion_png(cms, space, png, row_labels=names)
    return out


def unknown_rates(clf: Any, known: np.ndarray, unseen: np.ndarray) -> dict[str, dict[str, float]]:
    """Per unknown-cell method: share of ``unseen`` crops (a class the model never saw) that
    are flagged, and share of ``known`` crops falsely flagged, at the checkpoint's thresholds
    (fitted on validation cells of the known classes)."""
    from typing import get_args

    from pipeline.classifier_params import UnknownMethod

    out = {}
    keep = clf.unknown_method
    try:
        for method in get_args(UnknownMethod):
            if f"{method}_threshold" not in clf.unknown_params:
                continue
            clf.unknown_method = method
            out[method] = {"flagged_unseen": float(clf.classify(unseen).unknown.mean()),
                           "false_flags_known": float(clf.classify(known).unknown.mean())}
    finally:
        clf.unknown_method = keep
    return out
