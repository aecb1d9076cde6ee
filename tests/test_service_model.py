"""The model behind a count. Every analysed field records the software, the SHA-256 of the
model file loaded, the precision and a fingerprint of the settings; a slide resumed after its
model file was replaced is reported as counted with two methods (JSON, CSV, PDF, review page);
a model file that cannot be loaded pauses counting until it is fixed, failing no slide."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess

import torch
from fastapi.testclient import TestClient
from pypdf import PdfReader

from daemon.report import build_report, report_csv, write_report
from daemon.review.app import create_app
from daemon.store import Store
from tests.conftest import REPO
from tests.daemon_fixtures import bccd_slide_file, daemon_config, run_in_process, submit
from tests.review_slide import TECH, add_users, login

SHIPPED = REPO / "pipeline" / "models" / "default.pt"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_slide_resumed_under_a_replaced_model_reports_both_methods(tmp_path):
    slide = bccd_slide_file(tmp_path, cols=3, rows=1)
    model = tmp_path / "model.pt"
    shutil.copyfile(SHIPPED, model)
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'm.db'}",
                           extra={"classifier": {"checkpoint": str(model)}})
    cfg, (sid,) = submit(config, (slide, "BM-method"))
    first_sha = _sha(model)

    run_in_process(config, stop_after_first_field=True)  # SIGTERM's path: still acquiring
    # A lab copies a recalibrated model over the old file while the slide waits.
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    ckpt["temperature"] = float(ckpt["temperature"]) * 1.5
    torch.save(ckpt, model)
    second_sha = _sha(model)
    assert second_sha != first_sha
    run_in_process(config)

    with Store.from_params(cfg.store, cfg.resolve) as store:
        fields = store.fields(sid)
        assert [f.index for f in fields] == [0, 1, 2]
        assert store.slide(sid).status == "awaiting_review"
        shas = [f.method["model_sha256"] for f in fields]
        assert shas == [first_sha, second_sha, second_sha]
        assert {f.method["precision"] for f in fields} <= {"int8", "bf16"}
        assert {f.method["crop_um_per_px"] for f in fields} == {0.2}  # the checkpoint's scale
        assert len({f.method["settings"] for f in fields}) == 1  # the settings did not change
        rep = build_report(store, sid, cfg)
        methods = rep["methods"]
        assert [(m["model_sha256"], m["fields"]) for m in methods] == [(first_sha, 1),
                                                                       (second_sha, 2)]
        assert all(m["model"] == "model.pt" and m["taxonomy"] == cfg.taxonomy for m in methods)
        flag = next(f for f in rep["flags"] if f.startswith("counted with 2 methods"))
        assert first_sha in flag and second_sha in flag
        rows = [r for r in csv.DictReader(io.StringIO(report_csv(rep)))
                if r["quantity"] == "METHOD"]
        assert [int(r["n"]) for r in rows] == [1, 2] and second_sha in rows[1]["label"]
        pdf = tmp_path / "m.pdf"
        write_report(store, sid, cfg, "pdf", pdf)
        text = "".join(p.extract_text() for p in PdfReader(pdf).pages).replace("\n", " ")
        assert first_sha in text and second_sha in text

        add_users(store)
        client = TestClient(create_app(cfg, store))
        login(client, TECH)
        page = client.get(f"/slides/{sid}")
        assert page.status_code == 200
        shown = [line for line in page.text.splitlines() if 'class="meta method warn"' in line]
        assert len(shown) == 2 and first_sha in shown[0] and second_sha in shown[1]


def test_changed_settings_change_the_fingerprint(tmp_path, config):
    from daemon.provenance import analysis_method, file_sha256

    sha = file_sha256(SHIPPED)
    assert sha[:16] == _sha(SHIPPED)
    a = analysis_method(config, "default.pt", sha, "int8", 0.2)
    assert (a["model"], a["model_sha256"]) == ("default.pt", sha[:16])
    guided = config.model_copy(update={"analysis": config.analysis.model_copy(
        update={"guidance_threshold": config.analysis.guidance_threshold - 0.1})})
    assert analysis_method(guided, "default.pt", sha, "int8", 0.2)["settings"] != a["settings"]
    # So do the settings that choose which fields are counted: a tightened quality gate had
    # counted 291 cells instead of 507 under one fingerprint.
    acq = config.acquisition
    for changed in (
            {"acquisition": acq.model_copy(update={"quality": acq.quality.model_copy(
                update={"min_nucleated": acq.quality.min_nucleated + 5})})},
            {"acquisition": acq.model_copy(update={"prescan": acq.prescan.model_copy(
                update={"enabled": not acq.prescan.enabled})})},
            {"watch": config.watch.model_copy(update={"wsi": config.watch.wsi.model_copy(
                update={"min_nucleated": config.watch.wsi.min_nucleated + 1})})}):
        other = analysis_method(config.model_copy(update=changed), "default.pt", sha, "int8", 0.2)
        assert other["settings"] != a["settings"], changed
    # ... but not the target (per slide, on the report), a retry count, or the stats a
    # report is computed with when it is printed.
    other = config.model_copy(update={"acquisition": acq.model_copy(update={
        "target": 300, "retries": 9}), "stats": config.stats.model_copy(update={
            "blast_thresholds_pct": (5.0,)})})
    assert analysis_method(other, "default.pt", sha, "int8", 0.2)["settings"] == a["settings"]
    # Where the checkpoint lives and how many crops go per batch change no call.
    batched = config.model_copy(update={"classifier": config.classifier.model_copy(
        update={"checkpoint": tmp_path / "elsewhere.pt", "batch_size": 7})})
    assert analysis_method(batched, "elsewhere.pt", sha, "int8", 0.2)["settings"] == a["settings"]
    # The fingerprint can be looked up: the settings it was made of are kept beside it.
    blob = json.dumps(a["settings_used"], sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest()[:12] == a["settings"]
    assert a["settings_used"]["analysis"]["guidance_threshold"] == 0.8
    # The software is named down to the source commit it ran from (a checkout, as here).
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
    if head:
        assert f"+g{head}" in a["software"]


def test_the_source_commit_is_read_from_a_checkout_another_user_owns(tmp_path):
    """The documented install clones as root and runs as the service user: git refuses a
    checkout another user owns, and every result had named plain "0.1.0"."""
    import os

    from daemon.provenance import git_commit

    if os.geteuid() != 0:
        pytest.skip("needs root to give the checkout to another user")
    repo = tmp_path / "checkout"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@x"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("1\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for p in [repo, *repo.rglob("*")]:
        os.lchown(p, 65534, 65534)  # nobody's now, read by root: "dubious ownership"
    plain = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                           text=True)
    assert plain.returncode != 0 and "dubious ownership" in plain.stderr
    assert git_commit(repo) == f"g{head}"
    (repo / "a.txt").write_text("2\n")
    assert git_commit(repo) == f"g{head}-dirty"
    assert git_commit(tmp_path) is None  # not a checkout: no commit, no exception


def test_a_damaged_model_file_pauses_counting_until_it_is_fixed(tmp_path):
    """A new checkpoint half copied over the old one: the next slide waits, unfailed, with the
    reason noted; no other queued slide is claimed meanwhile; all are counted once the file is
    whole again."""
    slide = bccd_slide_file(tmp_path, cols=3, rows=1)
    model = tmp_path / "model.pt"
    shutil.copyfile(SHIPPED, model)
    good = model.read_bytes()
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'p.db'}", retry_slide_after_s=0.2,
                           extra={"classifier": {"checkpoint": str(model)}})
    cfg, ids = submit(config, (slide, "BM-A"), (slide, "BM-B"), (slide, "BM-C"))
    paused: list[tuple[str, str | None, str]] = []

    def on_event(e) -> None:
        if e.kind == "slide_finished" and e.name == "BM-A":
            model.write_bytes(good[: len(good) // 2])  # the copy broke off half way
        if e.kind == "slide_paused":
            with Store.from_params(cfg.store, cfg.resolve) as store:
                paused.append((e.data["reason"], store.slide(ids[1]).error,
                               store.slide(ids[2]).status))
            model.write_bytes(good)

    run_in_process(config, on_event)
    assert len(paused) == 1
    reason, note, third = paused[0]
    assert reason.startswith("model not loaded") and "not a readable checkpoint" in reason
    assert note.startswith(reason) and "retrying in 0.2 s" in note
    assert third == "queued"  # not claimed while the model was broken
    with Store.from_params(cfg.store, cfg.resolve) as store:
        for sid in ids:
            sl = store.slide(sid)
            assert (sl.status, sl.error) == ("awaiting_review", None)
            assert [f.index for f in store.fields(sid)] == [0, 1, 2]
            assert {f.method["model_sha256"] for f in store.fields(sid)} == {_sha(SHIPPED)}
