"""marrowcount analysis commands: ``make-slide``, ``analyze`` and ``eval-analyze``."""

from __future__ import annotations

import colorsys
import json
import time
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import typer
from rich import box
from rich.table import Column, Table

from daemon.cli.app import ConfigOpt, app, console, err_console, file_error
from daemon.config import Config, load_config
from pipeline.analyze import NON_LEUKOCYTE, AnalyzeParams, CellResult, analyze_field
from pipeline.detect import check_field_scale
from pipeline.errors import ImageError, MarrowError
from pipeline.imaging import check_scale, read_rgb, resample

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def load_analyzer(cfg: Config):
    """The configured classifier, checked against the active taxonomy."""
    from pipeline.classify import load_classifier

    return load_classifier(cfg.resolve(cfg.classifier.checkpoint), cfg.classes,
                           params=cfg.classifier)


def class_colours(classes: tuple[str, ...] | list[str]) -> dict[str, tuple[int, int, int]]:
    """A distinct BGR colour per class (grey for non-leukocytes)."""
    out = {}
    for i, c in enumerate(classes):
        r, g, b = colorsys.hsv_to_rgb(i / max(len(classes), 1), 0.9, 0.9)
        out[c] = (int(b * 255), int(g * 255), int(r * 255))
    out[NON_LEUKOCYTE] = (128, 128, 128)
    return out


def draw_cells(rgb: np.ndarray, cells: list[CellResult], classes: tuple[str, ...]) -> np.ndarray:
    """BGR overlay: each cell's box and label in its class colour; duplicates dashed grey,
    cells needing review marked with '?'."""
    out = np.ascontiguousarray(rgb[:, :, ::-1])
    colours = class_colours(classes)
    t = max(1, round(max(rgb.shape[:2]) / 700))
    for c in cells:
        col = (90, 90, 90) if c.duplicate_of is not None else colours.get(c.label, (0, 0, 0))
        x0, y0, x1, y1 = c.box
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), col, t)
        text = c.label + ("?" if c.needs_review else "") + ("*" if c.guided else "")
        if c.duplicate_of is not None:
            text = f"dup of {c.duplicate_of}"
        cv2.putText(out, f"{c.index}:{text}", (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45 * t, col, t, cv2.LINE_AA)
    return out


def cell_json(c: CellResult) -> dict[str, Any]:
    return c.as_json()


@app.command("analyze")
def analyze_cmd(
    paths: list[Path] = typer.Argument(..., help="Field images or folders of them."),
    um_per_px: float = typer.Option(..., "--um-per-px", help="Pixel size of the images (µm/px)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Write labelled PNGs here."),
    no_guidance: bool = typer.Option(False, "--no-guidance", help="Turn probability guidance off."),
    no_duplicates: bool = typer.Option(False, "--no-duplicates",
                                       help="Turn duplicate suppression off."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Detect, classify, guide and de-duplicate the cells of each field image."""
    cfg = load_config(config)
    check_field_scale(um_per_px, cfg.detect, "--um-per-px")
    params = _ablate(cfg.analysis, no_guidance, no_duplicates)
    clf = load_analyzer(cfg)
    if overlay is not None:
        overlay.mkdir(parents=True, exist_ok=True)
    files = [f for p in paths for f in (sorted(x for x in p.iterdir()
             if x.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p])]
    failed = 0
    for path in files:
        try:
            rgb = read_rgb(path)
            t0 = time.perf_counter()
            cells = analyze_field(rgb, um_per_px, clf, cfg.detect, params)
            ms = (time.perf_counter() - t0) * 1000
        except MarrowError as exc:
            failed += 1
            file_error(path, exc)
            continue
        if overlay is not None:
            cv2.imwrite(str(overlay / f"{path.stem}.png"), draw_cells(rgb, cells, clf.classes))
        if as_json:
            typer.echo(json.dumps({"image": str(path), "cells": [cell_json(c) for c in cells],
                                   "ms": round(ms, 2)}))
        else:
            counted = [c.label for c in cells if c.counted]
            summary = ", ".join(f"{k} {counted.count(k)}" for k in sorted(set(counted)))
            console.print(f"{path}: {len(counted)} counted of {len(cells)} detected "
                          f"({ms:.0f} ms){': ' + summary if summary else ''}", highlight=False)
    if failed:
        raise ImageError(f"{failed} image(s) could not be analysed (see the errors above)")


def _ablate(p: AnalyzeParams, no_guidance: bool, no_duplicates: bool) -> AnalyzeParams:
    update = {}
    if no_guidance:
        update["guidance"] = False
    if no_duplicates:
        update["suppress_duplicates"] = False
    return p.model_copy(update=update) if update else p


@app.command("make-slide")
def make_slide_cmd(
    out: Path = typer.Argument(..., help="Slide to write (tiled pyramidal .tif)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Truth JSON (default: OUT.json)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same slide."),
    width_px: Optional[int] = typer.Option(None, "--width-px", help="Slide width (default: config)."),
    height_px: Optional[int] = typer.Option(None, "--height-px", help="Slide height."),
    um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Slide pixel size."),
    split: str = typer.Option("classifier", "--split",
                              help="Which cells: 'classifier' (the model's own test split), "
                                   "'hash' (slidegen.heldout_every, no training config needed), "
                                   "'train' (the classifier's training part only: a slide to "
                                   "train on, never to evaluate with) or 'val' (its validation "
                                   "part: a slide to choose analysis settings on)."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Build a virtual marrow slide from held-out real cells, with its ground truth (or, with
    --split train, from training cells, for a `points` training source)."""
    from drivers.slidegen import build_slide, classifier_split_paths, write_slide

    cfg = load_config(config)
    update: dict[str, Any] = {k: v for k, v in (("width_px", width_px), ("height_px", height_px),
                                                ("um_per_px", um_per_px)) if v is not None}
    params = cfg.slidegen.model_copy(update=update) if update else cfg.slidegen
    if um_per_px is not None:
        check_scale(um_per_px, "--um-per-px")
    if split not in ("classifier", "hash", "train", "val"):
        raise MarrowError(
            f"--split must be 'classifier', 'hash', 'train' or 'val', got {split!r}")
    heldout, note = None, None
    if split in ("classifier", "train", "val"):
        part = "test" if split == "classifier" else split
        heldout = classifier_split_paths(cfg, part)
        note = (f"classifier {part} split: pipeline.datasets.split(seed={cfg.train.seed}) over "
                f"train.sources")
    t0 = time.perf_counter()
    slide = build_slide(params, seed, heldout, note)
    truth_path = truth if truth is not None else out.with_suffix(".json")
    write_slide(slide, out, truth_path, params)
    n = len(slide.truth["cells"])
    console.print(f"{out}: {params.width_px}×{params.height_px} px at {params.um_per_px:g} µm/px, "
                  f"{n} leukocytes, {len(slide.truth['others'])} platelets/debris "
                  f"({time.perf_counter() - t0:.1f} s); truth: {truth_path}", highlight=False)


@app.command("eval-analyze")
def eval_analyze_cmd(
    slide_path: Path = typer.Argument(..., help="Virtual slide (.tif from make-slide)."),
    truth_path: Path = typer.Argument(..., help="Its ground-truth JSON."),
    um_per_px: Optional[float] = typer.Option(
        None, "--um-per-px", help="Analyse fields at this pixel size (default: the slide's)."),
    cells: int = typer.Option(500, "--cells", help="Sample fields until they hold this many true cells."),
    fields: Optional[int] = typer.Option(None, "--fields", help="At most this many fields."),
    seed: int = typer.Option(0, "--seed", help="Field sampling order."),
    no_guidance: bool = typer.Option(False, "--no-guidance", help="Turn probability guidance off."),
    no_duplicates: bool = typer.Option(False, "--no-duplicates",
                                       help="Turn duplicate suppression off."),
    ablation: bool = typer.Option(False, "--ablation",
                                  help="Score all four guidance × duplicate settings on the same fields."),
    as_json: bool = typer.Option(False, "--json", help="Scores as JSON on stdout."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Sample 1388×1040 fields from a virtual slide and score analysis against its truth."""
    from drivers.slide_image import open_slide
    from drivers.slidegen import read_truth
    from pipeline.score_analysis import choose_fields, evaluate, field_grid

    cfg = load_config(config)
    truth = read_truth(truth_path)
    clf = load_analyzer(cfg)
    slide_um = float(truth["um_per_px"])
    field_um = check_scale(um_per_px, "--um-per-px") if um_per_px is not None else slide_um
    fw, fh = (int(v) for v in truth.get("field_px", (1388, 1040)))
    # A field of fw×fh px at field_um covers this many slide pixels.
    sw, sh = round(fw * field_um / slide_um), round(fh * field_um / slide_um)
    windows = choose_fields(truth, field_grid(truth, sw, sh), cells, fields, seed)
    settings = ([(False, False), (True, False), (False, True), (True, True)] if ablation
                else [(no_guidance, no_duplicates)])
    results = {}
    with open_slide(slide_path) as slide:
        def read_field(w):
            return resample(slide.read_region(w.x, w.y, w.w, w.h), slide_um, field_um)

        for ng, nd in settings:
            params = _ablate(cfg.analysis, ng, nd)
            acc = evaluate(truth, windows, read_field, field_um,
                           lambda rgb, um: analyze_field(rgb, um, clf, cfg.detect, params))
            name = f"guidance {'off' if ng else 'on'}, duplicates {'kept' if nd else 'suppressed'}"
            results[name] = acc.summary()
    if as_json:
        typer.echo(json.dumps({"slide": str(slide_path), "um_per_px": field_um,
                               "results": results}))
        return
    for name, s in results.items():
        _print_summary(name, s)


def _print_summary(name: str, s: dict[str, Any]) -> None:
    d, c = s["detection"], s["counting"]
    console.print(f"[bold]{name}[/]: {s['fields']} fields, {s['true_cells']} true cells "
                  f"({s['ignored_edge_cells']} cut by the edge ignored)", highlight=False)
    console.print(f"  detection: correct {d['correct']}, missing {d['missing']}, multiple "
                  f"{d['multiple']}, false {d['false']} ({d['accuracy_pct']}%)", highlight=False)
    console.print(f"  counted {c['counted']}: once {c['counted_once']}, twice {c['counted_twice']} "
                  f"({c['counted_twice_pct']}%), not counted {c['not_counted']}, false counted "
                  f"{c['false_counted']}; duplicates suppressed {s['duplicates_suppressed']} "
                  f"(wrongly {s['duplicates_wrongly_suppressed']}); guided {s['guided']} "
                  f"(changed {s['guided_changed']}); needs review {s['needs_review']}",
                  highlight=False)
    console.print(f"  classification accuracy {s['classification_accuracy_pct']}%, overall "
                  f"accuracy {s['overall_accuracy_pct']}%, max differential error "
                  f"{s['max_differential_error_pp']} pp, {s['cells_per_s']} cells/s",
                  highlight=False)
    # Short headers, names and numbers unwrapped, one "counted as" entry a line: the table
    # reads at 80 columns (a piped or logged run).
    t = Table(*(Column(h, no_wrap=True, justify="right" if i else "left") for i, h in enumerate(
        ("class", "true%", "count%", "err pp", "true", "right", "missed"))),
        Column("counted as", min_width=18, overflow="fold"), box=box.SIMPLE_HEAD,
        pad_edge=False, collapse_padding=True)
    for cls, v in s["differential"].items():
        per = s["per_true_class"].get(cls, {"true": 0, "not_counted": 0, "counted_once_as": {}})
        other = "\n".join(f"{k} {n}" for k, n in sorted(per["counted_once_as"].items(),
                                                          key=lambda kv: -kv[1]) if k != cls)
        t.add_row(cls, f"{v['true_pct']:.1f}", f"{v['counted_pct']:.1f}",
                  f"{v['abs_error_pp']:.1f}", str(per["true"]),
                  str(per["counted_once_as"].get(cls, 0)), str(per["not_counted"]), other)
    console.print(t)
