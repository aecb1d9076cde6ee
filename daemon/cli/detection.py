"""marrowcount detection commands: ``detect``, ``eval-detect`` and ``calibrate``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np
import typer
from rich.table import Table

from daemon.cli.app import ConfigOpt, app, console, err_console, file_error
from daemon.config import REPO_ROOT, load_config
from pipeline.calibrate import disagrees, estimate_pixel_size
from pipeline.detect import Detection, DetectParams, check_field_scale, detect
from pipeline.detect_eval import ImageScore, read_voc, score_image, total, touches_border
from pipeline.errors import ImageError, MarrowError
from pipeline.imaging import check_scale, read_rgb

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
BCCD_DEFAULT = REPO_ROOT.parent / "shared" / "data" / "bccd" / "BCCD"
BCCD_UM_PER_PX = 0.072



def _images(paths: list[Path]) -> Iterator[Path]:
    """Files as given; folders expanded to their image files (sorted, not recursive)."""
    for p in paths:
        if p.is_dir():
            yield from sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p


def run_detect(path: Path, um_per_px: float, params: DetectParams) -> tuple[np.ndarray, list[Detection], float]:
    """Read one image and detect its leukocytes; returns (rgb, detections, milliseconds)."""
    rgb = read_rgb(path)
    t0 = time.perf_counter()
    # Crops are cut at the input scale here: the CLI reports positions, not crops.
    cells = detect(rgb, um_per_px, params, crop_um_per_px=um_per_px)
    return rgb, cells, (time.perf_counter() - t0) * 1000.0


def draw_overlay(rgb: np.ndarray, cells: list[Detection]) -> np.ndarray:
    """BGR image with each detection's box and centre drawn, for cv2.imwrite."""
    out = np.ascontiguousarray(rgb[:, :, ::-1])
    t = max(1, round(max(rgb.shape[:2]) / 400))
    for c in cells:
        cv2.rectangle(out, c.box[:2], (c.box[2] - 1, c.box[3] - 1), (0, 200, 0), t)
        cv2.circle(out, (round(c.x), round(c.y)), 2 * t + 1, (0, 0, 255), -1)
    return out


@app.command("detect")
def detect_cmd(
    paths: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    um_per_px: float = typer.Option(..., "--um-per-px", help="Pixel size of the images (µm/px)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Write PNGs with detections drawn here."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Detect leukocytes in image files or folders, at a stated pixel size."""
    params = load_config(config).detect
    check_field_scale(um_per_px, params, "--um-per-px")
    if overlay is not None:
        overlay.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in _images(paths):
        try:
            rgb, cells, ms = run_detect(path, um_per_px, params)
        except MarrowError as exc:
            failed += 1
            file_error(path, exc)
            continue
        if overlay is not None:
            cv2.imwrite(str(overlay / f"{path.stem}.png"), draw_overlay(rgb, cells))
        if as_json:
            record = {
                "image": str(path),
                "cells": [
                    {"x": round(c.x, 1), "y": round(c.y, 1), "box": list(c.box), "area_um2": round(c.area_um2, 1)}
                    for c in cells
                ],
                "ms": round(ms, 2),
            }
            typer.echo(json.dumps(record))
        else:
            console.print(f"{path}: {len(cells)} leukocytes ({ms:.1f} ms)", highlight=False)
    if failed:
        raise ImageError(f"{failed} image(s) could not be analysed (see the errors above)")


@app.command("eval-detect")
def eval_detect_cmd(
    root: Path = typer.Option(BCCD_DEFAULT, "--root", help="VOC folder with Annotations/ and JPEGImages/."),
    um_per_px: float = typer.Option(BCCD_UM_PER_PX, "--um-per-px", help="Pixel size of the images."),
    names: list[str] = typer.Option(["WBC"], "--name", help="VOC object names that are leukocytes."),
    limit: int = typer.Option(0, "--limit", help="Score only the first N annotation files (0 = all)."),
    keep_border: bool = typer.Option(False, "--keep-border", help="Detect and score cells cut by the field edge too."),
    per_image: bool = typer.Option(False, "--per-image", help="List every image with an error."),
    as_json: bool = typer.Option(False, "--json", help="Per-image and overall scores as JSON on stdout."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", help="Write overlays of images with errors here."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Score detections against VOC boxes: correct / missing / multiple / false (seed's Table 4.1)."""
    check_scale(um_per_px, "--um-per-px")
    params = load_config(config).detect
    if keep_border:
        params = params.model_copy(update={"exclude_border": False})
    xmls = sorted((root / "Annotations").glob("*.xml"))
    if not xmls:
        raise ImageError(f"{root}: no Annotations/*.xml found")
    if limit > 0:
        xmls = xmls[:limit]
    if overlay is not None:
        overlay.mkdir(parents=True, exist_ok=True)
    scores: list[ImageScore] = []
    times: list[float] = []
    for xml in xmls:
        voc = read_voc(xml, names)
        rgb, cells, ms = run_detect(root / "JPEGImages" / voc.filename, um_per_px, params)
        times.append(ms)
        border = [params.exclude_border and touches_border(b, voc.width, voc.height, 1.0) for b in voc.boxes]
        s = score_image(voc.boxes, [(c.x, c.y) for c in cells], voc.filename, border)
        scores.append(s)
        if overlay is not None and (s.score.correct != s.score.leukocytes or s.score.false):
            img = draw_overlay(rgb, cells)
            for b, edge in zip(voc.boxes, border):
                cv2.rectangle(img, (int(b[0]), int(b[1])), (int(b[2]), int(b[3])), (128, 128, 128) if edge else (255, 0, 0), 2)
            cv2.imwrite(str(overlay / f"{Path(voc.filename).stem}.png"), img)
    overall = total(scores)
    if as_json:
        typer.echo(json.dumps({
            "overall": _score_dict(overall),
            "median_ms": float(np.median(times)),
            "images": [{"image": s.image, **_score_dict(s.score)} for s in scores],
        }))
        return
    bad = [s for s in scores if s.score.correct != s.score.leukocytes or s.score.false]
    if per_image and bad:
        t = Table(title="Images with errors")
        t.add_column("image", no_wrap=True, min_width=20)
        for col in ("leukocytes", "correct", "missing", "multiple", "false", "border"):
            t.add_column(col, justify="right")
        for s in bad:
            sc = s.score
            t.add_row(s.image, *(str(v) for v in (sc.leukocytes, sc.correct, sc.missing, sc.multiple, sc.false, sc.border)))
        console.print(t)
    console.print(score_table(overall, f"Detection on {len(scores)} fields at {um_per_px:g} µm/px"))
    console.print(
        f"median {np.median(times):.1f} ms per field; {overall.border} leukocyte boxes on the field edge "
        + ("scored too (--keep-border)" if keep_border else "not scored (cells cut by the edge are left out)"),
        highlight=False,
    )


def _score_dict(s) -> dict:
    return {
        "leukocytes": s.leukocytes, "correct": s.correct, "missing": s.missing,
        "multiple": s.multiple, "false": s.false, "detections": s.detections,
        "border": s.border, "accuracy": round(s.accuracy, 4),
    }


def score_table(s, title: str) -> Table:
    """The seed's Table 4.1: each category's count and share of the true leukocytes."""
    t = Table(title=title)
    t.add_column("category")
    t.add_column("count", justify="right")
    t.add_column("% of leukocytes", justify="right")
    n = max(1, s.leukocytes)
    t.add_row("leukocytes (true)", str(s.leukocytes), "100.00")
    for name, v in (("correct", s.correct), ("missing", s.missing), ("multiple", s.multiple), ("false", s.false)):
        t.add_row(name, str(v), f"{100.0 * v / n:.2f}")
    t.add_row("[bold]accuracy[/]", "", f"[bold]{100.0 * s.accuracy:.2f}[/]")
    return t


@app.command("calibrate")
def calibrate_cmd(
    paths: list[Path] = typer.Argument(..., help="Image files or folders taken at one pixel size."),
    stated: Optional[float] = typer.Option(None, "--um-per-px", help="Stated pixel size to check."),
    as_json: bool = typer.Option(False, "--json", help="Result as JSON on stdout."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Estimate µm/px from the median diameter of isolated red cells (7.5 µm)."""
    params = load_config(config).calibrate
    if stated is not None:
        check_scale(stated, "--um-per-px")
    images, failed = [], 0
    for path in _images(paths):
        try:
            images.append(read_rgb(path))
        except MarrowError as exc:
            failed += 1
            file_error(path, exc)
    est = estimate_pixel_size(images, params)
    off = stated is not None and disagrees(stated, est.um_per_px, params.tolerance)
    if as_json:
        typer.echo(json.dumps({
            "images": len(images), "red_cells": est.n_cells, "diameter_px": est.diameter_px,
            "um_per_px": est.um_per_px, "stated": stated, "disagrees": off,
        }))
    elif est.um_per_px is None:
        console.print(f"{len(images)} image(s): only {est.n_cells} isolated red cells, too few to estimate", highlight=False)
    else:
        console.print(
            f"{len(images)} image(s), {est.n_cells} isolated red cells, median diameter "
            f"{est.diameter_px:.1f} px → {est.um_per_px:.4f} µm/px", highlight=False,
        )
        if off:
            err_console.print(
                f"[bold yellow]warning:[/] stated {stated:g} µm/px is "
                f"{100 * abs(stated - est.um_per_px) / est.um_per_px:.0f}% off the estimate", highlight=False,
            )
    if failed:
        raise ImageError(f"{failed} image(s) could not be read (see the errors above)")
    if est.um_per_px is None:
        raise ImageError("too few isolated red cells to estimate the pixel size")
