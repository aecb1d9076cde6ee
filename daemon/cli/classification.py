"""marrowcount classification commands: train, classify, eval-classify."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from daemon.cli.app import ConfigOpt, app, console, err_console, file_error
from pipeline.errors import ImageError


def _config(config: Optional[Path]):
    from daemon.config import load_config

    return load_config(config)


def _fmt_s(s: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, s)))


def _save_atomic(ckpt: dict, path: Path) -> None:
    from pipeline.train import save_checkpoint

    tmp = path.with_name(path.name + ".tmp")
    save_checkpoint(ckpt, tmp)
    tmp.replace(path)
    console.print(f"checkpoint written to {path}", highlight=False)


@app.command("train")
def train_cmd(
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write.")] = Path("model.pt"),
    config: Optional[Path] = ConfigOpt,
    epochs: Annotated[Optional[int], typer.Option(
        min=0, help="Override train.epochs (0: keep --init's global model, train the local "
        "models).")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(
        help="Stop the global model early after this many minutes.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        help="Keep cut crops here to skip re-reading the images next time.")] = None,
    threads: Annotated[int, typer.Option(help="Torch threads.")] = 2,
    report: Annotated[Optional[Path], typer.Option(
        help="Write test-split metrics (JSON) here.")] = None,
    snapshot: Annotated[Optional[Path], typer.Option(
        help="Write a usable (global-only) checkpoint here every few epochs.")] = None,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Start from this checkpoint's weights (fine-tune, e.g. the shipped "
        "model on a lab's own crops); its output layer is kept only if the classes match.")]
    = None,
) -> None:
    """Train the global and local models on the configured sources and save a checkpoint."""
    from daemon.config import REPO_ROOT
    from pipeline.datasets import load_sources
    from pipeline.evaluate_classifier import evaluate_split
    from pipeline.train import EpochReport, save_checkpoint, train_classifier

    cfg = _config(config)
    p = cfg.train if epochs is None else cfg.train.model_copy(update={"epochs": epochs})
    start = None
    if init is not None:
        from pipeline.classify import read_checkpoint

        # As the config's paths are: relative to the repository unless it is here.
        start = read_checkpoint(init if init.is_absolute() or init.exists()
                                else cfg.resolve(init))
    data, dhash = load_sources(p.sources, REPO_ROOT, cfg.classes.model_names, p.seed, p.um_per_px,
                               cache_dir=cache_dir, reviewer_only=cfg.classes.reviewer_only)
    for line in data.problems:
        err_console.print(f"skipped: {line}", highlight=False)
    console.print(f"{len(data.labels)} crops, {len(cfg.classes.model_names)} classes, data hash {dhash[:12]}")

    def on_epoch(r: EpochReport) -> None:
        console.print(f"[{r.stage}] epoch {r.epoch}/{r.epochs}  loss {r.loss:.4f}  "
                      f"val acc {r.val_acc:.4f}  {r.images_per_s:.0f} img/s  "
                      f"epoch {r.seconds:.0f} s  ETA {_fmt_s(r.eta_s)}", highlight=False, markup=False)

    if p.cv_folds > 1:
        from pipeline.train import cross_validate

        accs = cross_validate(data, cfg.classes.model_names, p, on_epoch=on_epoch, threads=threads,
                              counted=cfg.classes.counted)
        console.print(f"{p.cv_folds}-fold validation accuracy: "
                      + ", ".join(f"{a:.4f}" for a in accs)
                      + f"; mean {sum(accs) / len(accs):.4f}")
    res = train_classifier(data, cfg.classes.model_names, p, taxonomy=cfg.taxonomy, data_hash=dhash,
                           on_epoch=on_epoch, threads=threads,
                           max_seconds=None if max_minutes is None else max_minutes * 60,
                           snapshot=None if snapshot is None else
                           (lambda ck: _save_atomic(ck, snapshot)), init=start,
                           counted=cfg.classes.counted)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(res.checkpoint, out)
    console.print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)")
    names = cfg.classes.model_names
    tested = set(data.labels[res.split["test"]].tolist())
    unscored = [c for i, c in enumerate(names) if i not in tested]
    if unscored:  # e.g. a class whose only cells come from `train_only` sources
        err_console.print(f"warning: no test cells of {', '.join(unscored)}: trained, but no "
                          "figure below says how well (add cells from a source that is not "
                          "train_only)", highlight=False)
    # The configured classifier settings (unknown-cell method, precision, pairs), as
    # eval-classify and the daemon use them.
    metrics = evaluate_split(out, data, res.split["test"], cfg.classes, params=cfg.classifier)
    console.print(json.dumps(metrics["summary"], indent=1))
    if report:
        report.write_text(json.dumps(metrics, indent=1))


@app.command("classify")
def classify_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Cell crop images (or folders of them).")],
    um_per_px: Annotated[float, typer.Option("--um-per-px", help="Pixel size of the images.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Default: classifier.checkpoint.")] = None,
    config: Optional[Path] = ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout only.")] = False,
) -> None:
    """Classify cell crops centred on one cell each; unreadable files are reported, the rest
    are still classified."""
    from pipeline.classify import load_classifier
    from pipeline.evaluate_classifier import crops_from_files, image_files

    cfg = _config(config)
    clf = load_classifier(checkpoint or cfg.resolve(cfg.classifier.checkpoint), cfg.classes,
                          params=cfg.classifier)
    files = image_files(paths)
    crops, ok, errors = crops_from_files(files, um_per_px, clf.um_per_px)
    rows: list[dict] = [{"image": str(f), "error": e} for f, e in errors]
    if len(ok):
        res = clf.classify(crops)
        for i, f in enumerate(ok):
            rows.append({"image": str(f), "label": clf.classes[int(res.probs[i].argmax())],
                         "confidence": round(float(res.confidence[i]), 4),
                         "unknown": bool(res.unknown[i]),
                         "probabilities": {c: round(float(v), 4)
                                           for c, v in zip(clf.classes, res.probs[i])}})
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order.get(r["image"], 0))
    if as_json:
        print(json.dumps(rows))
    else:
        for r in rows:
            if "error" in r:
                file_error(Path(r["image"]), r["error"])
            else:
                flag = "  (unknown: review)" if r["unknown"] else ""
                console.print(f"{r['image']}: {r['label']} {r['confidence']:.2f}{flag}",
                              highlight=False)
    if errors:
        raise ImageError(f"{len(errors)} of {len(files)} image(s) could not be classified "
                         "(see the errors above; the others were)")


@app.command("eval-classify")
def eval_classify_cmd(
    folder: Annotated[Optional[Path], typer.Argument(
        help="Folder of crops: with --labels, a flat folder; without, a folder-per-class tree. "
             "Omit to evaluate the configured sources' test split.")] = None,
    labels: Annotated[Optional[Path], typer.Option(
        help="CSV of image,label (first two columns; image = file name, stem or number).")] = None,
    label_names: Annotated[Optional[str], typer.Option(
        help="Comma-separated names for numeric labels 1..n, e.g. "
             "neutrophil,lymphocyte,monocyte,eosinophil,basophil.")] = None,
    um_per_px: Annotated[Optional[float], typer.Option("--um-per-px")] = None,
    coarse: Annotated[bool, typer.Option(
        help="Score band and segmented neutrophil predictions as 'neutrophil'.")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Default: classifier.checkpoint.")] = None,
    config: Optional[Path] = ConfigOpt,
    png: Annotated[Optional[Path], typer.Option(help="Confusion-matrix PNG.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write all metrics as JSON here.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Accuracy, macro precision/recall/F1, per-class specificity, ECE and a confusion matrix."""
    from daemon.config import REPO_ROOT
    from pipeline.classify import load_classifier
    from pipeline.datasets import load_sources, split
    from pipeline.errors import MarrowError
    from pipeline.evaluate_classifier import evaluate_folder, evaluate_split

    cfg = _config(config)
    ckpt = checkpoint or cfg.resolve(cfg.classifier.checkpoint)
    # The checkpoint against the taxonomy first: the sources' labels mean nothing otherwise.
    load_classifier(ckpt, cfg.classes)
    if folder is None:
        p = cfg.train
        data, _ = load_sources(p.sources, REPO_ROOT, cfg.classes.model_names, p.seed, p.um_per_px,
                               cache_dir=cache_dir, reviewer_only=cfg.classes.reviewer_only)
        test = split(data.labels, p.seed, p.val_fraction, data.train_only)["test"]
        result = evaluate_split(ckpt, data, test, cfg.classes, png=png, params=cfg.classifier)
    else:
        if um_per_px is None:
            raise MarrowError("--um-per-px is required with a folder")
        names = label_names.split(",") if label_names else None
        result = evaluate_folder(ckpt, folder, um_per_px, cfg.classes, labels_csv=labels,
                                 label_names=names, coarse=coarse, png=png,
                                 params=cfg.classifier)
    if out:
        out.write_text(json.dumps(result, indent=1))
    if as_json:
        print(json.dumps(result["summary"]))
    else:
        console.print_json(json.dumps(result["summary"]))
        for line in result.get("problems", []):
            err_console.print(f"skipped: {line}", highlight=False)


@app.command("eval-unknown")
def eval_unknown_cmd(
    unseen: Annotated[str, typer.Option(help="Source label the model never saw, e.g. basophil.")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint trained without that class.")],
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="The config it was trained with.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Leave-one-class-out check of the unknown-cell detector: share of the unseen class's
    cells flagged, against false flags on the known classes' test split, per method."""
    from daemon.config import REPO_ROOT
    from pipeline.classify import load_classifier
    from pipeline.datasets import centre, load_crops, load_sources, read_source, split
    from pipeline.errors import MarrowError
    from pipeline.evaluate_classifier import unknown_rates

    cfg = _config(config)
    p = cfg.train
    clf = load_classifier(checkpoint, cfg.classes)
    data, _ = load_sources(p.sources, REPO_ROOT, cfg.classes.model_names, p.seed, p.um_per_px,
                           cache_dir=cache_dir, reviewer_only=cfg.classes.reviewer_only)
    test = split(data.labels, p.seed, p.val_fraction, data.train_only)["test"]
    # White cells of unknown type (ANY_LEUKOCYTE) have no class to be known as.
    known = centre(data.crops[test[data.labels[test] < len(cfg.classes.model_names)]])
    samples = []
    for i, src in enumerate(p.sources):
        src = src.model_copy(update={"exclude": tuple(x for x in src.exclude if x != unseen)})
        samples += [s for s in read_source(src, REPO_ROOT, p.seed + i) if s.label == unseen]
    if not samples:
        raise MarrowError(f"no images labelled {unseen!r} in the configured sources")
    unseen_crops = load_crops(samples, [unseen], p.um_per_px, size=96).crops
    rates = unknown_rates(clf, known, unseen_crops)
    result = {"unseen": unseen, "n_unseen": len(unseen_crops), "n_known": len(known), **rates}
    if as_json:
        print(json.dumps(result))
    else:
        console.print_json(json.dumps(result))


def _checkpoint_and_sources(checkpoint: Optional[Path], config: Optional[Path],
                            cache_dir: Optional[Path]) -> tuple[Any, Path, dict, Any]:
    """The config, the checkpoint's path and contents, and the crops of the configured
    training sources (for commands that add to a trained checkpoint)."""
    from daemon.config import REPO_ROOT
    from pipeline.classify import read_checkpoint
    from pipeline.datasets import load_sources

    cfg = _config(config)
    src = checkpoint or cfg.resolve(cfg.classifier.checkpoint)
    ckpt = read_checkpoint(src)
    p = cfg.train
    data, _ = load_sources(p.sources, REPO_ROOT, cfg.classes.model_names, p.seed, p.um_per_px,
                           cache_dir=cache_dir, reviewer_only=cfg.classes.reviewer_only)
    return cfg, src, ckpt, data


@app.command("fit-unknown")
def fit_unknown_cmd(
    checkpoint: Annotated[Optional[Path], typer.Option(help="Default: classifier.checkpoint.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="The config it was trained with (its sources and split).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write here; default: in place.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option()] = None,
) -> None:
    """Fit the unknown-cell detector anew (every method, thresholds at
    train.unknown_false_flag_rate of the validation cells) on the sources a checkpoint was
    trained on. `train` does this itself; this is for older checkpoints or another rate.
    The weights are unchanged."""
    from typing import get_args

    from pipeline.classifier_params import UnknownMethod
    from pipeline.train import refit_unknown

    cfg, src, ckpt, data = _checkpoint_and_sources(checkpoint, config, cache_dir)
    p = cfg.train
    ckpt = refit_unknown(ckpt, data, p)
    _save_atomic(ckpt, out or src)
    u = ckpt["unknown"]
    console.print("thresholds at {:.1%} of validation cells: ".format(p.unknown_false_flag_rate)
                  + ", ".join(f"{m} {u[f'{m}_threshold']:.3f}"
                              for m in get_args(UnknownMethod)),
                  highlight=False)


@app.command("quantize")
def quantize_cmd(
    checkpoint: Annotated[Optional[Path], typer.Option(help="Default: classifier.checkpoint.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="The config it was trained with (its sources give the training cells).")]
    = None,
    out: Annotated[Optional[Path], typer.Option(help="Write here; default: in place.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option()] = None,
) -> None:
    """Add int8 state to a checkpoint, calibrated on its training cells, so the classifier
    runs int8 (classifier.precision). `train` does this itself; this is for older checkpoints.
    The float weights are unchanged."""
    from pipeline.classify import Classifier, with_int8
    from pipeline.train import int8_calibration_crops

    cfg, src, ckpt, data = _checkpoint_and_sources(checkpoint, config, cache_dir)
    crops = int8_calibration_crops(data, len(cfg.classes.model_names), cfg.train)
    ckpt = with_int8(ckpt, crops, src)
    dest = out or src
    _save_atomic(ckpt, dest)
    clf = Classifier(ckpt, dest)
    agree = float((clf.classify(crops).probs.argmax(1) == Classifier(
        ckpt, dest, precision="bf16").classify(crops).probs.argmax(1)).mean())
    console.print(f"int8 state from {len(crops)} training cells; int8 and bf16 agree on "
                  f"{agree:.1%} of them", highlight=False)
