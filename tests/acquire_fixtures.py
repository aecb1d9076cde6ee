"""Small real slides and settings for the acquisition tests (virtual microscope, BCCD fields)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from daemon.config import DEFAULT_CONFIG, _merge
from drivers.acquisition import AcquisitionParams
from drivers.micromanager import Microscope
from drivers.slide_image import open_slide, write_pyramid
from drivers.virtual import (
    FocalPlane,
    VirtualCamera,
    VirtualLamp,
    VirtualXYStage,
    VirtualZStage,
    _Faults,
)
from pipeline.detect import DetectParams
from tests.conftest import BCCD_UM_PER_PX
from tests.slide_fixtures import bccd_mosaic

# 640x480 camera = one BCCD field: 46 x 35 µm at 0.072 µm/px.
SMALL_CAMERA = {"camera_width": 640, "camera_height": 480}


def _section(name: str) -> dict[str, Any]:
    # Validated section by section so these tests depend on their own sections only.
    return yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))[name]


def acquisition_params(**overrides: Any) -> AcquisitionParams:
    """The default ``acquisition`` section with nested overrides (e.g. virtual={...})."""
    return AcquisitionParams.model_validate(_merge(_section("acquisition"), overrides))


def detect_params() -> DetectParams:
    return DetectParams.model_validate(_section("detect"))


def bccd_slide(tmp_path: Path, cols: int = 4, rows: int = 3, start: int = 0) -> Path:
    """A pyramidal TIFF of real BCCD fields tiled ``cols × rows`` (≈0.072 µm/px)."""
    path = tmp_path / f"bccd_{cols}x{rows}_{start}.tif"
    if not path.exists():
        write_pyramid(path, bccd_mosaic(cols, rows, start), BCCD_UM_PER_PX)
    return path


def virtual_scope(slide_path: Path, **overrides: Any) -> Microscope:
    """The virtual microscope over a slide file, small camera unless overridden."""
    virtual = {**SMALL_CAMERA, **overrides.pop("virtual", {})}
    params = acquisition_params(virtual=virtual, **overrides)
    return Microscope.from_virtual_slide(open_slide(slide_path), BCCD_UM_PER_PX, params)


# -- devices a Micro-Manager .cfg can load by name (``#py pyDevice,...``): the virtual
#    microscope's own devices over a small real slide, built without arguments.


def _cfg_slide():
    from pipeline.imaging import read_rgb
    from tests.slide_fixtures import bccd_field

    class _Field:
        def __init__(self) -> None:
            self.rgb = read_rgb(bccd_field(0))
            self.height, self.width = self.rgb.shape[:2]

        def read_region(self, x: int, y: int, w: int, h: int):
            return self.rgb[y : y + h, x : x + w]

    return _Field()


_FAULTS = _Faults(0.0, 0.0, 0)
_LIMITS = (0.0, 0.0, 640 * BCCD_UM_PER_PX, 480 * BCCD_UM_PER_PX)


class CfgXYStage(VirtualXYStage):
    def __init__(self) -> None:
        super().__init__(_LIMITS, _FAULTS)


class CfgZStage(VirtualZStage):
    def __init__(self) -> None:
        super().__init__((-100.0, 100.0), 0.0, _FAULTS)


class CfgCamera(VirtualCamera):
    def __init__(self) -> None:
        params = acquisition_params(virtual={**SMALL_CAMERA, "camera_width": 320}).virtual
        xy, z, lamp = CfgXYStage(), CfgZStage(), VirtualLamp()
        lamp.set_open(True)
        plane = FocalPlane(0.0, 0.0, 0.0)
        super().__init__(_cfg_slide(), BCCD_UM_PER_PX, xy, z, lamp, plane, params, _FAULTS)


def write_cfg(path: Path, camera: bool = True, xy: bool = True, z: bool = True) -> Path:
    """A Micro-Manager .cfg loading the chosen devices above and assigning their roles."""
    lines = []
    for want, label, cls, role in (
        (camera, "Cam", "CfgCamera", "Camera"),
        (xy, "XY", "CfgXYStage", "XYStage"),
        (z, "Z", "CfgZStage", "Focus"),
    ):
        if want:
            lines.append(f"#py pyDevice,{label},tests.acquire_fixtures,{cls}")
    lines.append("Property,Core,Initialize,1")
    for want, label, role in ((camera, "Cam", "Camera"), (xy, "XY", "XYStage"), (z, "Z", "Focus")):
        if want:
            lines.append(f"#py Property,Core,{role},{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def checkpoint_path() -> Path:
    """The configured classifier checkpoint; skips when none has been trained into the tree."""
    import pytest

    from daemon.config import load_config

    cfg = load_config()
    path = cfg.resolve(cfg.classifier.checkpoint)
    if not path.is_file():
        pytest.skip(f"no trained checkpoint at {path}")
    return path


def real_analyzer():
    """The shipped pipeline: ``analyze_field`` with the default checkpoint, as (rgb, um/px) ->
    cells."""
    from daemon.config import load_config
    from pipeline.analyze import analyze_field
    from pipeline.classify import load_classifier

    cfg = load_config()
    clf = load_classifier(checkpoint_path(), cfg.classes, params=cfg.classifier)

    def analyze(rgb, um_per_px):
        return analyze_field(rgb, um_per_px, clf, cfg.detect, cfg.analysis)

    return analyze
