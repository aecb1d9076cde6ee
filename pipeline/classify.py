"""Dual-stage classification of cell crops with a trained checkpoint.

``load_classifier(path, taxonomy)`` reads a checkpoint written by ``pipeline.train`` and
returns a ``Classifier``; ``Classifier.classify(crops)`` takes RGB uint8 crops
``(N, 96, 96, 3)`` cut at ``Classifier.um_per_px`` and returns calibrated probabilities
(global model, then each local model deciding between its pair when the global top-2 is
that pair), the calibrated confidence, and an ``unknown`` flag for cells unlike every
trained class.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.classifier_params import ClassifierParams, Precision, UnknownMethod
from pipeline.errors import CheckpointError, ImageError
from pipeline.imaging import CROP_SIZE
from pipeline.model import ARCH_ID, VGG, build, fuse_for_inference, to_input
from pipeline.quantize import calibrate_int8, int8_body, int8_supported
from pipeline.stain import StainReference, reinhard
from pipeline.taxonomy import Taxonomy

DICE_KEEP = 0.1
"""Share of the output layer's weights the ``dice`` unknown score keeps: those that carry
most of the known cells' mean activation (DICE, Sun & Li 2022, its default sparsity 0.9)."""


@dataclass(frozen=True)
class Classification:
    """Per-crop results. ``probs`` float32 ``(N, K)`` (rows sum to 1, dual stage applied,
    temperature-calibrated); ``global_probs`` the same before the local models;
    ``confidence`` float32 (N) calibrated top probability, lowered for unknown cells;
    ``unknown`` bool (N); ``unknown_score`` float32 (N), larger = less like any class (0 when
    unknown cells are not flagged)."""

    probs: np.ndarray
    global_probs: np.ndarray
    confidence: np.ndarray
    unknown: np.ndarray
    unknown_score: np.ndarray

    def labels(self, classes: tuple[str, ...]) -> list[str]:
        return [classes[i] for i in self.probs.argmax(1)]


@dataclass(frozen=True)
class _Local:
    a: int
    b: int
    model: VGG
    temperature: float
    offset: float
    """Added to the second class's scaled logit (fitted on validation; see train)."""
    shares_body: bool
    """``model`` has no body of its own: it runs on the global model's body output."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, checked to be a marrowcount checkpoint of this architecture.
    Raises CheckpointError when it is missing, unreadable or from another architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            # int8 state is stored as torch quantized tensors, which torch marks deprecated
            # (pipeline.quantize); torch is pinned, so the warning only adds noise.
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a marrowcount checkpoint")
    if ckpt.get("arch") != ARCH_ID:
        raise CheckpointError(
            f"{path}: checkpoint is from architecture {ckpt.get('arch')!r}, expected {ARCH_ID!r}")
    return ckpt


def _model(ckpt: dict[str, Any], state: dict[str, torch.Tensor], k: int, path: Path,
           shares_body: bool = False) -> VGG:
    # Built on the meta device and given the stored tensors directly: no throw-away init.
    with torch.device("meta"):
        m = build(k, float(ckpt["width"]), int(ckpt["fc"]), init=False)
    if shares_body:
        m.body = torch.nn.Sequential()
    try:
        m.load_state_dict({n: v.float() if v.is_floating_point() else v for n, v in state.items()},
                          assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored architecture: "
                              f"{str(exc).splitlines()[0]}") from None
    return fuse_for_inference(m.eval()).to(memory_format=torch.channels_last)


class Classifier:
    """A loaded global model plus its local models, calibration and unknown-cell detector."""

    def __init__(self, ckpt: dict[str, Any], path: Path, *, dual_stage: bool = True,
                 local_pairs: tuple[tuple[str, str], ...] = (), flag_unknown: bool = True,
                 batch_size: int = 64, unknown_method: UnknownMethod | None = None,
                 precision: Precision = "int8") -> None:
        try:
            self.classes: tuple[str, ...] = tuple(ckpt["classes"])
            self.um_per_px = float(ckpt["um_per_px"])
            self.mean = np.asarray(ckpt["yuv_mean"], np.float32)
            self.std = np.asarray(ckpt["yuv_std"], np.float32)
            self.temperature = float(ckpt["temperature"])
            self.model = _model(ckpt, ckpt["state"], len(self.classes), path)
            stored = {tuple(d["pair"]): d for d in ckpt["local"]}
            # fp16 in the file (DICE weights); scored in fp32 on every batch.
            self.unknown_params = {k: v.float() if torch.is_tensor(v) else v
                                   for k, v in ckpt["unknown"].items()}
            ref = ckpt.get("stain_reference")
        except KeyError as exc:
            raise CheckpointError(f"{path}: checkpoint lacks {exc}") from None
        self.stain_reference = None if ref is None else StainReference(tuple(ref["mean"]),
                                                                       tuple(ref["std"]))
        self.path = path
        self.batch_size = batch_size
        self.flag_unknown = flag_unknown
        self.unknown_method: UnknownMethod = unknown_method or self.unknown_params["method"]
        if flag_unknown and f"{self.unknown_method}_threshold" not in self.unknown_params:
            raise CheckpointError(
                f"{path}: no {self.unknown_method!r} unknown-cell detector in this checkpoint; "
                f"add it with `marrowcount fit-unknown` or set classifier.unknown_method")
        pairs = [tuple(p) for p in local_pairs] or list(stored)
        self.locals: list[_Local] = []
        for pair in pairs if dual_stage else []:
            if pair not in stored:
                raise CheckpointError(f"{path}: no local model for pair {list(pair)}; "
                                      f"it has {[list(p) for p in stored]}")
            d = stored[pair]
            shared = bool(d.get("shares_body", False))
            self.locals.append(_Local(self.classes.index(pair[0]), self.classes.index(pair[1]),
                                      _model(ckpt, d["state"], 2, path, shared),
                                      float(d["temperature"]),
                                      # checkpoints written before the offset existed: none
                                      float(d.get("offset", 0.0)), shared))
        self.precision: Precision = "bf16"
        """The precision in use; ``precision_note`` says why when int8 was asked and not used."""
        self.precision_note = ""
        if precision == "int8":
            self._use_int8(ckpt.get("int8"))

    def _use_int8(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.precision_note = "checkpoint has no int8 state (add it: marrowcount quantize)"
            return
        if not int8_supported():
            self.precision_note = "this torch build has no x86 int8 engine"
            return
        try:
            bodies = [(self.model, state["global"])] + [
                (loc.model, state["local"][pair_key(self.classes[loc.a], self.classes[loc.b])])
                for loc in self.locals if not loc.shares_body]
            for model, sd in bodies:
                model.body = int8_body(model.body, sd)
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: int8 state does not fit the model: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.precision = "int8"

    def _prep(self, crops: np.ndarray) -> torch.Tensor:
        if self.stain_reference is not None:
            crops = np.stack([reinhard(c, self.stain_reference) for c in crops])
        return to_input(crops, self.mean, self.std)

    @torch.inference_mode()
    def _run(self, model: VGG, x: torch.Tensor | None, body: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits and penultimate features (fp32), and the body's output: ``body`` given,
        the body is not run (a local model that shares the global body)."""
        # bf16 + channels_last with batch norm folded into the convolutions (at load) is the
        # fastest float CPU path at every batch size from 1 up, measured in tests/bench; an
        # int8 body (precision int8) takes the float input and ignores autocast.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = model.body(x) if body is None else body
            f = model.neck(b)
            return model.head(f).float(), f.float(), b

    def _local_logits(self, loc: _Local, x: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        return (self._run(loc.model, None, body) if loc.shares_body
                else self._run(loc.model, x))[0]

    def warm_up(self) -> None:
        """Run each model once, so the oneDNN kernels are built before the first field
        rather than during it. Loading stays lazy; a service calls this once at start."""
        x = self._prep(np.zeros((2, CROP_SIZE, CROP_SIZE, 3), np.uint8))
        body = self._run(self.model, x)[2]
        for loc in self.locals:
            self._local_logits(loc, x, body)

    def classify(self, crops: np.ndarray) -> Classification:
        """Classify RGB uint8 crops ``(N, 96, 96, 3)`` cut at ``self.um_per_px``."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
            raise ImageError(f"classify expects uint8 crops (N, {CROP_SIZE}, {CROP_SIZE}, 3), "
                             f"got {crops.dtype} {crops.shape}")
        k = len(self.classes)
        n = len(crops)
        probs = np.zeros((n, k), np.float32)
        gprobs = np.zeros((n, k), np.float32)
        score = np.zeros(n, np.float32)
        for i in range(0, n, self.batch_size):
            x = self._prep(crops[i:i + self.batch_size])
            logits, feats, body = self._run(self.model, x)
            p = torch.softmax(logits / self.temperature, 1)
            gprobs[i:i + len(x)] = p.numpy()
            g, p = p, p.clone()
            # Routed by the global top two, as the offsets were fitted: one pair per cell.
            for loc in self.locals:
                rows = routed_to_pair(g, loc.a, loc.b).nonzero().flatten()
                if len(rows):
                    z = self._local_logits(loc, x[rows], body[rows]) / loc.temperature
                    q = torch.softmax(z + torch.tensor([0.0, loc.offset]), 1)
                    mass = p[rows, loc.a] + p[rows, loc.b]
                    p[rows, loc.a] = mass * q[:, 0]
                    p[rows, loc.b] = mass * q[:, 1]
            probs[i:i + len(x)] = p.numpy()
            if self.flag_unknown:
                score[i:i + len(x)] = self._unknown_score(logits, feats).numpy()
        probs /= probs.sum(1, keepdims=True)
        conf = probs.max(1)
        if not self.flag_unknown:
            return Classification(probs, gprobs, conf.astype(np.float32), np.zeros(n, bool),
                                  score)
        thr = float(self.unknown_params[f"{self.unknown_method}_threshold"])
        unknown = score > (-thr if self.unknown_method == "msp" else thr)
        if self.unknown_method == "mahalanobis":
            conf = np.where(unknown, conf * np.minimum(1.0, thr / np.maximum(score, 1e-9)), conf)
        else:
            conf = np.where(unknown, conf * 0.5, conf)
        return Classification(probs, gprobs, conf.astype(np.float32), unknown,
                              score.astype(np.float32))

    def global_logits(self, crops: np.ndarray) -> np.ndarray:
        """Uncalibrated global-model logits ``(N, K)`` float32 (for calibration checks)."""
        out = [self._run(self.model, self._prep(crops[i:i + self.batch_size]))[0].numpy()
               for i in range(0, len(crops), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def _unknown_score(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        u = self.unknown_params
        if self.unknown_method == "mahalanobis":
            return mahalanobis(feats, u["centroids"], u["precision"])
        if self.unknown_method == "energy":
            return energy(logits, self.temperature)
        if self.unknown_method == "dice":
            bias = self.model.head.bias.detach().float()
            return energy(feats @ u["dice_weight"].T + bias, self.temperature)
        return -torch.softmax(logits / self.temperature, 1).max(1).values


def pair_key(a: str, b: str) -> str:
    return f"{a}/{b}"


def with_int8(ckpt: dict[str, Any], crops: np.ndarray, path: str | Path = "checkpoint"
              ) -> dict[str, Any]:
    """``ckpt`` plus the int8 state of its global body and of every local model with a body of
    its own, calibrated on ``crops``: RGB uint8 ``(N, 96, 96, 3)`` training cells at the
    working scale (a few hundred suffice). The float weights are kept unchanged."""
    clf = Classifier(ckpt, Path(path), precision="bf16")
    batches = [clf._prep(crops[i:i + 64]) for i in range(0, len(crops), 64)]
    local = {pair_key(clf.classes[loc.a], clf.classes[loc.b]): calibrate_int8(loc.model.body,
                                                                              batches)
             for loc in clf.locals if not loc.shares_body}
    return {**ckpt, "int8": {"global": calibrate_int8(clf.model.body, batches),
                             "local": local, "calibration_cells": int(len(crops))}}


def routed_to_pair(scores: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Bool ``(N,)``: rows whose two highest ``scores`` ``(N, K)`` (logits or probabilities)
    are classes ``a`` and ``b``, in either order — the cells a local model decides."""
    top2 = torch.topk(scores, 2, dim=1).indices
    return (((top2[:, 0] == a) & (top2[:, 1] == b)) | ((top2[:, 0] == b) & (top2[:, 1] == a)))


def energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Energy score ``(N,)`` of logits ``(N, K)``: ``-T logsumexp(logits / T)``; larger = less
    like any class."""
    return -temperature * torch.logsumexp(logits / temperature, 1)


def dice_weight(head_weight: torch.Tensor, mean_feature: torch.Tensor) -> torch.Tensor:
    """The output layer's weights ``(K, D)`` with all but the ``DICE_KEEP`` share zeroed: those
    whose product with the known cells' mean penultimate activation ``(D,)`` is largest."""
    contrib = head_weight.float() * mean_feature.float()[None]
    keep = max(1, round(DICE_KEEP * contrib.numel()))
    cut = torch.topk(contrib.flatten(), keep).values[-1]
    return torch.where(contrib >= cut, head_weight.float(), torch.zeros(()))


def mahalanobis(feat: torch.Tensor, centroids: torch.Tensor, precision: torch.Tensor
                ) -> torch.Tensor:
    """Smallest Mahalanobis distance² of each feature row ``(N, D)`` to any class centroid
    ``(K, D)`` under a shared precision matrix ``(D, D)``; returns ``(N,)``."""
    d = feat[:, None, :] - centroids[None]
    return torch.einsum("nkd,de,nke->nk", d, precision, d).min(1).values


def load_classifier(path: str | Path, taxonomy: Taxonomy | None = None, *,
                    params: ClassifierParams | None = None,
                    unknown_method: UnknownMethod | None = None) -> Classifier:
    """Load a checkpoint. Raises CheckpointError when it is missing, corrupt, from another
    architecture, or when its classes differ from ``taxonomy``'s."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if taxonomy is not None and list(ckpt.get("classes", [])) != taxonomy.model_names:
        raise CheckpointError(
            f"{path}: checkpoint classes {list(ckpt.get('classes', []))} do not match taxonomy "
            f"{taxonomy.name!r} {taxonomy.model_names}; retrain with this taxonomy or choose a matching "
            "checkpoint")
    if params is None:
        return Classifier(ckpt, path, unknown_method=unknown_method)
    return Classifier(ckpt, path, dual_stage=params.dual_stage, local_pairs=params.local_pairs,
                      flag_unknown=params.flag_unknown, batch_size=params.batch_size,
                      unknown_method=unknown_method or params.unknown_method,
                      precision=params.precision)
