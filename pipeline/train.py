"""Training of the global and local models from labelled crops, calibration, checkpoint.

``train_classifier(crops, params, classes, ...)`` takes a ``CropSet`` already cut at the
working scale (see ``pipeline.datasets``) and returns a ``TrainResult`` holding the
checkpoint dict (``save_checkpoint`` writes it) plus the split and metrics. Steps:

1. stratified 5:1 train+val/test split from the seed, a validation share of train+val;
2. YUV mean/std of the training split;
3. the global K-class model: SGD (momentum, weight decay), linear warm-up then cosine LR
   decay, oversampling by re-cropping at shifted centres to ``per_class`` per class per
   epoch, 8× dihedral plus stain/colour/optics augmentation on the training split only;
4. one local 2-way model per configured pair, fine-tuned from the global model: only its
   fully connected layers, on the global model's frozen convolutional body (no second
   network pass per routed cell at inference), unless the pair is in ``local_own_body``;
5. temperature scaling fitted on validation; unknown-cell detector parameters;
6. the int8 state of each network body, calibrated on ``INT8_CALIBRATION_CELLS`` training
   cells (``int8_calibration_crops``), so the classifier runs int8 on a CPU.

A crop labelled ``ANY_LEUKOCYTE`` (integer label K) is a white cell of unknown type. Its loss
is ``-log`` of the summed probability of the counted classes: it pulls the cell away from
``non_leukocyte`` without choosing its type. Without it, every crop from a second source (the
BCCD fields) would be a non-leukocyte and the model would learn that source's look as "not a
white cell". Such crops take no part in validation, calibration or the unknown detector.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.augment import augment
from pipeline.classifier_params import TrainParams
from pipeline.classify import dice_weight, energy, mahalanobis, routed_to_pair, with_int8
from pipeline.datasets import (ANY_LEUKOCYTE, CropSet, DatasetError, centre,
                               epoch_indices, recrop, split, stratified_folds)
from pipeline.errors import CheckpointError, ConfigError
from pipeline.imaging import rgb_to_yuv
from pipeline.model import ARCH_ID, VGG, build, to_input
from pipeline.stain import StainReference, lab_stats, reinhard


@dataclass(frozen=True)
class EpochReport:
    stage: str
    epoch: int
    epochs: int
    loss: float
    val_acc: float
    seconds: float
    eta_s: float
    images_per_s: float


@dataclass
class TrainResult:
    checkpoint: dict[str, Any]
    split: dict[str, np.ndarray]
    history: list[EpochReport] = field(default_factory=list)


INT8_CALIBRATION_CELLS = 512


def int8_calibration_crops(data: CropSet, k: int, p: TrainParams,
                           n: int = INT8_CALIBRATION_CELLS) -> np.ndarray:
    """Centre crops ``(n, 96, 96, 3)`` uint8 of ``n`` cells of the training split (of ``k``
    classes; untyped white cells left out) drawn with ``p.seed``, in index order: the int8
    calibration sample, the same on every run and for ``marrowcount quantize``."""
    train = split(data.labels, p.seed, p.val_fraction, data.train_only)["train"]
    train = train[data.labels[train] < k]
    pick = np.random.default_rng(p.seed).choice(train, min(n, len(train)), replace=False)
    return centre(data.crops[np.sort(pick)])


def _batches(idx: np.ndarray, size: int) -> list[np.ndarray]:
    return [idx[i:i + size] for i in range(0, len(idx), size)]


class _Prep:
    """Turns cached crops into model input batches (recrop, augment, normalise)."""

    def __init__(self, cache: np.ndarray, p: TrainParams, mean: np.ndarray, std: np.ndarray,
                 stain_ref: Any) -> None:
        self.cache, self.p, self.mean, self.std, self.stain_ref = cache, p, mean, std, stain_ref

    def train_batch(self, idx: np.ndarray, seed: int) -> torch.Tensor:
        p, rng = self.p, np.random.default_rng(seed)
        shift = p.shift_um / p.um_per_px if p.per_class else 0.0
        jitter = p.scale_jitter if p.augment else 0.0
        crops = recrop(self.cache[idx], p.um_per_px, rng, shift, jitter)
        if p.augment:
            crops = augment(crops, rng, p.augmentation)
        return self.finish(crops)

    def finish(self, crops: np.ndarray) -> torch.Tensor:
        if self.stain_ref is not None:
            crops = np.stack([reinhard(c, self.stain_ref) for c in crops])
        return to_input(crops, self.mean, self.std)


def _lr_at(step: int, total: int, warm: int, base: float) -> float:
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.inference_mode()
def predict_logits(model: VGG, crops: np.ndarray, mean: np.ndarray, std: np.ndarray,
                   batch: int = 256, features: bool = False) -> torch.Tensor:
    """Logits ``(N, K)`` (or penultimate features) of RGB uint8 crops ``(N, 96, 96, 3)``, in
    eval mode with bf16 autocast; fp32 output."""
    model.eval()
    out = []
    for i in range(0, len(crops), batch):
        xb = to_input(crops[i:i + batch], mean, std)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model.features(xb) if features else model(xb)
        out.append(y.float())
    return torch.cat(out) if out else torch.zeros((0, 1))


def targets(labels: np.ndarray, k: int, any_of: np.ndarray | None = None) -> torch.Tensor:
    """Bool ``(N, k)``: the classes each label allows; label ``k`` (ANY_LEUKOCYTE) allows
    ``any_of`` (bool (k,), the counted classes)."""
    y = torch.from_numpy(np.asarray(labels, np.int64))
    coarse = y == k
    if bool(coarse.any()) and (any_of is None or not any_of.any()):
        raise ValueError(f"{ANY_LEUKOCYTE!r} crops need the counted classes (any_of)")
    t = torch.zeros((len(y), k), dtype=torch.bool)
    t[~coarse, y[~coarse]] = True
    if bool(coarse.any()):
        t[coarse] = torch.from_numpy(np.asarray(any_of, bool))
    return t


def set_nll(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log P(class in allowed)``: cross-entropy when one class is allowed."""
    ls = torch.log_softmax(logits, 1)
    return -torch.logsumexp(ls.masked_fill(~allowed, float("-inf")), 1).mean()


def _fit_loop(model: VGG, prep: _Prep, labels: np.ndarray, train_idx: np.ndarray,
              val_x: np.ndarray, val_y: np.ndarray, epochs: int, per_class: int, lr: float,
              p: TrainParams, stage: str, seed: int, on_epoch: Callable[[EpochReport], None],
              history: list[EpochReport], max_seconds: float | None = None,
              after_epoch: Callable[[VGG, int, bool], None] | None = None,
              any_of: np.ndarray | None = None, frozen_body: bool = False) -> None:
    model = model.to(memory_format=torch.channels_last)
    if frozen_body:
        model.body.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=p.momentum,
                          weight_decay=p.weight_decay, nesterov=True)
    k = model.head.out_features
    # Per-epoch generators: a run cut short by a time budget repeats exactly with --epochs.
    plan = [train_idx[epoch_indices(labels[train_idx], per_class,
                                    np.random.default_rng([seed, ep]))] for ep in range(epochs)]
    steps_per_epoch = math.ceil(len(plan[0]) / p.batch_size)
    warm = int(p.warmup_epochs * steps_per_epoch)
    planned = epochs
    step = 0
    t_start = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        ep = 0
        while ep < planned:
            t0 = time.perf_counter()
            total = steps_per_epoch * planned
            model.train()
            if frozen_body:  # batch-norm statistics stay the global model's
                model.body.eval()
            batches = _batches(plan[ep], p.batch_size)
            seeds = np.random.default_rng([seed, ep, 1]).integers(0, 2**31, len(batches))
            fut = pool.submit(prep.train_batch, batches[0], int(seeds[0]))
            losses = []
            for b in range(len(batches)):
                x = fut.result()
                if b + 1 < len(batches):
                    fut = pool.submit(prep.train_batch, batches[b + 1], int(seeds[b + 1]))
                allowed = targets(labels[batches[b]], k, any_of)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, warm, lr)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x.contiguous(memory_format=torch.channels_last))
                loss = set_nll(out.float(), allowed)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if p.grad_clip:
                    nn.utils.clip_grad_norm_(params, p.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
            acc = float((predict_logits(model, val_x, prep.mean, prep.std).argmax(1).numpy()
                         == val_y).mean()) if len(val_y) else float("nan")
            ep += 1
            elapsed = time.perf_counter() - t_start
            if max_seconds is not None:
                # Shrink the schedule (never grow it) so the cosine decay ends within budget.
                fit = int(max_seconds / (elapsed / ep))
                planned = max(ep, min(planned, fit))
            dt = time.perf_counter() - t0
            rep = EpochReport(stage, ep, planned, float(np.mean(losses)), acc, dt,
                              elapsed / ep * (planned - ep), len(plan[ep - 1]) / dt)
            history.append(rep)
            on_epoch(rep)
            if after_epoch is not None:
                after_epoch(model, ep, ep >= planned)


def fit_temperature(logits: torch.Tensor, labels: np.ndarray) -> float:
    """Temperature T minimising the NLL of ``softmax(logits / T)`` (1-D search on log T)."""
    y = torch.from_numpy(np.asarray(labels))
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 161))
    nll = [float(nn.functional.cross_entropy(logits / t, y)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def unknown_stats(feats: torch.Tensor, train_y: np.ndarray, k: int) -> dict:
    """Class centroids and shared precision matrix of penultimate features (Mahalanobis)."""
    f = feats.double()
    y = torch.from_numpy(train_y)
    cent = torch.stack([f[y == c].mean(0) for c in range(k)])
    d = f - cent[y]
    cov = d.T @ d / len(f) + 1e-3 * torch.eye(f.shape[1], dtype=torch.float64)
    return {"centroids": cent.float(), "precision": torch.linalg.inv(cov).float()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    # Large weight tensors are stored as fp16 to keep the shipped file small.
    return {k: (v.half() if v.is_floating_point() and v.numel() > 4096 else v.clone())
            for k, v in model.state_dict().items()}


def _unknown_params(model: VGG, cen: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                    val_idx: np.ndarray, mean: np.ndarray, std: np.ndarray, k: int,
                    temperature: float, val_logits: torch.Tensor, rate: float) -> dict[str, Any]:
    """Unknown-cell detector: centroids/precision and the DICE weights from ``train_idx``
    features; thresholds so that ``rate`` of the validation cells are flagged by each score."""
    train_feat = predict_logits(model, cen[train_idx], mean, std, features=True)
    stats = unknown_stats(train_feat, labels[train_idx], k)
    dice = dice_weight(model.head.weight.detach(), train_feat.mean(0))
    val_feat = predict_logits(model, cen[val_idx], mean, std, features=True)
    val_probs = torch.softmax(val_logits / temperature, 1)
    q = 1.0 - rate
    return {
        "method": "mahalanobis",
        "mahalanobis_threshold": float(np.quantile(
            mahalanobis(val_feat, stats["centroids"], stats["precision"]).numpy(), q)),
        "msp_threshold": float(np.quantile(val_probs.max(1).values.numpy(), 1.0 - q)),
        "energy_threshold": float(np.quantile(energy(val_logits, temperature).numpy(), q)),
        "dice_threshold": float(np.quantile(energy(
            val_feat @ dice.T + model.head.bias.detach().float(), temperature).numpy(), q)),
        "dice_weight": dice.half(),
        **stats,
    }


def _known(sp: dict[str, np.ndarray], labels: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Each split without its white cells of unknown type (label ``k``): they train but are
    never scored, as their label has no class."""
    return {name: idx[labels[idx] < k] for name, idx in sp.items()}


def _check_splits(known: dict[str, np.ndarray], labels: np.ndarray, classes: Sequence[str],
                  pairs: Sequence[tuple[str, str]]) -> None:
    """Every class needs training cells (its output row and unknown-cell statistics are fitted
    on them), and both classes of every local pair validation cells (the pair's temperature
    and offset are fitted on them). Raises DatasetError naming what is missing."""
    k = len(classes)
    n_train = np.bincount(labels[known["train"]], minlength=k)
    n_val = np.bincount(labels[known["val"]], minlength=k)
    problems = []
    empty = [c for c, n in zip(classes, n_train) if n == 0]
    if empty:
        problems.append(f"no training cells of {', '.join(empty)}")
    if not len(known["val"]):
        problems.append("no validation cells")
    bare = [f"{a}/{b}" for a, b in pairs
            if min(n_val[classes.index(a)], n_val[classes.index(b)]) == 0]
    if bare:
        problems.append(f"the local pair(s) {', '.join(bare)} lack validation cells of a class")
    if problems:
        have = np.bincount(labels[labels < k], minlength=k)
        raise DatasetError(
            "cannot train: " + "; ".join(problems) + " (cells per class: "
            + ", ".join(f"{c} {n}" for c, n in zip(classes, have)) + "). A class reaches every "
            "split from about 12 cells (a sixth is held out for test, a tenth of the rest for "
            "validation); add cells, keep the shipped sources beside your own "
            "(train.sources) when fine-tuning, or mark a class you have no crops for "
            "`reviewer_only: true` in the taxonomy (a reviewer names it; the model does not)")


def _stored_reference(ckpt: dict[str, Any]) -> StainReference | None:
    ref = ckpt.get("stain_reference")
    return None if ref is None else StainReference(tuple(ref["mean"]), tuple(ref["std"]))


def _centred(data: CropSet, stain_ref: StainReference | None) -> np.ndarray:
    """Centre crops ``(N, 96, 96, 3)`` of ``data``, stain-normalised when there is a reference."""
    cen = centre(data.crops)
    return cen if stain_ref is None else np.stack([reinhard(c, stain_ref) for c in cen])


def refit_unknown(ckpt: dict[str, Any], data: CropSet, p: TrainParams) -> dict[str, Any]:
    """``ckpt`` with its unknown-cell detector fitted anew on ``data`` (the sources it was
    trained on, split as in training) at ``p.unknown_false_flag_rate``; weights unchanged."""
    classes = list(ckpt["classes"])
    k = len(classes)
    model = build(k, float(ckpt["width"]), int(ckpt["fc"]), 0.0, 0.0)
    _load_weights(model, ckpt["state"], keep_head=True)
    known = _known(split(data.labels, p.seed, p.val_fraction, data.train_only), data.labels, k)
    cen = _centred(data, _stored_reference(ckpt))
    mean = np.asarray(ckpt["yuv_mean"], np.float64)
    std = np.asarray(ckpt["yuv_std"], np.float64)
    temperature = float(ckpt["temperature"])
    val_logits = predict_logits(model, cen[known["val"]], mean, std)
    unknown = _unknown_params(model, cen, data.labels, known["train"], known["val"], mean, std,
                              k, temperature, val_logits, p.unknown_false_flag_rate)
    return {**ckpt, "unknown": unknown}


def train_classifier(data: CropSet, classes: Sequence[str], p: TrainParams, *,
                     taxonomy: str, data_hash: str,
                     on_epoch: Callable[[EpochReport], None] = lambda r: None,
                     max_seconds: float | None = None, threads: int | None = None,
                     snapshot: Callable[[dict[str, Any]], None] | None = None,
                     snapshot_every: int = 4, init: dict[str, Any] | None = None,
                     counted: Sequence[str] = (),
                     ) -> TrainResult:
    """Train global + local models on ``data`` (cut at ``p.um_per_px``); see module doc.

    ``snapshot``, when given, receives a complete (global-only, calibrated) checkpoint every
    ``snapshot_every`` epochs, so a usable model exists long before training ends.

    ``init``, a loaded checkpoint (e.g. the shipped model), starts training from its weights
    instead of MSRA init: a lab fine-tunes on its own crops with far less data and time. Its
    body and its YUV normalisation (and stain reference) are always used; its output layer
    only when its classes equal ``classes``, and a local model only for the same pair. With
    ``p.epochs`` 0 the global model is kept as it is and only the local models train (a lab
    adds a pair). Raises CheckpointError when its width, FC size, working scale or stain
    normalisation differ from ``p``.

    ``counted`` names the classes an ``ANY_LEUKOCYTE`` crop may be (the taxonomy's counted
    classes); needed only when ``data`` holds such crops."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(p.seed)
    classes = list(classes)
    k = len(classes)
    unpaired = sorted({c for pair in p.local_pairs for c in pair} - set(classes))
    if unpaired:
        raise ConfigError(f"train.local_pairs: {unpaired} not among the classes {classes}")
    any_of = np.isin(classes, list(counted))
    sp = split(data.labels, p.seed, p.val_fraction, data.train_only)
    labels = data.labels
    known = _known(sp, labels, k)
    _check_splits(known, labels, classes, p.local_pairs)
    # An initial body was trained on its own normalisation: keep it, never re-derive it.
    if init is not None:
        _check_init(init, p)
    stain_ref = None if init is None else _stored_reference(init)
    if stain_ref is None and p.stain_normalization == "reinhard":
        stain_ref = lab_stats(centre(data.crops[sp["train"][:2000]]))
    cen = _centred(data, stain_ref)
    if init is not None:
        mean = np.asarray(init["yuv_mean"], np.float64)
        std = np.asarray(init["yuv_std"], np.float64)
    else:
        mean, std = yuv_stats(cen[sp["train"]])
    prep = _Prep(data.crops, p, mean, std, stain_ref)
    val_x, val_y = cen[known["val"]], labels[known["val"]]
    history: list[EpochReport] = []

    def package(model: VGG, train_idx: np.ndarray, locals_: list[dict[str, Any]]) -> dict:
        val_logits = predict_logits(model, val_x, mean, std)
        temperature = fit_temperature(val_logits, val_y)
        return {
            "format": 1,
            "arch": ARCH_ID,
            "width": p.width,
            "fc": p.fc,
            "classes": classes,
            "taxonomy": taxonomy,
            "um_per_px": p.um_per_px,
            "yuv_mean": [float(v) for v in mean],
            "yuv_std": [float(v) for v in std],
            "temperature": temperature,
            "stain_reference": None if stain_ref is None else
            {"mean": list(stain_ref.mean), "std": list(stain_ref.std)},
            "state": _state(model),
            "local": locals_,
            "unknown": _unknown_params(model, cen, labels, train_idx, known["val"], mean, std, k,
                                       temperature, val_logits, p.unknown_false_flag_rate),
            "data_hash": data_hash,
            "params": p.model_dump(mode="json"),
            "epochs_run": sum(1 for h in history if h.stage == "global"),
        }

    def after_epoch(model: VGG, ep: int, last: bool) -> None:
        if snapshot is not None and (ep == 2 or ep % snapshot_every == 0) and not last:
            snapshot(package(model, known["train"][::6], []))
            model.train()

    model = build(k, p.width, p.fc, p.conv_dropout, p.fc_dropout)
    init_locals: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    if init is not None:
        _load_weights(model, init["state"], keep_head=list(init["classes"]) == classes)
        if list(init["classes"]) == classes:
            # An initial local model is reused only when it shares the body the same way.
            init_locals = {tuple(d["pair"]): d["state"] for d in init.get("local", [])
                           if bool(d.get("shares_body", False))
                           == (tuple(d["pair"]) not in p.local_own_body)}
    if p.epochs:
        _fit_loop(model, prep, labels, sp["train"], val_x, val_y, p.epochs, p.per_class, p.lr,
                  p, "global", p.seed, on_epoch, history, max_seconds, after_epoch, any_of)
    elif init is None:
        raise ConfigError("train.epochs 0 keeps an initial model's global weights: give --init")

    locals_: list[dict[str, Any]] = []
    for a, b in p.local_pairs:
        ia, ib = classes.index(a), classes.index(b)
        pair_labels = np.full(len(labels), -1, np.int64)
        pair_labels[labels == ia] = 0
        pair_labels[labels == ib] = 1
        tr = sp["train"][pair_labels[sp["train"]] >= 0]
        va = sp["val"][pair_labels[sp["val"]] >= 0]
        shared = (a, b) not in p.local_own_body
        local = build(2, p.width, p.fc, p.conv_dropout, p.fc_dropout)
        _load_weights(local, model.state_dict(), keep_head=False)
        if (a, b) in init_locals:
            # A shared-body local model stores no body: the global one was just loaded.
            _load_weights(local, {**local.state_dict(), **init_locals[(a, b)]}, keep_head=True)
        if p.local_epochs:
            _fit_loop(local, prep, pair_labels, tr, cen[va], pair_labels[va], p.local_epochs,
                      p.local_per_class, p.local_lr, p, f"local {a}/{b}", p.seed + 7, on_epoch,
                      history, frozen_body=shared)
        local_val = predict_logits(local, cen[va], mean, std)
        lt = fit_temperature(local_val, pair_labels[va])
        # Validation cells the global model routes to this local model (top two = the pair).
        routed = routed_to_pair(predict_logits(model, cen[va], mean, std), ia, ib).numpy()
        offset = fit_pair_offset((local_val / lt).numpy()[routed], pair_labels[va][routed])
        state = {name: v for name, v in _state(local).items()
                 if not (shared and name.startswith("body."))}
        locals_.append({"pair": [a, b], "state": state, "shares_body": shared,
                        "temperature": lt,
                        "offset": offset})
    ckpt = with_int8(package(model, known["train"], locals_), int8_calibration_crops(data, k, p))
    return TrainResult(ckpt, sp, history)


def fit_pair_offset(local_logits: np.ndarray, labels: np.ndarray, limit: float = 2.0) -> float:
    """Log-odds offset for a local model's second class that makes it predict the first class
    as often as the first class truly occurs among ``labels`` (0 = first, 1 = second).

    ``local_logits`` float (N, 2), temperature-scaled, of the validation cells the global model
    sends to this local model. A band/segmented model that calls a quarter of segmented cells
    band skews the differential even at the same accuracy; this removes that skew. Clipped to
    ±``limit``; 0 when there are too few cells of either class to tell."""
    n_first = int((labels == 0).sum())
    if n_first < 5 or len(labels) - n_first < 5:
        return 0.0
    margin = np.sort(local_logits[:, 0] - local_logits[:, 1])[::-1]
    # Predicted first class: margin > offset. Put the offset between the n-th and (n+1)-th.
    offset = 0.5 * (margin[n_first - 1] + margin[n_first]) if n_first < len(margin) else -limit
    return float(np.clip(offset, -limit, limit))


def _check_init(init: dict[str, Any], p: TrainParams) -> None:
    for key, want in (("width", p.width), ("fc", p.fc), ("um_per_px", p.um_per_px)):
        if key not in init or abs(float(init[key]) - float(want)) > 1e-9:
            raise CheckpointError(
                f"initial checkpoint has {key} {init.get(key)!r} but train.{key} is {want!r}; "
                f"set train.{key} to match it or train from scratch")
    has_ref = init.get("stain_reference") is not None
    if has_ref != (p.stain_normalization == "reinhard"):
        raise CheckpointError(
            f"initial checkpoint was trained {'with' if has_ref else 'without'} stain "
            f"normalisation but train.stain_normalization is {p.stain_normalization!r}")


def yuv_stats(crops: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel YUV mean and std (float64, shape (3,)) of RGB uint8 crops ``(N, H, W, 3)``.

    Summed in float64 chunk by chunk: a float32 sum over a training split (10^8 values per
    channel) stops growing near 2^32 and returns the same wrong mean for every channel."""
    total = np.zeros(3)
    sq = np.zeros(3)
    n = 0
    for i in range(0, len(crops), chunk):
        yuv = rgb_to_yuv(crops[i:i + chunk]).reshape(-1, 3).astype(np.float64)
        total += yuv.sum(0)
        sq += np.square(yuv).sum(0)
        n += len(yuv)
    mean = total / max(n, 1)
    return mean, np.sqrt(np.maximum(sq / max(n, 1) - mean ** 2, 0.0))


def _load_weights(model: VGG, state: dict[str, torch.Tensor], *, keep_head: bool) -> None:
    """Copy ``state`` into ``model`` (float32), all but the output layer unless ``keep_head``."""
    own = model.state_dict()
    take = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if k in own and (keep_head or not k.startswith("head."))}
    missing = [k for k in own if k not in take and not k.startswith("head.")]
    if missing:
        raise CheckpointError(f"initial checkpoint lacks weights {missing[:3]}")
    model.load_state_dict(take, strict=False)


def cross_validate(data: CropSet, classes: Sequence[str], p: TrainParams, *,
                   on_epoch: Callable[[EpochReport], None] = lambda r: None,
                   threads: int | None = None, counted: Sequence[str] = ()) -> list[float]:
    """``p.cv_folds``-fold cross-validation of the global model over train+val (the test
    split stays untouched). Returns each fold's validation accuracy."""
    if p.cv_folds < 2:
        raise ConfigError("cross-validation needs train.cv_folds >= 2")
    if threads:
        torch.set_num_threads(threads)
    sp = split(data.labels, p.seed, p.val_fraction, data.train_only)
    trainval = np.sort(np.concatenate([sp["train"], sp["val"]]))
    folds = stratified_folds(data.labels[trainval], p.cv_folds, p.seed + 2)
    cen = centre(data.crops)
    accs = []
    for f in range(p.cv_folds):
        tr, va = trainval[folds != f], trainval[folds == f]
        va = va[data.labels[va] < len(classes)]
        mean, std = yuv_stats(cen[tr])
        torch.manual_seed(p.seed + f)
        model = build(len(classes), p.width, p.fc, p.conv_dropout, p.fc_dropout)
        prep = _Prep(data.crops, p, mean, std, None)
        history: list[EpochReport] = []
        _fit_loop(model, prep, data.labels, tr, cen[va], data.labels[va], p.epochs, p.per_class,
                  p.lr, p, f"fold {f + 1}/{p.cv_folds}", p.seed + f, on_epoch, history,
                  any_of=np.isin(list(classes), list(counted)))
        accs.append(history[-1].val_acc)
    return accs


def save_checkpoint(ckpt: dict[str, Any], path: Any) -> None:
    torch.save(ckpt, path)
