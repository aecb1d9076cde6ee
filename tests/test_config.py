"""Configuration: defaults validate, bad values fail naming the key, overrides merge."""

from __future__ import annotations

import pytest

from daemon.config import load_config
from pipeline.errors import ConfigError


def test_defaults_validate_and_expose_taxonomy():
    cfg = load_config()
    tax = cfg.classes
    assert tax.name == "pbc11"
    assert "non_leukocyte" in tax.names and "non_leukocyte" not in tax.counted
    # The shipped model's ten leukocyte classes, plus three a reviewer names (blasts, plasma
    # cells, any other nucleated cell) so that no cell is forced into a wrong class.
    assert len(tax.counted) == 13 and len(tax.model_names) == 11
    assert [c.name for c in tax.classes if c.reviewer_only] == [
        "myeloblast", "plasma_cell", "other_nucleated"]
    assert "myeloblast" in [c.name for c in cfg.taxonomies["seed10"] if c.blast]


def test_a_lab_taxonomy_replaces_only_its_own(tmp_path):
    """A lab that redefines seed10 (e.g. marks stages it has no crops for reviewer-only)
    keeps pbc11, whose slides it still reviews and reports."""
    p = tmp_path / "lab.yaml"
    p.write_text("taxonomy: seed10\ntaxonomies:\n  seed10:\n"
                 "    - {name: myeloblast, label: Myeloblast, lineage: myeloid, blast: true, key: '1'}\n"
                 "    - {name: segmented_neutrophil, label: Seg, lineage: myeloid, blast: false, key: '2'}\n"
                 "    - {name: lymphocyte, label: Lymph, lineage: lymphoid, blast: false, key: l, reviewer_only: true}\n"
                 "    - {name: non_leukocyte, label: Not a leukocyte, lineage: non_leukocyte, blast: false, key: x}\n"
                 "train: {local_pairs: [], local_own_body: []}\n")
    cfg = load_config(p)
    assert cfg.classes.model_names == ["myeloblast", "segmented_neutrophil", "non_leukocyte"]
    assert cfg.taxonomies["pbc11"] == load_config().taxonomies["pbc11"]


def test_reviewer_only_class_cannot_be_a_local_pair(tmp_path):
    p = tmp_path / "lab.yaml"
    p.write_text("train:\n  local_pairs: [[myeloblast, promyelocyte]]\n")
    with pytest.raises(ConfigError, match="reviewer_only classes have no model"):
        load_config(p)


def test_bad_value_names_the_key(tmp_path):
    p = tmp_path / "lab.yaml"
    p.write_text("analysis:\n  guidance_threshold: 1.5\n")
    with pytest.raises(ConfigError, match=r"analysis\.guidance_threshold"):
        load_config(p)
    # A stop decided at a looser interval than the report's would be reported as straddling
    # the threshold it was stopped for.
    p.write_text("stats:\n  confidence: 0.99\n  adaptive_confidence: 0.95\n")
    with pytest.raises(ConfigError, match=r"stats: .*adaptive_confidence 0\.95 must be at "
                                          r"least confidence 0\.99"):
        load_config(p)
    p.write_text("stats:\n  adaptive_stop: true\n  min_reportable_cells: 500\n")
    with pytest.raises(ConfigError, match=r"adaptive_min_cells 200 must be at least "
                                          r"min_reportable_cells 500"):
        load_config(p)


def test_unknown_key_is_refused(tmp_path):
    p = tmp_path / "lab.yaml"
    p.write_text("detect:\n  work_um_per_pixel: 0.3\n")
    with pytest.raises(ConfigError, match=r"detect\.work_um_per_pixel"):
        load_config(p)


def test_unknown_taxonomy_and_broken_yaml(tmp_path):
    p = tmp_path / "lab.yaml"
    p.write_text("taxonomy: nope\n")
    with pytest.raises(ConfigError, match="nope"):
        load_config(p)
    p.write_text("detect: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_lab_override_merges_over_defaults(tmp_path):
    p = tmp_path / "lab.yaml"
    p.write_text("taxonomy: seed10\nacquisition:\n  target: 300\n")
    cfg = load_config(p)
    assert cfg.acquisition.target == 300
    assert cfg.classes.name == "seed10" and len(cfg.classes.model_names) == 11
    assert len(cfg.classes.counted) == 16  # the ten stages and six reviewer-only classes
    assert cfg.analysis.guidance_threshold == 0.8


def test_local_pairs_must_be_classes_of_the_taxonomy(tmp_path):
    p = tmp_path / "lab.yaml"
    p.write_text("taxonomy: seed10\ntrain:\n  local_pairs: [[myelocyte, plasma_cell]]\n")
    with pytest.raises(ConfigError, match=r"train\.local_pairs.*plasma_cell"):
        load_config(p)
    p.write_text("taxonomy: seed10\ntrain:\n  local_pairs: [[myeloblast, promyelocyte]]\n")
    assert load_config(p).train.local_pairs == (("myeloblast", "promyelocyte"),)


@pytest.mark.parametrize("name", ["loco_basophil", "loco_monocyte"])
def test_leave_one_class_out_recipes_leave_their_class_out(name):
    """The committed leave-one-class-out recipes validate, and the class each measures is
    neither in its taxonomy nor read from any source."""
    from daemon.config import REPO_ROOT

    cfg = load_config(REPO_ROOT / "config" / f"{name}.yaml")
    unseen = name.removeprefix("loco_")
    assert unseen not in cfg.classes.names
    pbc = [s for s in cfg.train.sources if s.kind == "manifest"]
    assert pbc and all(unseen in s.exclude for s in pbc)


def test_every_bad_key_is_named_at_once_and_a_short_source_is_enough(tmp_path):
    p = tmp_path / "lab.yaml"
    p.write_text("analysis:\n  guidance_threshold: 1.5\ndetect:\n  work_um_per_pixel: 0.3\n"
                 "service:\n  poll_seconds: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    for key in ("analysis.guidance_threshold", "detect.work_um_per_pixel",
                "service.poll_seconds"):
        assert key in msg, msg
    # A lab's folder of crops needs only its kind, path and pixel size.
    p.write_text("train:\n  sources:\n    - {kind: folder, path: /data/crops, um_per_px: 0.1}\n")
    src = load_config(p).train.sources[0]
    assert (src.train_only, src.exclude, src.rename, src.max_per_label) == (False, (), {}, 0)
    p.write_text("train:\n  sources:\n    - {kind: folder, path: /data/crops}\n")
    with pytest.raises(ConfigError, match=r"train\.sources\.0\.um_per_px: Field required"):
        load_config(p)


def test_check_config_names_each_resolved_path_and_what_is_wrong_with_it(tmp_path):
    """The schema checks values, not the machine: check-config also says where the store,
    data, watch and LIS folders resolve to, and warns of a model file that is not there and
    a folder the service cannot use (a LIS folder sign-offs would wait on)."""
    from typer.testing import CliRunner

    from daemon.cli import app

    (tmp_path / "scanner").mkdir()
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"""
store: {{url: "sqlite:///{tmp_path}/db/m.db", data_dir: {tmp_path}/data}}
classifier: {{checkpoint: {tmp_path}/missing.pt}}
watch: {{folders: [{tmp_path}/scanner, {tmp_path}/not-mounted]}}
review: {{export_dir: {tmp_path}/lis}}
""")
    res = CliRunner().invoke(app, ["check-config", "-c", str(lab)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert f"store: sqlite:///{tmp_path}/db/m.db" in lines
    assert f"warning: model {tmp_path}/missing.pt does not exist: the daemon will not start" in lines
    warned = [x for x in lines if x.startswith("warning:")]
    assert [x.split()[1:4] for x in warned] == [
        ["model", f"{tmp_path}/missing.pt", "does"], ["watch", "folder", f"{tmp_path}/not-mounted"],
        ["LIS", "export", "folder"]], warned  # the store and data folders are made at start
