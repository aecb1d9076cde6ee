"""The classifier's settings, for inference (``classifier:``) and training (``train:``) — apart
from the code that runs them, so that reading a config does not load torch (every CLI
command reads one; most never classify)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.augment import AugmentParams
from pipeline.datasets import SourceParams
from pipeline.params import Params

UnknownMethod = Literal["mahalanobis", "msp", "energy", "dice"]
"""Score that flags unknown cells (``pipeline.classify``)."""
Precision = Literal["int8", "bf16"]


class ClassifierParams(Params):
    checkpoint: Path
    batch_size: int = Field(gt=0)
    dual_stage: bool
    local_pairs: tuple[tuple[str, str], ...]
    """Local pairs to apply; empty = every pair stored in the checkpoint."""
    flag_unknown: bool
    unknown_method: UnknownMethod
    """Score that flags unknown cells; chosen by the leave-one-class-out measurement."""
    precision: Precision
    """int8: the convolutions run on the checkpoint's int8 state (about twice as fast on CPU);
    a checkpoint without one, or a CPU build without the x86 int8 engine, runs bf16."""


class TrainParams(Params):
    seed: int
    epochs: int = Field(ge=0)
    """Global epochs; 0 with an initial checkpoint trains its local models only."""
    batch_size: int = Field(gt=0)
    width: float = Field(gt=0, le=1)
    fc: int = Field(gt=0)
    conv_dropout: float = Field(ge=0, lt=1)
    fc_dropout: float = Field(ge=0, lt=1)
    um_per_px: float = Field(gt=0)
    """Working scale of the model's 96×96 crops."""
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    warmup_epochs: float = Field(ge=0)
    grad_clip: float = Field(ge=0)
    """Largest gradient norm per step (0 = no clipping)."""
    per_class: int = Field(ge=0)
    """Oversample (re-crop at shifted centres) or subsample each class to this many per
    epoch; 0 = every training crop once per epoch, centred (no oversampling)."""
    shift_um: float = Field(ge=0)
    augment: bool
    """Dihedral + colour/optics augmentation and scale jitter on the training split."""
    scale_jitter: float = Field(ge=0, lt=0.5)
    augmentation: AugmentParams
    stain_normalization: Literal["none", "reinhard"]
    val_fraction: float = Field(gt=0, lt=0.5)
    cv_folds: int = Field(ge=0)
    local_pairs: tuple[tuple[str, str], ...]
    local_epochs: int = Field(ge=0)
    local_own_body: tuple[tuple[str, str], ...]
    """Pairs whose local model fine-tunes a convolutional body of its own (a second network
    pass per routed cell). The others train only their fully connected layers on the global
    model's frozen body, whose output inference reuses."""
    local_per_class: int = Field(gt=0)
    local_lr: float = Field(gt=0)
    unknown_false_flag_rate: float = Field(gt=0, lt=0.5)
    """Share of known validation cells the unknown-cell detector may flag."""
    sources: tuple[SourceParams, ...] = Field(min_length=1)
