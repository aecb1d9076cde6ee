"""Load ``config/default.yaml`` plus a lab's overrides into one validated Config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from daemon.review.params import ReviewParams
from daemon.service import ServiceParams
from daemon.store import StoreParams
from drivers.acquisition import AcquisitionParams
from drivers.folder import WatchParams
from drivers.slidegen import SlideGenParams
from pipeline.analyze import AnalyzeParams
from pipeline.calibrate import CalibrateParams
from pipeline.classifier_params import ClassifierParams, TrainParams
from pipeline.detect import DetectParams
from pipeline.errors import ConfigError
from pipeline.params import Params
from pipeline.stats import ME_RATIO, StatsParams
from pipeline.taxonomy import CellClass, Taxonomy

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config" / "default.yaml"


class Config(Params):
    taxonomy: str
    taxonomies: dict[str, tuple[CellClass, ...]] = Field(min_length=1)
    detect: DetectParams
    calibrate: CalibrateParams
    classifier: ClassifierParams
    train: TrainParams
    analysis: AnalyzeParams
    slidegen: SlideGenParams
    stats: StatsParams
    acquisition: AcquisitionParams
    watch: WatchParams
    store: StoreParams
    service: ServiceParams
    review: ReviewParams

    @model_validator(mode="after")
    def _known_taxonomy(self) -> "Config":
        if self.taxonomy not in self.taxonomies:
            raise ValueError(
                f"taxonomy {self.taxonomy!r} is not one of {sorted(self.taxonomies)}"
            )
        names = Taxonomy(name=self.taxonomy,
                         classes=self.taxonomies[self.taxonomy]).model_names
        unknown = sorted({c for pair in (*self.train.local_pairs, *self.train.local_own_body)
                          for c in pair} - set(names))
        if unknown:
            raise ValueError(f"train.local_pairs / local_own_body: {unknown} not among the "
                             f"model classes of taxonomy {self.taxonomy!r} (reviewer_only "
                             "classes have no model)")
        # Any taxonomy's class may have an interval: a store holds slides of several.
        known = {c.name for classes in self.taxonomies.values() for c in classes}
        stray = sorted(set(self.stats.reference_intervals) - known - {ME_RATIO})
        if stray:
            raise ValueError(f"stats.reference_intervals: {stray} is not a class of any "
                             f"taxonomy ({sorted(known)}) nor {ME_RATIO!r}")
        return self

    @property
    def classes(self) -> Taxonomy:
        """The active taxonomy."""
        return Taxonomy(name=self.taxonomy, classes=self.taxonomies[self.taxonomy])

    def resolve(self, path: str | Path) -> Path:
        """A path from config: absolute as given, else relative to the repository root."""
        p = Path(path)
        return p if p.is_absolute() else REPO_ROOT / p


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if key == "taxonomies" and isinstance(value, dict) and isinstance(out.get(key), dict):
            # A taxonomy is replaced whole (a class list does not merge), the others kept: a
            # lab that redefines seed10 must not lose pbc11, whose slides it still reviews.
            out[key] = {**out[key], **value}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file at ``path``, then ``overrides``; validated.

    Raises ConfigError naming the offending key, e.g. ``detect.work_um_per_px``.
    """
    data = _read_yaml(DEFAULT_CONFIG)
    source = str(DEFAULT_CONFIG)
    if path is not None:
        data = _merge(data, _read_yaml(Path(path)))
        source = str(path)
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        # Every problem at once (up to a screenful), so a lab fixes its file in one go.
        errors = exc.errors()
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                 for e in errors[:8]]
        more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
        raise ConfigError(f"{source}: {'; '.join(parts)}{more}") from None
