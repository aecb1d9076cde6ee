"""A lab's own signed slides put to work: how often reviewers kept the machine's call
(`marrowcount agreement`) and the reviewed cells exported as a training folder
(`marrowcount export-reviewed`), on a slide counted by the real pipeline and then reviewed."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timezone

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from daemon.cli import app
from daemon.models import Cell, Field
from daemon.review import actions
from daemon.review.app import create_app
from daemon.reviewed import (
    NONE,
    ReviewedCell,
    ReviewedError,
    agreement,
    reviewed_cells,
    signed_slides,
    slide_method_texts,
)
from pipeline.datasets import check_labels, read_folder_tree
from tests.conftest import BCCD
from tests.review_slide import (  # noqa: F401  (fixtures)
    SLIDE_NAME,
    TECH,
    login,
    pipeline_fields,
    review_env,
    review_template,
)

WHO = actions.Reviewer(TECH[0], "technician")


def _missed_white_cells(s, slide_id):
    """(field, x, y) of each BCCD-marked white cell with no kept detection within 5 µm."""
    for fld in s.scalars(select(Field).where(Field.slide_id == slide_id).order_by(Field.index)):
        xml = BCCD / "Annotations" / (fld.tile.rsplit(".", 1)[0] + ".xml")
        kept = s.scalars(select(Cell).where(Cell.field_id == fld.id,
                                            Cell.duplicate_of.is_(None))).all()
        for o in ET.parse(xml).getroot().iter("object"):
            if o.findtext("name") != "WBC":
                continue
            box = o.find("bndbox")
            x = (float(box.findtext("xmin")) + float(box.findtext("xmax"))) / 2
            y = (float(box.findtext("ymin")) + float(box.findtext("ymax"))) / 2
            if all(((c.x - x) ** 2 + (c.y - y) ** 2) ** 0.5 * fld.um_per_px >= 5 for c in kept):
                yield fld, x, y


def _review_and_sign(env) -> dict:
    """Two calls changed, one cell excluded as not a leukocyte, one as a smudge, one added
    where BCCD marks a white cell; then signed. Returns what was done."""
    taxonomies = {env.cfg.taxonomy: env.cfg.classes}
    with env.store.session() as s:
        cells = list(s.scalars(select(Cell).where(Cell.slide_id == env.slide_id,
                                                  Cell.duplicate_of.is_(None))
                               .order_by(Cell.id)))
        counted = [c for c in cells if c.label != "non_leukocyte"]
        assert len(counted) >= 4, "the pipeline found too few leukocytes on the test fields"
        a, b, c, d = counted[:4]
        target = next(n for n in env.cfg.classes.counted
                      if n not in {a.label, b.label} and n in env.cfg.classes.model_names)
        done = {"n": len(cells), "reclassified": [(a.label, target), (b.label, target)],
                "not_leukocyte": c.label, "smudge": d.label}
        actions.reclassify(s, env.slide_id, [a.id, b.id], target, WHO, taxonomies)
        actions.exclude(s, env.slide_id, [c.id], "not_leukocyte", WHO)
        actions.exclude(s, env.slide_id, [d.id], "smudge", WHO)
        # The first white cell BCCD marks where the machine found none (the reviewer adds
        # it); a marked cell the machine did find cannot be added again.
        missed = _missed_white_cells(s, env.slide_id)
        fld, x, y = next(missed)
        actions.add_cell(s, env.slide_id, fld.id, x, y, "lymphocyte", WHO, taxonomies,
                         env.store.data_dir, 0.2)
        # A second one added by mistake and undone was never a cell: not missed, not excluded.
        fld, x, y = next(missed)
        actions.add_cell(s, env.slide_id, fld.id, x, y, "monocyte", WHO, taxonomies,
                         env.store.data_dir, 0.2)
        actions.undo(s, env.slide_id, WHO)
        actions.sign(s, env.slide_id, WHO)
    return done


def _lab_yaml(env) -> str:
    path = env.root / "lab.yaml"
    path.write_text(yaml.safe_dump({"store": {"url": env.url,
                                              "data_dir": str(env.store.data_dir)}}))
    return str(path)


def test_agreement_counts_each_review_decision(review_env):
    env = review_env
    with pytest.raises(ReviewedError, match="not signed"):
        signed_slides(env.store, env.cfg.taxonomy, [SLIDE_NAME])
    client = TestClient(create_app(env.cfg, env.store))
    login(client, TECH)
    assert "no signed slides of taxonomy" in client.get("/agreement").text
    done = _review_and_sign(env)
    slides = signed_slides(env.store, env.cfg.taxonomy)
    cells = reviewed_cells(env.store, slides)
    res = agreement(cells, env.cfg.classes, slide_method_texts(env.store, slides))
    (method,) = res["methods"]  # one model and settings: one method, on every slide
    assert res["methods"][method] == 1 and res["slides"][SLIDE_NAME]["methods"] == [method]
    assert "settings " in method and "model default.pt" in method
    space = res["classes"]
    cm = res["confusion"]
    assert res["cells"] == done["n"] + 1  # the added cell
    assert res["missed"] == 1 and cm[space.index("lymphocyte")][space.index(NONE)] == 1
    assert res["excluded"] == 1 and sum(cm[space.index(NONE)]) == 1
    changed = 2 + (done["not_leukocyte"] != "non_leukocyte") + 1 + 1
    assert res["agreement"] == pytest.approx((res["cells"] - changed) / res["cells"], abs=1e-4)
    for old, new in done["reclassified"]:
        assert cm[space.index(new)][space.index(old)] >= 1
    slide = res["slides"][SLIDE_NAME]
    assert slide["changed"] == changed and slide["cells"] == res["cells"]
    reviewed = env.store.reviewed_counts(env.slide_id)
    assert slide["reviewed_counted"] == sum(n for k, n in reviewed.items()
                                            if k in env.cfg.classes.counted)
    assert 0 < res["kappa"] <= res["agreement"]
    # The headline leaves out cells neither side counted (agreeing "not a leukocyte" calls).
    both_out = sum(c.machine not in env.cfg.classes.counted
                   and (c.final or NONE) not in env.cfg.classes.counted for c in cells)
    leuk = res["leukocytes"]
    assert leuk["cells"] == res["cells"] - both_out
    assert leuk["agreement"] == pytest.approx((leuk["cells"] - changed) / leuk["cells"],
                                              abs=1e-4)
    # Sensitivity of the reviewer's lymphocytes: the added one was missed by the machine.
    lym = res["per_class"]["lymphocyte"]
    assert lym["n"] == sum(row == "lymphocyte" for row in (c.final for c in cells))
    assert lym["recall"] < 1.0

    client = TestClient(create_app(env.cfg, env.store))
    login(client, TECH)
    page = client.get("/agreement").text
    assert f"agree on <strong>{100 * leuk['agreement']:.1f}%</strong>" in page
    assert f"<td>{SLIDE_NAME}</td><td>{res['cells']}</td><td>{changed}</td>" in page
    assert f"<tr><td>Lymphocyte</td><td>{lym['n']}</td>" in page  # labels, not class names
    assert "no signed slides" in client.get("/agreement?since=2999-01-01").text
    assert client.get("/agreement?since=yesterday").status_code == 400
    assert "not accuracy against an independent count" in page
    assert 'id="agreement-mixed"' not in page

    runner = CliRunner()
    png = env.root / "agreement.png"
    r = runner.invoke(app, ["agreement", "--json", "--png", str(png), "--config", _lab_yaml(env)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads(json.dumps(res)) and png.stat().st_size > 1000
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")  # signed just now, in UTC
    r = runner.invoke(app, ["agreement", "--json", "--since", today, "--config", _lab_yaml(env)])
    assert r.exit_code == 0 and json.loads(r.stdout)["cells"] == res["cells"]
    r = runner.invoke(app, ["agreement", "--since", "2999-01-01", "--config", _lab_yaml(env)])
    assert isinstance(r.exception, ReviewedError) and "signed since 2999-01-01" in str(r.exception)

    # Part of the slide counted under other settings (a resume after a config change): the
    # figures pool two methods, and both the page and the command say so.
    with env.store.session() as s:
        first = s.scalars(select(Field).where(Field.slide_id == env.slide_id)
                          .order_by(Field.index)).first()
        first.method = {**first.method, "settings": "0123456789ab"}
    page = client.get("/agreement").text
    assert 'id="agreement-mixed"' in page and "counted with 2 methods" in page
    r = runner.invoke(app, ["agreement", "--config", _lab_yaml(env)])
    assert r.exit_code == 0 and "counted with 2 methods" in r.stdout
    assert "settings 0123456789ab" in r.stdout

def test_agreement_headline_is_over_leukocytes_and_undefined_values_are_none(config):
    """400 leukocytes (100 myelocytes called metamyelocyte by the reviewer) and 400 debris
    calls both sides agree on: 75% agree on leukocytes, not the 87.5% of all cells; a
    kappa or specificity with nothing to measure is None, not 1.0 or NaN."""
    def cell(i: int, machine: str, final: str | None) -> ReviewedCell:
        return ReviewedCell(slide="S", field_index=0, cell_id=i, index=i, x=0.0, y=0.0,
                            machine=machine, final=final, field_image=None,
                            field_um_per_px=0.1, crop=None, crop_um_per_px=None)

    calls = ([("myelocyte", "metamyelocyte")] * 100 + [("myelocyte", "myelocyte")] * 100
             + [("metamyelocyte", "metamyelocyte")] * 200
             + [("non_leukocyte", "non_leukocyte")] * 400)
    res = agreement([cell(i, m, f) for i, (m, f) in enumerate(calls)], config.classes)
    assert res["agreement"] == 0.875 and res["leukocytes"]["cells"] == 400
    assert res["leukocytes"]["agreement"] == 0.75
    # By hand: leukocytes p_e = (200·100 + 200·300) / 400² = 0.5, kappa (0.75 − 0.5) / 0.5;
    # all cells p_e = (200·100 + 200·300 + 400·400) / 800² = 0.375, kappa 0.5 / 0.625.
    assert (res["leukocytes"]["kappa"], res["kappa"]) == (0.5, 0.8)
    myelo, meta = res["per_class"]["myelocyte"], res["per_class"]["metamyelocyte"]
    assert (myelo["n"], myelo["precision"], myelo["recall"]) == (100, 0.5, 1.0)
    assert (meta["n"], meta["precision"], meta["recall"]) == (300, 1.0, pytest.approx(2 / 3))
    same = agreement([cell(i, "myelocyte", "myelocyte") for i in range(50)], config.classes)
    assert same["agreement"] == 1.0 and same["kappa"] is None
    assert same["per_class"]["myelocyte"]["specificity"] is None
    json.loads(json.dumps(same, allow_nan=False))


def test_export_writes_a_training_folder_of_the_reviewers_classes(review_env):
    env = review_env
    done = _review_and_sign(env)
    with env.store.session() as s:  # one field's image lost: its cells come from their crops
        lost = s.scalars(select(Field).where(Field.slide_id == env.slide_id,
                                             Field.n_counted > 0).order_by(Field.index)).all()[-1]
        lost_index = lost.index
        env.store.path(lost.image_path).unlink()
    out = env.root / "export"
    runner = CliRunner()
    r = runner.invoke(app, ["export-reviewed", str(out), "--config", _lab_yaml(env)])
    assert r.exit_code == 0, r.output
    assert "kind: folder" in r.output and "um_per_px: 0.2" in r.output

    final = Counter()
    for c in reviewed_cells(env.store, signed_slides(env.store, env.cfg.taxonomy)):
        if c.final is not None:
            final[c.final] += 1
    samples = read_folder_tree(out, 0.2)
    check_labels(samples, env.cfg.classes.model_names)  # a valid `folder` training source
    assert Counter(s.label for s in samples) == final
    assert sum(final.values()) == done["n"] + 1 - 1  # the added cell in, the smudge out
    rows = list(csv.DictReader(open(out / "cells.csv", encoding="utf-8")))
    assert len(rows) == len(samples)
    assert {r["cut_from"] for r in rows if int(r["field"]) == lost_index} == {"crop"}
    assert {r["cut_from"] for r in rows if int(r["field"]) != lost_index} == {"field"}
    assert sum(r["machine_label"] == NONE and r["label"] == "lymphocyte" for r in rows) == 1
    if done["not_leukocyte"] != "non_leukocyte":
        assert sum(r["label"] == "non_leukocyte" and r["machine_label"] == done["not_leukocyte"]
                   for r in rows) >= 1
    assert all(Image.open(out / r["file"]).size == (128, 128) for r in rows)

    # The exported images are the cells themselves: the shipped model, on their centre
    # crops, mostly makes the call it made in the field where the reviewer kept it.
    from pipeline.classify import load_classifier
    from pipeline.evaluate_classifier import crops_from_files

    kept = [r for r in rows if r["label"] == r["machine_label"]]
    crops, ok, errors = crops_from_files([out / r["file"] for r in kept], 0.2, 0.2)
    assert not errors
    clf = load_classifier(env.cfg.resolve(env.cfg.classifier.checkpoint), env.cfg.classes,
                          params=env.cfg.classifier)
    same = sum(lab == r["label"] for lab, r in zip(clf.classify(crops).labels(clf.classes), kept))
    assert same >= 0.8 * len(kept)

    # Never into a folder that holds something: an export does not mix with an older one.
    r = runner.invoke(app, ["export-reviewed", str(out), "--config", _lab_yaml(env)])
    assert r.exit_code != 0 and "not an empty folder" in str(r.exception)


def test_an_export_with_reviewer_only_cells_is_a_source_train_accepts(review_env):
    """A reviewer named a plasma cell (a class the model does not learn): the export keeps
    its crop, and the source line it prints leaves it out, so `train` takes the source as
    printed (it had refused the whole export)."""
    from pipeline.datasets import SourceParams, read_source

    env = review_env
    taxonomies = {env.cfg.taxonomy: env.cfg.classes}
    with env.store.session() as s:
        cell = next(c for c in s.scalars(select(Cell).where(Cell.slide_id == env.slide_id,
                                                            Cell.duplicate_of.is_(None)))
                    if c.label != "non_leukocyte")
        actions.reclassify(s, env.slide_id, [cell.id], "plasma_cell", WHO, taxonomies)
        actions.sign(s, env.slide_id, WHO)
    out = env.root / "export"
    r = CliRunner().invoke(app, ["export-reviewed", str(out), "--config", _lab_yaml(env)])
    assert r.exit_code == 0, r.output
    assert (out / "plasma_cell").is_dir() and "exclude: [plasma_cell]" in r.output
    line = next(ln for ln in r.output.splitlines() if "kind: folder" in ln)
    src = SourceParams(**yaml.safe_load(line.strip().removeprefix("- ")))
    got = read_source(src, env.root, 0)
    check_labels(got, env.cfg.classes.model_names, reviewer_only=env.cfg.classes.reviewer_only)
    assert got and "plasma_cell" not in {s.label for s in got}
