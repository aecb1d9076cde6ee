"""marrowcount acquisition commands: ``acquire`` counts one slide on a microscope."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from daemon.cli.app import ConfigOpt, app, console, err_console
from drivers.acquisition import AcquisitionError, FieldResult


def parse_area(text: str | None) -> tuple[tuple[float, float], ...] | None:
    """``x0,y0,x1,y1`` (rectangle) or ``x,y;x,y;x,y...`` (polygon), stage µm."""
    if text is None:
        return None
    try:
        if ";" in text:
            pts = tuple(tuple(float(v) for v in p.split(",")) for p in text.split(";"))
            if any(len(p) != 2 for p in pts):
                raise ValueError
            return pts  # type: ignore[return-value]
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise AcquisitionError(
            f"--area {text!r}: expected x0,y0,x1,y1 or x,y;x,y;x,y... in stage µm"
        ) from None
    return ((x0, y0), (x1, y1))


def field_summary(f: FieldResult) -> dict[str, Any]:
    return {
        "index": f.index,
        "x": round(f.stage_x, 2),
        "y": round(f.stage_y, 2),
        "z": None if f.stage_z is None else round(f.stage_z, 3),
        "cells": f.n_counted,
        "skipped_reason": f.skipped_reason,
    }


@app.command("acquire")
def acquire(
    virtual_slide: Annotated[
        Path | None, typer.Option(help="count this slide file on the virtual microscope")
    ] = None,
    mm_config: Annotated[
        Path | None, typer.Option(help="Micro-Manager .cfg of the real microscope")
    ] = None,
    um_per_px: Annotated[
        float | None, typer.Option(help="pixel size (µm/px); default: the slide's / config's")
    ] = None,
    target: Annotated[
        int | None, typer.Option(help="counted leukocytes to stop at (default: config)")
    ] = None,
    area: Annotated[
        str | None, typer.Option(help="counting area in stage µm: x0,y0,x1,y1 or x,y;x,y;...")
    ] = None,
    prescan: Annotated[
        bool | None,
        typer.Option("--prescan/--no-prescan",
                     help="judge the fields at low magnification first (default: config)"),
    ] = None,
    config: Optional[Path] = ConfigOpt,
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON object only")] = False,
) -> None:
    """Count one slide: fields in serpentine order, autofocus, quality gate, stop at N."""
    from daemon.config import load_config
    from drivers.acquisition import HardwareFault, count_slide
    from drivers.micromanager import MicroscopeFieldSource, open_microscope

    cfg = load_config(config)
    params = cfg.acquisition
    n_target = params.target if target is None else target
    if n_target <= 0:
        raise AcquisitionError(f"--target must be a positive number of cells, got {n_target}")
    counting_area = parse_area(area) if area is not None else params.area_um
    if prescan is not None:
        params = params.model_copy(
            update={"prescan": params.prescan.model_copy(update={"enabled": prescan})})
    scope = open_microscope(
        params, mm_config=mm_config, virtual_slide=virtual_slide, um_per_px=um_per_px
    )
    try:
        plan = scope.plan(counting_area, cfg.detect)
        if plan.prescan is not None and not json_out:
            from daemon.report import prescan_text

            err_console.print(prescan_text(plan.prescan), highlight=False)
        from pipeline.analyze import analyze_field
        from pipeline.classify import load_classifier

        classifier = load_classifier(
            cfg.resolve(cfg.classifier.checkpoint), cfg.classes, params=cfg.classifier
        )

        def analyze(rgb, px):  # noqa: ANN001, ANN202
            return analyze_field(rgb, px, classifier, cfg.detect, cfg.analysis)

        fields: list[FieldResult] = []
        counted = 0

        def on_field(f: FieldResult) -> None:
            nonlocal counted
            fields.append(f)
            counted += f.n_counted
            if not json_out:
                note = f.skipped_reason or f"{f.n_counted} cells"
                err_console.print(
                    f"field {f.index}: ({f.stage_x:.0f}, {f.stage_y:.0f}) µm  {note}  "
                    f"[{counted}/{n_target}]",
                    highlight=False,
                )

        source = MicroscopeFieldSource(scope, plan, params, cfg.detect)
        try:
            stopped = count_slide(source, analyze, n_target, on_field=on_field,
                                  fault_after=params.quality.fault_after_fields)
        except HardwareFault as exc:  # the fields counted so far are still reported
            stopped = f"failed: hardware fault: {exc}"
    finally:
        scope.close()
    counts = Counter(c.label for f in fields for c in f.cells if c.counted)
    # The machine's classes: a reviewer-only one is no count of the model's.
    counts_all = {name: counts.get(name, 0) for name in cfg.classes.counted
                  if name in cfg.classes.model_names}
    if json_out:
        print(json.dumps({
            "counts": counts_all,
            "target": n_target,
            "counted": sum(counts_all.values()),
            "um_per_px": scope.um_per_px,
            "fields_planned": len(plan),
            "prescan": plan.prescan,
            "fields": [field_summary(f) for f in fields],
            "stopped_because": stopped,
        }))
        return
    from pipeline.stats import confidence_text, differential, interval_text, value_text

    diff = differential(counts_all, cfg.classes, cfg.stats, machine=True)
    table = Table(title=f"Differential: {diff.total} cells ({stopped})")
    for col in ("class", "n", "%", f"{confidence_text(diff.confidence)} CI"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in diff.rows:
        table.add_row(row.label, str(row.n), value_text(row.pct, 1),
                      interval_text(row.ci_low_pct, row.ci_high_pct, 1))
    console.print(table)
    if diff.me_ci is not None:
        console.print(f"M:E ratio {value_text(diff.me_ratio, 2, missing='∞')} "
                      f"({interval_text(*diff.me_ci, 2)})")
    skipped = [f for f in fields if f.skipped_reason]
    console.print(f"{len(fields)} fields visited, {len(skipped)} skipped")
    for f in skipped:
        console.print(f"  field {f.index} ({f.stage_x:.0f}, {f.stage_y:.0f}): {f.skipped_reason}")
    if stopped.startswith("failed"):
        raise AcquisitionError(f"slide failed: {stopped.removeprefix('failed: ')}")
