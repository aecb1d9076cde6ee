"""Classifier: training on a real PBC subset, checkpoint round trip, dual stage, shipped model,
bad input, augmentation, stain normalisation and calibration."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.augment import augment, dihedral
from pipeline.classify import load_classifier
from pipeline.datasets import (ANY_LEUKOCYTE, CACHE_SIZE, DatasetError, Sample, centre,
                               check_labels, label_index, load_crops, read_folder_tree,
                               read_source, split)
from pipeline.errors import CheckpointError, ConfigError
from pipeline.evaluate_classifier import expected_calibration_error
from pipeline.stain import lab_stats, reinhard
from pipeline.taxonomy import Taxonomy
from pipeline.train import (fit_temperature, save_checkpoint, set_nll, targets,
                            train_classifier)
from tests.conftest import PBC, PBC_UM_PER_PX, REPO

torch.set_num_threads(1)
SHIPPED = REPO / "pipeline" / "models" / "default.pt"


def _manifest() -> dict[str, list[str]]:
    by: dict[str, list[str]] = {}
    with (PBC / "manifest.csv").open() as f:
        for row in csv.DictReader(f):
            by.setdefault(row["label"], []).append(row["path"])
    return {k: sorted(v) for k, v in by.items()}


def _samples(labels: list[str], per: int, offset: int = 0) -> list[Sample]:
    """A fixed, spread-out real sample: every 37th image of each label."""
    man = _manifest()
    out = []
    for lab in labels:
        paths = man[lab][offset::37][:per]
        out += [Sample(str(PBC / p), lab, PBC_UM_PER_PX) for p in paths]
    return out


@pytest.fixture(scope="module")
def tiny(config, tmp_path_factory):
    """A tiny model trained for a few epochs on 3 real PBC classes."""
    classes = ["eosinophil", "lymphocyte", "band_neutrophil", "segmented_neutrophil"]
    data = load_crops(_samples(classes, 30), classes, config.train.um_per_px, threads=1)
    p = config.train.model_copy(update={
        "epochs": 5, "width": 0.125, "fc": 32, "per_class": 0, "augment": False,
        "conv_dropout": 0.0, "fc_dropout": 0.0, "lr": 0.02, "batch_size": 16,
        "local_epochs": 1, "local_per_class": 16, "val_fraction": 0.2,
        "local_pairs": (("band_neutrophil", "segmented_neutrophil"),), "local_own_body": ()})
    res = train_classifier(data, classes, p, taxonomy="tiny", data_hash="test", threads=1)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(res.checkpoint, path)
    return res, path, data, classes


def test_tiny_training_loss_falls(tiny):
    res = tiny[0]
    losses = [h.loss for h in res.history if h.stage == "global"]
    assert len(losses) == 5
    assert losses[-1] < 0.8 * losses[0]


def test_fine_tuning_starts_from_a_checkpoint(tiny, config):
    """``train --init``: one more epoch from the tiny model starts at its low loss, not at
    ln K; another class order keeps the body but not the output layer; a checkpoint of
    another width is refused by name."""
    from pipeline.classify import read_checkpoint
    from pipeline.classifier_params import TrainParams

    res, path, data, classes = tiny
    p = TrainParams.model_validate(res.checkpoint["params"]).model_copy(update={"epochs": 1})
    init = read_checkpoint(path)
    scratch = [h.loss for h in res.history if h.stage == "global"]
    tuned = train_classifier(data, classes, p, taxonomy="tiny", data_hash="test", threads=1,
                             init=init)
    assert tuned.history[0].loss < 0.6 * scratch[0], (tuned.history[0].loss, scratch)
    shuffled = {**init, "classes": list(reversed(init["classes"]))}
    other = train_classifier(data, classes, p.model_copy(update={"epochs": 1, "lr": 1e-6}),
                             taxonomy="tiny", data_hash="test", threads=1, init=shuffled)
    st, st0 = other.checkpoint["state"], init["state"]
    assert torch.allclose(st["body.0.weight"].float(), st0["body.0.weight"].float(), atol=1e-3)
    assert not torch.allclose(st["head.weight"].float(), st0["head.weight"].float(), atol=1e-3)
    with pytest.raises(CheckpointError, match="train.width"):
        train_classifier(data, classes, p.model_copy(update={"width": 0.25}), taxonomy="tiny",
                         data_hash="test", threads=1, init=init)


def test_checkpoint_round_trips_normalisation_scale_and_classes(tiny, config):
    res, path, data, classes = tiny
    clf = load_classifier(path)
    ck = res.checkpoint
    assert clf.classes == tuple(classes)
    assert clf.um_per_px == config.train.um_per_px
    np.testing.assert_allclose(clf.mean, ck["yuv_mean"], rtol=1e-6)
    np.testing.assert_allclose(clf.std, ck["yuv_std"], rtol=1e-6)
    assert clf.temperature == ck["temperature"] > 0
    # The training split's YUV statistics, recomputed independently.
    from pipeline.imaging import rgb_to_yuv
    yuv = rgb_to_yuv(centre(data.crops[res.split["train"]])).astype(np.float64)
    np.testing.assert_allclose(clf.mean, yuv.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(clf.std, yuv.std(axis=(0, 1, 2)), rtol=1e-5)
    out = clf.classify(centre(data.crops[:8]))
    assert out.probs.shape == (8, len(classes))


def test_taxonomy_mismatch_is_refused(tiny, config):
    with pytest.raises(CheckpointError, match="do not match taxonomy"):
        load_classifier(tiny[1], config.classes)


def test_other_architecture_and_corrupt_checkpoint_are_refused(tiny, tmp_path):
    ck = torch.load(tiny[1], weights_only=True)
    ck["arch"] = "resnet18"
    other = tmp_path / "other.pt"
    torch.save(ck, other)
    with pytest.raises(CheckpointError, match="architecture 'resnet18'"):
        load_classifier(other)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny[1].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_classifier(broken)
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def shipped(config):
    return load_classifier(SHIPPED, config.classes, params=config.classifier)


@pytest.fixture(scope="module")
def fixed_sample(config):
    """Ten real PBC cells per class (platelets stand for non_leukocyte)."""
    labels = [c for c in config.classes.model_names if c != "non_leukocyte"] + ["platelet"]
    samples = [Sample(s.path, "non_leukocyte" if s.label == "platelet" else s.label, s.um_per_px)
               for s in _samples(labels, 10, offset=5)]
    return load_crops(samples, config.classes.model_names, config.train.um_per_px, size=96, threads=1)


def test_shipped_model_scores_above_floor(shipped, fixed_sample):
    res = shipped.classify(fixed_sample.crops)
    acc = float((res.probs.argmax(1) == fixed_sample.labels).mean())
    assert len(fixed_sample.labels) == 110
    assert acc > 0.75, acc


def test_shipped_model_runs_int8_and_agrees_with_bf16(shipped, fixed_sample):
    """The shipped checkpoint carries int8 state; on real cells the int8 classifier makes the
    float model's calls and stays a calibrated distribution."""
    from pipeline.classify import Classifier, read_checkpoint

    assert shipped.precision == "int8", shipped.precision_note
    assert isinstance(shipped.model.body[1], torch.ao.nn.intrinsic.quantized.ConvReLU2d)
    bf16 = Classifier(read_checkpoint(SHIPPED), SHIPPED, precision="bf16")
    assert bf16.precision == "bf16"
    a, b = shipped.classify(fixed_sample.crops), bf16.classify(fixed_sample.crops)
    agree = float((a.probs.argmax(1) == b.probs.argmax(1)).mean())
    assert agree >= 0.97, agree
    assert float(np.abs(a.probs - b.probs).mean()) < 0.01
    np.testing.assert_allclose(a.probs.sum(1), 1.0, atol=1e-5)


def test_byte_max_pool_is_torchs_quantized_max_pool_bit_for_bit(shipped, fixed_sample):
    """The int8 body pools its 16-channel first block on the 8-bit codes (faster than torch's
    kernel there); on real cells every pool's output and the logits are exactly torch's."""
    from pipeline.quantize import ByteMaxPool2x2

    body = shipped.model.body
    pools = [i for i, m in enumerate(body) if isinstance(m, ByteMaxPool2x2)]
    assert len(pools) == 5
    x = shipped._prep(fixed_sample.crops)
    with torch.inference_mode():
        h, channels = x, []
        for i, m in enumerate(body):
            if i in pools:
                ours, theirs = m(h), torch.nn.functional.max_pool2d(h, 2)
                assert torch.equal(ours.int_repr(), theirs.int_repr()), i
                assert (ours.q_scale(), ours.q_zero_point()) == (theirs.q_scale(),
                                                                 theirs.q_zero_point())
                assert ours.is_contiguous(memory_format=torch.channels_last)
                channels.append(h.shape[1])
            h = m(h)
        assert min(channels) < 32  # the byte path itself ran, not only torch's fallback
        before = body(x)
        for i in pools:
            body[i] = torch.nn.MaxPool2d(2)
        try:
            assert torch.equal(body(x), before)
        finally:
            for i in pools:
                body[i] = ByteMaxPool2x2()
        # Odd sizes and float input go to torch's kernel.
        odd = torch.quantize_per_tensor(torch.rand(2, 16, 7, 9), 0.01, 0, torch.quint8)
        assert torch.equal(ByteMaxPool2x2()(odd).int_repr(),
                           torch.nn.functional.max_pool2d(odd, 2).int_repr())
        f = torch.rand(2, 16, 8, 8)
        assert torch.equal(ByteMaxPool2x2()(f), torch.nn.functional.max_pool2d(f, 2))


def test_training_writes_int8_state_and_old_checkpoints_run_bf16(tiny, tmp_path):
    """A trained checkpoint loads int8; one without int8 state (written before it existed)
    runs bf16 and says how to add it; int8 state of another model is refused by name."""
    from pipeline.classify import Classifier, read_checkpoint, with_int8

    res, path, data, classes = tiny
    ck = read_checkpoint(path)
    assert ck["int8"]["calibration_cells"] == len(res.split["train"])
    clf = load_classifier(path)
    assert clf.precision == "int8" and clf.precision_note == ""
    crops = centre(data.crops)
    ref = Classifier(ck, path, precision="bf16").classify(crops).probs.argmax(1)
    assert float((clf.classify(crops).probs.argmax(1) == ref).mean()) >= 0.9
    old = {k: v for k, v in ck.items() if k != "int8"}
    torch.save(old, tmp_path / "old.pt")
    legacy = load_classifier(tmp_path / "old.pt")
    assert legacy.precision == "bf16" and "marrowcount quantize" in legacy.precision_note
    # What `marrowcount quantize` does to such a checkpoint: int8 again, same calls.
    again = Classifier(with_int8(old, crops[:40]), path)
    assert again.precision == "int8"
    assert float((again.classify(crops).probs.argmax(1) == ref).mean()) >= 0.9
    wrong = {**ck, "int8": {**ck["int8"], "global": read_checkpoint(SHIPPED)["int8"]["global"]}}
    with pytest.raises(CheckpointError, match="int8 state does not fit"):
        Classifier(wrong, path)


def test_folding_batch_norm_keeps_the_shipped_models_outputs(fixed_sample):
    """The loaded (BN-folded) model gives the stored model's logits on real cells."""
    from pipeline.classify import _model
    from pipeline.model import build, to_input

    ck = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    plain = build(len(ck["classes"]), float(ck["width"]), int(ck["fc"]), init=False)
    plain.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in ck["state"].items()})
    plain.eval()
    fused = _model(ck, ck["state"], len(ck["classes"]), SHIPPED)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = to_input(centre(fixed_sample.crops), np.asarray(ck["yuv_mean"], np.float32),
                 np.asarray(ck["yuv_std"], np.float32)).contiguous()
    with torch.inference_mode():
        a, b = plain(x), fused(x.contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-3 * float(a.abs().max()))
    assert (a.argmax(1) == b.argmax(1)).all()


def test_pair_offset_makes_the_local_model_predict_true_shares(shipped, fixed_sample):
    """The band/segmented offset fitted on validation (stored in the shipped checkpoint) is
    the one that makes predicted band count equal true band count; checked here by fitting it
    again on other real cells and counting."""
    from pipeline.train import fit_pair_offset

    loc = shipped.locals[0]
    rows = np.flatnonzero(np.isin(fixed_sample.labels, [loc.a, loc.b]))
    assert len(rows) == 20
    x = shipped._prep(fixed_sample.crops[rows])
    z = (shipped._local_logits(loc, x, shipped._run(shipped.model, x)[2])
         / loc.temperature).numpy()
    y = (fixed_sample.labels[rows] == loc.b).astype(int)
    offset = fit_pair_offset(z, y)
    assert int(((z[:, 0] - z[:, 1]) > offset).sum()) == int((y == 0).sum())
    assert 0.0 < loc.offset <= 2.0  # this model over-calls band without it (MODEL_CARD)


def test_dual_stage_probabilities_are_a_distribution(shipped, fixed_sample):
    res = shipped.classify(fixed_sample.crops)
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-5)
    assert (res.probs >= 0).all()
    assert len(shipped.locals) == 3
    top2 = np.argsort(-res.global_probs, 1)[:, :2]
    routed = np.zeros(len(top2), bool)
    for loc in shipped.locals:
        pair = np.isin(top2, [loc.a, loc.b]).all(1)
        routed |= pair
        # A local model only redistributes its pair's mass.
        np.testing.assert_allclose(res.probs[pair][:, [loc.a, loc.b]].sum(1),
                                   res.global_probs[pair][:, [loc.a, loc.b]].sum(1), atol=1e-5)
        if not pair.any():
            continue
        # ... as its calibrated logits plus the offset fitted on validation say (without the
        # offset this model over-calls band, MODEL_CARD).
        x = shipped._prep(fixed_sample.crops[pair])
        z = shipped._local_logits(loc, x, shipped._run(shipped.model, x)[2]) / loc.temperature
        q = torch.softmax(z + torch.tensor([0.0, loc.offset]), 1).numpy()
        mass = res.global_probs[pair][:, [loc.a, loc.b]].sum(1, keepdims=True)
        np.testing.assert_allclose(res.probs[pair][:, [loc.a, loc.b]], mass * q, atol=1e-4)
    assert routed.any() and not routed.all()
    assert all(abs(loc.offset) > 0.1 for loc in shipped.locals)  # each pair has its own
    np.testing.assert_allclose(res.probs[~routed], res.global_probs[~routed], atol=1e-6)
    assert 0 <= res.confidence.min() and res.confidence.max() <= 1


def test_temperature_scaling_improves_ece(shipped, config):
    labels = [c for c in config.classes.model_names if c != "non_leukocyte"]
    data = load_crops(_samples(labels, 12, offset=11), config.classes.model_names,
                      config.train.um_per_px, size=96, threads=1)
    logits = shipped.global_logits(data.crops)
    t = fit_temperature(torch.from_numpy(logits), data.labels)
    raw = expected_calibration_error(torch.softmax(torch.from_numpy(logits) * 1.0, 1).numpy(),
                                     data.labels)
    # Temperature scaling of deliberately mis-scaled logits recovers calibration.
    for scale in (0.3, 3.0):
        bad = torch.from_numpy(logits * scale)
        tb = fit_temperature(bad, data.labels)
        before = expected_calibration_error(torch.softmax(bad, 1).numpy(), data.labels)
        after = expected_calibration_error(torch.softmax(bad / tb, 1).numpy(), data.labels)
        assert after < before
    # The shipped logits are near-calibrated already: refitting on 120 other cells moves the
    # temperature and the ECE little (the fit minimises NLL, so ECE may still move a little).
    fitted = expected_calibration_error(torch.softmax(torch.from_numpy(logits) / t, 1).numpy(),
                                        data.labels)
    assert 0.5 < t / shipped.temperature < 2.0
    assert abs(fitted - raw) < 0.02 and raw < 0.1


def test_augmentation_is_deterministic_under_a_seed(fixed_sample, config):
    crops = fixed_sample.crops[:16]
    p = config.train.augmentation
    a = augment(crops.copy(), np.random.default_rng(3), p)
    b = augment(crops.copy(), np.random.default_rng(3), p)
    c = augment(crops.copy(), np.random.default_rng(4), p)
    assert a.dtype == np.uint8 and a.shape == crops.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, crops)


def test_dihedral_views_are_the_quarter_turns_of_a_cell_and_of_its_mirror_image(fixed_sample):
    """Codes 0-3 turn a real crop by that many quarter turns counter-clockwise, 4-7 also mirror
    it left-right; the 8 views are distinct, and a turn by 4 is the cell itself."""
    cell = fixed_sample.crops[3]
    views = dihedral(np.repeat(cell[None], 8, 0), np.arange(8))
    for t in range(8):
        want = np.rot90(cell, t % 4)
        assert np.array_equal(views[t], want[:, ::-1] if t >= 4 else want), t
    assert len({v.tobytes() for v in views}) == 8
    assert np.array_equal(dihedral(views[1:2], np.array([3])), cell[None])


def test_stain_normalisation_is_identity_on_the_reference(fixed_sample):
    ref_img = fixed_sample.crops[0]
    ref = lab_stats(ref_img)
    assert np.array_equal(reinhard(ref_img, ref), ref_img)
    other = reinhard(fixed_sample.crops[1], ref)
    got = lab_stats(other)
    np.testing.assert_allclose(got.mean, ref.mean, atol=3.0)


def test_a_model_trained_with_stain_normalisation_loads_and_normalises(tiny, tmp_path):
    """train.stain_normalization reinhard: the checkpoint stores the training crops' L*a*b*
    reference as plain numbers (it loads weights-only) and the classifier applies it."""
    from pipeline.classifier_params import TrainParams

    res, _, data, classes = tiny
    p = TrainParams.model_validate(res.checkpoint["params"]).model_copy(
        update={"epochs": 1, "stain_normalization": "reinhard"})
    out = train_classifier(data, classes, p, taxonomy="tiny", data_hash="test", threads=1)
    path = tmp_path / "stain.pt"
    save_checkpoint(out.checkpoint, path)
    clf = load_classifier(path)
    want = lab_stats(centre(data.crops[out.split["train"][:2000]]))
    np.testing.assert_allclose(clf.stain_reference.mean, want.mean)
    np.testing.assert_allclose(clf.stain_reference.std, want.std)
    from pipeline.model import to_input

    crop = centre(data.crops[:1])
    normalised = to_input(reinhard(crop[0], want)[None], clf.mean, clf.std)
    assert torch.equal(clf._prep(crop), normalised)
    assert not torch.equal(clf._prep(crop), to_input(crop, clf.mean, clf.std))


def test_unknown_class_in_folder_tree_and_empty_folder(tmp_path, config):
    root = tmp_path / "tree"
    for lab, paths in (("lymphocyte", 2), ("plasma_cell", 1)):
        (root / lab).mkdir(parents=True)
        for s in _samples(["lymphocyte"], paths):
            shutil.copy(s.path, root / lab / Path(s.path).name)
    samples = read_folder_tree(root, PBC_UM_PER_PX)
    # plasma_cell is a class of pbc11, but only a reviewer names it: the error says what to do.
    with pytest.raises(DatasetError, match=r"\['plasma_cell'\]: reviewer_only class.*exclude: "
                       r"\['plasma_cell'\]"):
        check_labels(samples, config.classes.model_names, where="my crops",
                     reviewer_only=config.classes.reviewer_only)
    typo = [Sample(s.path, "promyelocye", s.um_per_px) for s in samples[:1]]
    with pytest.raises(DatasetError, match=r"^my crops: \['promyelocye'\]: not classes of the "
                       r"taxonomy \(a typo\? 'promyelocye' -> 'promyelocyte'\?\)"):
        check_labels(typo, config.classes.model_names, where="my crops")
    # Crops sorted into batch folders inside a class folder are not silently passed over.
    (root / "lymphocyte" / "batch1").mkdir()
    shutil.copy(samples[0].path, root / "lymphocyte" / "batch1" / "x.jpg")
    with pytest.raises(DatasetError, match=r"outside the class folders are not read: "
                       r"lymphocyte/batch1/"):
        read_folder_tree(root, PBC_UM_PER_PX)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        read_folder_tree(tmp_path / "empty", PBC_UM_PER_PX)


def test_corrupt_crop_is_reported_and_the_rest_classified(tmp_path, config):
    from typer.testing import CliRunner

    from daemon.cli import app

    good = _samples(["eosinophil", "lymphocyte"], 2)
    for s in good:
        shutil.copy(s.path, tmp_path / Path(s.path).name)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # A 20 px square at 0.1 µm/px is 2 µm: no leukocyte fits, so it is refused, not classified.
    cv2.imwrite(str(tmp_path / "speck.png"), cv2.imread(good[0].path)[:20, :20])
    r = CliRunner().invoke(app, ["classify", str(tmp_path), "--um-per-px", "0.1", "--json"])
    # Every image gets its line; the exit status says that some could not be classified.
    assert r.exit_code != 0 and "2 of 6 image(s) could not be classified" in str(r.exception)
    rows = json.loads(r.stdout)
    assert len(rows) == 6
    bad = {Path(x["image"]).name: x["error"] for x in rows if "error" in x}
    assert set(bad) == {"corrupt.jpg", "speck.png"}
    assert "covers 2.0 µm, less than any leukocyte" in bad["speck.png"]
    ok = [x for x in rows if "label" in x]
    assert len(ok) == 4
    for x in ok:
        assert abs(sum(x["probabilities"].values()) - 1) < 1e-3
    # load_crops keeps going past a corrupt file too.
    data = load_crops([Sample(str(tmp_path / "corrupt.jpg"), "lymphocyte", 0.1)] + good,
                      config.classes.model_names, config.train.um_per_px, size=CACHE_SIZE, threads=1)
    assert len(data.labels) == 4 and len(data.problems) == 1


def test_eval_classify_scores_a_tree_and_reports_an_unknown_class(tmp_path, config):
    from pipeline.evaluate_classifier import evaluate_folder

    root = tmp_path / "tree"
    for lab in ("eosinophil", "lymphocyte", "plasma_cell"):
        (root / lab).mkdir(parents=True)
        src = "lymphocyte" if lab == "plasma_cell" else lab
        for s in _samples([src], 3):
            shutil.copy(s.path, root / lab / Path(s.path).name)
    (root / "eosinophil" / "broken.png").write_bytes(b"not a png")
    res = evaluate_folder(SHIPPED, root, PBC_UM_PER_PX, config.classes, params=config.classifier)
    assert res["summary"]["n"] == 6
    assert any("plasma_cell" in p for p in res["problems"])
    assert any("broken.png" in p for p in res["problems"])
    cm = np.array(res["dual"]["confusion"])
    assert cm.sum() == 6


def test_coarse_scoring_merges_band_and_segmented(tmp_path, config):
    from pipeline.evaluate_classifier import evaluate_folder

    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["image,label"]
    for i, s in enumerate(_samples(["band_neutrophil", "segmented_neutrophil", "eosinophil"], 3)):
        name = f"{i + 1:03d}.jpg"
        shutil.copy(s.path, flat / name)
        rows.append(f"{i + 1},{1 if 'neutrophil' in s.label else 4}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    names = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
    res = evaluate_folder(SHIPPED, flat, PBC_UM_PER_PX, config.classes,
                          labels_csv=tmp_path / "labels.csv", label_names=names, coarse=True,
                          params=config.classifier)
    assert res["summary"]["n"] == 9
    per = res["dual"]["per_class"]
    assert per["neutrophil"]["n"] == 6 and per["eosinophil"]["n"] == 3


def _bccd_samples(config, names: set[str]) -> list[Sample]:
    """The configured BCCD source's samples (labels already renamed) of the given labels."""
    src = next(s for s in config.train.sources if s.kind == "voc")
    return [s for s in read_source(src, REPO, config.train.seed) if s.label in names]


def test_white_cells_of_unknown_type_keep_the_real_classes_split(config):
    """Adding BCCD white cells as ANY_LEUKOCYTE gives them the last label and leaves the test
    split of every real class as it was: a model fine-tuned after the change was never
    trained on the old test cells."""
    samples = []
    for i, src in enumerate(config.train.sources):
        samples += read_source(src, REPO, config.train.seed + i)
    index = label_index(config.classes.model_names)
    labels = np.array([index[s.label] for s in samples])
    k = len(config.classes.model_names)
    wbc = labels == k
    assert wbc.sum() > 300 and {s.label for s in np.array(samples, object)[wbc]} == {ANY_LEUKOCYTE}
    new = split(labels, config.train.seed, config.train.val_fraction)
    old = split(labels[~wbc], config.train.seed, config.train.val_fraction)
    kept = np.flatnonzero(~wbc)
    for part in ("train", "val", "test"):
        assert np.array_equal(np.sort(new[part][~wbc[new[part]]]), kept[old[part]]), part
    assert 0 < wbc[new["test"]].sum() < wbc.sum() / 4
    with pytest.raises(DatasetError, match="reserved"):
        label_index(["lymphocyte", ANY_LEUKOCYTE])


def test_set_loss_is_cross_entropy_for_one_class_and_spares_the_type_of_a_white_cell():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], requires_grad=True)
    one = targets(np.array([0, 2]), 3)
    assert torch.allclose(set_nll(logits, one),
                          torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])))
    # Label 3 = "some counted class" (0 or 1, not class 2 = non-leukocyte).
    allowed = targets(np.array([3, 3]), 3, np.array([True, True, False]))
    loss = set_nll(logits, allowed)
    p = torch.softmax(logits, 1)
    assert torch.allclose(loss, -torch.log(p[:, :2].sum(1)).mean())
    loss.backward()
    g = logits.grad
    assert (g[:, 2] > 0).all() and (g[:, :2] < 0).all()  # only away from non-leukocyte
    with pytest.raises(ValueError, match="counted classes"):
        targets(np.array([3]), 3)


def test_white_cells_of_unknown_type_stop_a_second_source_reading_as_non_leukocyte(config,
                                                                                     tmp_path):
    """Trained with BCCD red cells as its only non-leukocytes, a model learns the BCCD look as
    "not a white cell" and calls held-out BCCD white cells non-leukocyte; BCCD white cells
    labelled ANY_LEUKOCYTE in training stop that."""
    classes = ["lymphocyte", "segmented_neutrophil", "non_leukocyte"]
    rbc = _bccd_samples(config, {"non_leukocyte"})[::6][:40]
    wbc = _bccd_samples(config, {ANY_LEUKOCYTE})
    seen, held_out = wbc[:200:5], wbc[200::4]
    base = _samples(classes[:2], 40) + rbc
    p = config.train.model_copy(update={
        "epochs": 6, "width": 0.125, "fc": 32, "per_class": 0, "augment": False,
        "conv_dropout": 0.0, "fc_dropout": 0.0, "lr": 0.02, "batch_size": 16,
        "local_pairs": (), "val_fraction": 0.2})
    test = centre(load_crops(held_out, classes, p.um_per_px, threads=1).crops)
    rates = {}
    for name, samples in (("without", base), ("with", base + seen)):
        data = load_crops(samples, classes, p.um_per_px, threads=1)
        torch.manual_seed(0)
        res = train_classifier(data, classes, p, taxonomy="tiny", data_hash="test", threads=1,
                               counted=classes[:2])
        path = tmp_path / f"{name}.pt"
        save_checkpoint(res.checkpoint, path)
        pred = load_classifier(path).global_logits(test)
        rates[name] = float((pred.argmax(1) == 2).mean())
    assert rates["without"] > 0.5 and rates["with"] < 0.2, rates


def test_yuv_statistics_hold_at_training_split_size(fixed_sample):
    """Repeating real crops 50 times leaves the per-channel statistics unchanged: a float32
    sum over ~10^8 values per channel (a real training split) saturated and gave every channel
    the same wrong mean."""
    from pipeline.train import yuv_stats

    small = centre(fixed_sample.crops)
    mean, std = yuv_stats(small)
    big_mean, big_std = yuv_stats(np.repeat(small, 50, axis=0))
    np.testing.assert_allclose(big_mean, mean, rtol=1e-9)
    np.testing.assert_allclose(big_std, std, rtol=1e-6)
    assert 120 < mean[0] < 240 and abs(mean[1] - 128) < 30 and abs(mean[2] - 128) < 30


def test_zero_epochs_keeps_the_initial_global_model_and_trains_its_local_models(tiny):
    """``train.epochs: 0`` with --init: the global weights and normalisation are the initial
    checkpoint's, bit for bit; only the local model trains (a lab adding a pair)."""
    from pipeline.classify import read_checkpoint
    from pipeline.classifier_params import TrainParams

    res, path, data, classes = tiny
    init = read_checkpoint(path)
    p = TrainParams.model_validate(res.checkpoint["params"]).model_copy(update={"epochs": 0})
    out = train_classifier(data, classes, p, taxonomy="tiny", data_hash="test", threads=1,
                           init=init)
    for key, value in init["state"].items():
        assert torch.equal(out.checkpoint["state"][key], value), key
    assert out.checkpoint["yuv_mean"] == list(init["yuv_mean"])
    assert [h.stage for h in out.history] == ["local band_neutrophil/segmented_neutrophil"]
    with pytest.raises(ConfigError, match="--init"):
        train_classifier(data, classes, p, taxonomy="tiny", data_hash="test", threads=1)


def test_a_local_model_sharing_the_body_gives_the_logits_it_was_trained_with(tiny, config):
    """A pair not in train.local_own_body keeps the global body frozen (its batch
    norm too), stores only its FC layers, and at inference runs on the global body's output:
    the loaded classifier's local logits equal those of the trained local network."""
    from pipeline.model import build
    from pipeline.train import predict_logits

    res, path, data, classes = tiny
    ck = res.checkpoint
    (loc,) = ck["local"]
    assert loc["shares_body"] and not any(k.startswith("body.") for k in loc["state"])
    full = build(2, ck["width"], ck["fc"], 0.0, 0.0)
    body = {k: v.float() for k, v in ck["state"].items() if k.startswith("body.")}
    full.load_state_dict({**body, **{k: v.float() for k, v in loc["state"].items()}})
    crops = centre(data.crops[:12])
    want = predict_logits(full, crops, np.array(ck["yuv_mean"]), np.array(ck["yuv_std"]))
    clf = load_classifier(path)
    (local,) = clf.locals
    x = clf._prep(crops)
    got = clf._local_logits(local, x, clf._run(clf.model, x)[2])
    torch.testing.assert_close(got, want, atol=0.08, rtol=0.05)  # bf16 paths on both sides


def test_a_lab_retrains_on_its_own_folder_tree_from_the_command_line(tmp_path):
    """The lab path end to end through the CLI: its own taxonomy, a folder per class plus a
    `leukocyte` folder of untyped white cells, `train`, then `eval-classify` and `classify`
    with the lab config."""
    from typer.testing import CliRunner

    from daemon.cli import app

    crops = tmp_path / "crops"
    folders = {"eosinophil": "eosinophil", "lymphocyte": "lymphocyte",
               "segmented_neutrophil": "segmented_neutrophil", "non_leukocyte": "platelet",
               ANY_LEUKOCYTE: "monocyte"}
    for folder, label in folders.items():
        (crops / folder).mkdir(parents=True)
        for s in _samples([label], 12, offset=3):
            shutil.copy(s.path, crops / folder / Path(s.path).name)
    model = tmp_path / "lab.pt"
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"""taxonomy: lab4
taxonomies:
  lab4:
    - {{name: eosinophil, label: Eosinophil, lineage: myeloid, blast: false, key: "1"}}
    - {{name: lymphocyte, label: Lymphocyte, lineage: lymphoid, blast: false, key: "2"}}
    - {{name: segmented_neutrophil, label: Segmented, lineage: myeloid, blast: false, key: "3"}}
    - {{name: non_leukocyte, label: Not a leukocyte, lineage: non_leukocyte, blast: false, key: x}}
classifier: {{checkpoint: {model}}}
train:
  epochs: 2
  width: 0.125
  fc: 32
  per_class: 0
  augment: false
  batch_size: 16
  val_fraction: 0.2
  local_pairs: []
  local_own_body: []
  sources:
    - {{kind: folder, path: {crops}, um_per_px: 0.1, exclude: [], rename: {{}},
       max_per_label: 0, background_per_image: 0, train_only: false}}
""")
    runner = CliRunner()
    report = tmp_path / "report.json"
    r = runner.invoke(app, ["train", "--config", str(lab), "--out", str(model),
                            "--report", str(report), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "60 crops, 4 classes" in r.output
    rep = json.loads(report.read_text())
    assert rep["summary"]["n_test"] == 8 and rep["any_leukocyte"]["n"] == 2
    ck = torch.load(model, weights_only=True)
    assert ck["classes"] == ["eosinophil", "lymphocyte", "segmented_neutrophil", "non_leukocyte"]
    r = runner.invoke(app, ["eval-classify", "--config", str(lab), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["n_test"] == 8
    one = next((crops / "lymphocyte").iterdir())
    r = runner.invoke(app, ["classify", str(one), "--um-per-px", "0.1", "--json",
                            "--config", str(lab)])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert set(row["probabilities"]) == set(ck["classes"])
    # The trained checkpoint runs int8; `quantize` gives one without int8 state (written
    # before it existed) the same state back from the lab's training cells.
    assert 0 < ck["int8"]["calibration_cells"] < 60 - 10  # training cells only
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in ck.items() if k != "int8"}, old)
    r = runner.invoke(app, ["quantize", "--config", str(lab), "--checkpoint", str(old)])
    assert r.exit_code == 0, r.output
    assert "int8 state from" in r.output and "agree on" in r.output
    again = torch.load(old, weights_only=True)
    assert set(again["int8"]) == {"global", "local", "calibration_cells"}
    assert load_classifier(old).precision == "int8"
    # A checkpoint from before the DICE detector: the configured method is refused by name
    # until `fit-unknown` adds it from the lab's own cells, weights untouched.
    legacy = {**again, "unknown": {k: v for k, v in again["unknown"].items()
                                   if not k.startswith("dice")}}
    torch.save(legacy, old)
    r = runner.invoke(app, ["classify", str(one), "--um-per-px", "0.1", "--json",
                            "--config", str(lab), "--checkpoint", str(old)])
    # (the `marrowcount` entry point prints a CheckpointError as one line and exits 2)
    assert isinstance(r.exception, CheckpointError) and "fit-unknown" in str(r.exception)
    r = runner.invoke(app, ["fit-unknown", "--config", str(lab), "--checkpoint", str(old)])
    assert r.exit_code == 0, r.output
    assert "dice" in r.output
    fitted = torch.load(old, weights_only=True)
    assert all(torch.equal(fitted["state"][k], v) for k, v in legacy["state"].items())
    r = runner.invoke(app, ["classify", str(one), "--um-per-px", "0.1", "--json",
                            "--config", str(lab), "--checkpoint", str(old)])
    assert r.exit_code == 0, r.output


def test_too_few_cells_of_a_class_or_pair_is_refused_by_name(config):
    """A lab's first small export: a class without training cells, or a local pair without
    validation cells, is named before any training (it would fit NaN statistics)."""
    from pipeline.datasets import DatasetError

    classes = ["eosinophil", "lymphocyte", "band_neutrophil", "segmented_neutrophil"]
    per = {"eosinophil": 12, "lymphocyte": 12, "band_neutrophil": 1, "segmented_neutrophil": 12}
    samples = [s for c, n in per.items() for s in _samples([c], n)]
    data = load_crops(samples, classes, config.train.um_per_px, threads=1)
    p = config.train.model_copy(update={
        "epochs": 1, "width": 0.125, "fc": 32, "val_fraction": 0.2,
        "local_pairs": (("band_neutrophil", "segmented_neutrophil"),), "local_own_body": ()})
    with pytest.raises(DatasetError) as err:
        train_classifier(data, classes, p, taxonomy="t", data_hash="x", threads=1)
    msg = str(err.value)
    # The lone band cell lands in one split only: training or validation lacks it.
    assert "band_neutrophil 1" in msg and "about 12 cells" in msg
    assert ("no training cells of band_neutrophil" in msg
            or "band_neutrophil/segmented_neutrophil lack validation cells" in msg)
    without = [s for s in samples if s.label != "lymphocyte"]
    data = load_crops(without, classes, config.train.um_per_px, threads=1)
    with pytest.raises(DatasetError, match="no training cells of lymphocyte"):
        train_classifier(data, classes, p.model_copy(update={"local_pairs": ()}),
                         taxonomy="t", data_hash="x", threads=1)


def test_fit_unknown_refits_every_detector_at_the_configured_rate(tiny):
    """``marrowcount fit-unknown``: the weights stay; each method's threshold flags the
    configured share of the known validation cells; DICE keeps its share of the output
    weights; a checkpoint without a DICE detector is refused by name, not scored wrongly."""
    from pipeline.classify import DICE_KEEP, Classifier, read_checkpoint
    from pipeline.classifier_params import TrainParams
    from pipeline.train import refit_unknown

    res, path, data, classes = tiny
    rate = 0.25
    p = TrainParams.model_validate(res.checkpoint["params"]).model_copy(
        update={"unknown_false_flag_rate": rate})
    old = read_checkpoint(path)
    new = refit_unknown(old, data, p)
    for key, value in old["state"].items():
        assert torch.equal(new["state"][key], value), key
    w = new["unknown"]["dice_weight"]
    assert w.shape == old["state"]["head.weight"].shape
    assert int((w != 0).sum()) == round(DICE_KEEP * w.numel())
    val = res.split["val"]
    crops = centre(data.crops[val[data.labels[val] < len(classes)]])
    assert len(crops) >= 16
    for method in ("mahalanobis", "msp", "energy", "dice"):
        share = Classifier(new, path, unknown_method=method, precision="bf16").classify(
            crops).unknown.mean()
        assert abs(share - rate) <= 0.1, (method, share)
    legacy = {**old, "unknown": {k: v for k, v in old["unknown"].items()
                                 if not k.startswith("dice")}}
    with pytest.raises(CheckpointError, match="fit-unknown"):
        Classifier(legacy, path, unknown_method="dice")
    assert not Classifier(legacy, path, unknown_method="dice", flag_unknown=False).classify(
        crops).unknown.any()


def test_the_model_card_names_the_shipped_files_hash():
    """A report's method line prints the model file's SHA-256; the card must be the one of
    that file (a retrained model shipped without a new card would be described wrongly)."""
    import hashlib

    card = (SHIPPED.parent / "MODEL_CARD.md").read_text()
    sha = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert f"File SHA-256 `{sha}`" in card and f"`{sha[:16]}`" in card
    assert "**Intended use and limitations**" in card and "not on\nmarrow aspirates" in card
