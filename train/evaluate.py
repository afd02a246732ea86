"""`ustudents evaluate` and `ustudents predict`: metrics on the category's test set, and verdicts,
masks and overlays for single images."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ustudents.engines.bundle import Bundle, BundleError, changing, load_bundle, locked, update_manifest
from ustudents.engines.files import listed_outputs, os_error_line, real_path, write_atomically
from ustudents.engines.frame_shapes import recalibrate_copy
from ustudents.engines.images import IMAGE_SUFFIXES, read_image
from ustudents.engines.overlay import heatmap_overlay
from ustudents.engines.runtime import Engine, frame_mask, map_to_frame, model_digest
from ustudents.engines.scoring import mask

from . import dataset
from .metrics import au_pro, image_auroc, pixel_auroc
from .progress import progress


def max_scores(maps: np.ndarray) -> np.ndarray:
    """The maximum of each anomaly map (N, H, W) -> (N,)."""
    return maps.reshape(len(maps), -1).max(axis=1)


def metrics_for(maps: np.ndarray, regions: np.ndarray, labels: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """image AUROC of `scores` (default: the maps' maxima), pixel AUROC and au_pro_30 of the maps
    against the ground truth's defect regions (dataset.load_regions)."""
    return {"image_auroc": image_auroc(max_scores(maps) if scores is None else scores, labels),
            "pixel_auroc": pixel_auroc(maps, regions),
            "au_pro_30": au_pro(maps, regions, fpr_limit=0.3, numbered=True)}


def at_threshold(predicted: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                 image_threshold: float, mask_threshold: float) -> dict:
    """What the bundle's thresholds do on the test set: image-level rates, and of the predicted masks
    (N, H, W) bool, pixel FPR and TPR and the share of defective images whose mask touches the defect."""
    flagged = np.asarray(scores, dtype=np.float64) >= image_threshold
    touched = (predicted & masks).reshape(len(masks), -1).any(1)
    return {"image_threshold": image_threshold, "mask_threshold": mask_threshold,
            "image_tpr": float(flagged[labels].mean()) if labels.any() else None,
            "image_fpr": float(flagged[~labels].mean()) if (~labels).any() else None,
            "pixel_fpr": float(predicted[~masks].mean()),
            "pixel_tpr": float(predicted[masks].mean()) if masks.any() else None,
            "defective_images_mask_on_defect": float(touched[labels].mean()) if labels.any() else None}


def engine_maps(engine: Engine, images: np.ndarray, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, S, S, 3) -> fused (N, S, S) and per-scale (N, n_scales, S, S) maps, float32."""
    fused, scales = [], []
    step = engine.max_batch
    for i in progress(range(0, len(images), step), desc=desc, unit="batch", leave=False, disable=desc is None):
        f, s = engine.maps(list(images[i:i + step]))
        fused.append(f.cpu().numpy())
        scales.append(s.cpu().numpy())
    return np.concatenate(fused), np.concatenate(scales)


def checked_for(bundle, data_root: Path, overlays: Path | None = None,
                samples: list[dataset.Sample] | None = None) -> tuple[list[dataset.Sample], np.ndarray, np.ndarray]:
    """The bundle's test set under DATA_ROOT (or `samples` of it), checked (dataset.checked_test_set), and
    the --overlays folder checked against it: before the engine loads and minutes of scoring, not after."""
    checked = dataset.checked_test_set(data_root, bundle.manifest["category"], bundle.image_size, samples)
    if overlays is not None:
        check_overlays(overlays, checked[0])
    return checked


def evaluate(engine: Engine, data_root: Path, overlays: Path | None = None, log=print,
             samples: list[dataset.Sample] | None = None, checked: tuple | None = None) -> dict:
    """Evaluate the engine's bundle on DATA_ROOT/<category>/test (or on `samples` of it, a subset a
    benchmark chose; `checked`: what checked_for returned, where the caller checked before loading the
    engine); returns the results and stores them in the bundle's manifest."""
    t0 = time.time()
    bundle = engine.bundle
    category, size = bundle.manifest["category"], bundle.image_size
    samples, labels, regions = checked or checked_for(bundle, data_root, overlays, samples)
    masks = regions > 0
    shapes: list[tuple[int, int]] = []
    images = dataset.load_images(samples, size, desc="loading test images", bits=bundle.uint16_bits, shapes=shapes)
    tested = dataset.fingerprint(samples)  # the files as they were read, not after the minutes of scoring
    known = bundle.frame_shapes
    unknown = [s.path for s, hw in zip(samples, shapes) if known is not None and not known.knows(*hw)]
    if unknown:  # scored all the same: the test set is the user's to choose, but a worker would not judge them
        log(f"WARNING: {len(unknown)} of the {len(samples)} test images (e.g. {unknown[0]}) are unlike every image "
            f"the model was trained and calibrated on ({known.describe()}); a worker dead-letters such frames "
            "(unexpected_shape): these results include them")
    fused, per_scale = engine_maps(engine, images, desc="evaluating")
    fused_t = torch.from_numpy(fused).to(engine.prep_device)
    scores_t = engine.image_scores(fused_t)
    scores, predicted = scores_t.cpu().numpy(), engine.masks(fused_t, scores_t).cpu().numpy()
    results = {"category": category, "bundle": bundle.manifest["id"], "test_images": len(samples),
               # what was scored: a test set whose images or masks changed gives other figures
               "data": {"root": str(Path(data_root).absolute()), "fingerprint": tested},
               "image_size": size, "image_score": bundle.image_score,
               "backend": engine.backend, "precision": engine.precision, "device": engine.describe(),
               **metrics_for(fused, regions, labels, scores)}
    if bundle.image_score != "max":
        # the single scales' image AUROC is of their maps' maxima (the position statistics are the
        # fused map's): this is the fused model's on the same footing
        results["image_auroc_of_max"] = image_auroc(max_scores(fused), labels)
    results["per_scale"] = {str(p): metrics_for(per_scale[:, k], regions, labels) for k, p in enumerate(bundle.scales)}
    good = ~labels
    results["per_defect"] = {}
    for defect in sorted({s.defect for s in samples} - {dataset.GOOD}):
        sel = good | np.array([s.defect == defect for s in samples])
        results["per_defect"][defect] = {"images": int((sel & labels).sum()),
                                         **metrics_for(fused[sel], regions[sel], labels[sel], scores[sel])}
    results["at_threshold"] = dict(at_threshold(predicted, scores, masks, labels, bundle.image_threshold,
                                                bundle.mask_threshold), mask_rule=bundle.mask_rule)
    results["wall_s"] = round(time.time() - t0, 1)
    if overlays is not None:
        try:
            write_overlays(overlays, samples, engine, fused_t, scores_t)
        except OSError as err:  # a full disk: the pictures are lost, not the evaluation that just ran
            log(f"overlays not all written ({os_error_line(err)}); the results follow")
    try:
        if not Path(bundle.path).stat().st_mode & 0o222:  # as calibrate and build-engines: root writes past it
            raise PermissionError("the bundle folder is read-only, chmod a-w")
        with changing(bundle.path):  # a calibrate meanwhile would be undone by the manifest read before it
            # retrained or recalibrated while this ran: these results are another model's
            if evaluated_model(load_bundle(bundle.path)) != evaluated_model(bundle):
                log(f"results not stored in {bundle.path}/manifest.json: the model there changed while it was "
                    "evaluated (retrained or recalibrated); evaluate it again for its own")
            else:
                update_manifest(bundle.path, evaluation=results)
    except OSError as err:  # a read-only bundle (a container's model mount): the results are still returned
        log(f"results not stored in {bundle.path}/manifest.json ({err.strerror or err})")
    except BundleError as err:  # another command holds it: storing is secondary, the results are returned
        log(f"results not stored in {bundle.path}/manifest.json ({err})")
    return results


def evaluated_model(bundle) -> tuple:
    """What evaluation results describe: what an engine bakes in (weights, statistics, size) and the
    thresholds the decisions were taken at."""
    return model_digest(bundle), bundle.manifest.get("threshold"), bundle.manifest.get("image_score")


OVERLAY_OUTPUTS = ".ustudents-overlays.json"  # the overlays evaluate wrote in its --overlays folder, in one list


def overlay_names(samples: list[dataset.Sample]) -> list[str]:
    return [f"{s.defect}/{s.path.stem}.png" for s in samples]


def check_overlays(folder: Path, samples: list[dataset.Sample]) -> None:
    """Refuse an --overlays folder holding a file an overlay would replace that an earlier evaluate did
    not write: <defect>/<stem>.png are the names of MVTec's own test images, so --overlays at a copy of
    the dataset's test folder replaced its images with heatmaps."""
    # a file (or a link to nothing) where a folder of overlays goes, or a folder where their list goes:
    # write_overlays failed on it after the whole test set was scored, and skipped the overlays
    for defect in sorted({s.defect for s in samples}):
        path = folder / defect
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise ValueError(f"--overlays {folder}: {path} is {'a file' if path.exists() else 'a link to nothing'}, "
                             f"where the overlays of the {defect!r} test images go in a folder; move it, or give "
                             "another --overlays folder")
    if (folder / OVERLAY_OUTPUTS).is_dir():
        raise ValueError(f"--overlays {folder}: {folder / OVERLAY_OUTPUTS} is a folder, where evaluate lists the "
                         "overlays it writes; move it, or give another --overlays folder")
    earlier = listed_outputs(folder / OVERLAY_OUTPUTS)
    for name in overlay_names(samples):
        path = folder / name
        if (path.exists() or path.is_symlink()) and name not in earlier:
            raise ValueError(f"--overlays {folder}: holds {name}, which an overlay would replace and no earlier "
                             f"`ustudents evaluate` listed in {OVERLAY_OUTPUTS} there; give an empty --overlays "
                             "folder or one an earlier evaluate wrote (overlays from before that list: empty the "
                             "folder first)")


def write_overlays(folder: Path, samples: list[dataset.Sample], engine: Engine, fused: torch.Tensor,
                   scores: torch.Tensor) -> None:
    """<folder>/<defect>/<stem>.png: each test image with what its mask thresholds and its mask, at the
    image's own size (as `ustudents predict` draws them)."""
    levels, verdicts = engine.mask_levels(fused), engine.verdicts(scores)
    folder.mkdir(parents=True, exist_ok=True)
    # one evaluate at a time writes there: each removes what it did not write, the other's overlays too
    with locked(folder, f"--overlays {folder}: another `ustudents evaluate` is writing overlays there; waiting "
                        "for it to finish", wait=True):
        _write_overlays(folder, samples, engine, levels, verdicts)


def _write_overlays(folder: Path, samples: list[dataset.Sample], engine: Engine, levels, verdicts) -> None:
    """write_overlays' writing, once it holds the folder."""
    earlier, own = listed_outputs(folder / OVERLAY_OUTPUTS), set(overlay_names(samples))
    # listed before the first is written: a run stopped part-way must be allowed to replace its own
    write_json(folder / OVERLAY_OUTPUTS, sorted(earlier | own))
    for s, level, flagged in zip(samples, levels, verdicts):
        frame = read_image(s.path, engine.bundle.uint16_bits)
        full = map_to_frame(level, frame.shape[:2])
        model_mask = mask(level[None], engine.mask_threshold, engine.mask_rule, flagged[None])[0]
        over = frame_mask(full, model_mask, engine.mask_threshold, engine.mask_rule, flagged)
        out = folder / s.defect / f"{s.path.stem}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_png(out, heatmap_overlay(frame, full.cpu().numpy(), engine.mask_threshold, over.cpu().numpy()))
    # the folder holds this run's overlays alone: an earlier run's of images no longer in the test set
    # (or of another model) stayed beside them, read as this run's
    home = real_path(folder)
    for name in sorted(earlier - own):
        path = folder / name
        # only what evaluate writes, <type>/<stem>.png in this folder: not a name an edited list holds
        # (absolute, '..'), nor one through a <type> folder that links elsewhere
        if (Path(name).is_absolute() or len(Path(name).parts) != 2 or not name.endswith(".png")
                or ".." in Path(name).parts or real_path(path.parent).parent != home):
            continue
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # a type the test set no longer has, now empty
        except OSError:
            pass  # holds other overlays, or files of the user's
    write_json(folder / OVERLAY_OUTPUTS, sorted(own))


def format_table(results: dict) -> str:
    """The evaluation as a fixed-width text table: fused, each scale, each defect type."""
    rows = [("fused", results)] + [(f"p={p}", r) for p, r in results["per_scale"].items()] + \
           [(d, r) for d, r in results["per_defect"].items()]
    lines = [f"{'':<12}{'image_auroc':>12}{'pixel_auroc':>12}{'au_pro_30':>11}"]
    for name, r in rows:
        lines.append(f"{name:<12}{r['image_auroc']:>12.3f}{r['pixel_auroc']:>12.3f}{r['au_pro_30']:>11.3f}")
    if "image_auroc_of_max" in results:
        lines.append(f"image score {results['image_score']}; with the fused map's maximum instead: image_auroc "
                     f"{results['image_auroc_of_max']:.3f}")
    t = results["at_threshold"]
    lines.append(f"at image threshold {t['image_threshold']:.3f}: image TPR {t['image_tpr']:.3f}, image FPR "
                 f"{t['image_fpr']:.3f}; masks ({t['mask_rule']} rule, threshold {t['mask_threshold']:.3f}): "
                 f"pixel FPR {t['pixel_fpr']:.4f}, TPR {_share(t['pixel_tpr'], '.3f')}, on the defect in "
                 f"{_share(t['defective_images_mask_on_defect'], '.0%')} of defective images")
    return "\n".join(lines)


def _share(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


@dataclass
class PredictPlan:
    """What predict writes, checked before any work: the images' output names, the images by their
    real paths (none may be replaced), and the outputs an earlier predict listed in `out`."""
    paths: list[Path]
    out: Path
    names: list[str]
    inputs: dict[Path, Path]
    earlier: set[str]


def plan_predict(paths: list[Path], out: Path, bundle: Bundle) -> PredictPlan:
    """predict's checks, needing no engine, so that the command makes them before it loads one (a
    TensorRT plan, or a large bundle, took its time before a typo in a file name was told): every image
    decodes and has a shape the model knows (as a worker checks each frame), and `out` is a folder its
    outputs may go to."""
    dataset.refuse_inside(out, "--out", "an --out folder")  # test/predictions became a defect type without masks
    shapes = bundle.frame_shapes
    for p in paths:
        image = read_image(p, bundle.uint16_bits)
        if shapes is not None:
            shapes.check(image, str(p), f"recalibrate a copy of the model on good ones ({recalibrate_copy(bundle.path)})")
    names = [p.stem for p in paths]
    if len(set(names)) < len(names):  # e.g. good/000.png and crack/000.png: keep every output apart
        names = [f"{i:04d}_{p.parent.name}_{p.stem}" for i, p in enumerate(paths)]
    inputs = {real_path(p): p for p in paths}
    earlier = earlier_predictions(out)
    for written in [out / "results.json"] + [out / f"{n}_{kind}.png" for n in names for kind in ("mask", "overlay")]:
        if real_path(written) in inputs:  # --out = the images' folder, holding an image named like an output
            raise ValueError(f"--out {out}: writing {written.name} would replace the input image "
                             f"{inputs[real_path(written)]}; give an --out folder apart from the images")
        # a file of the same name that an earlier predict did not write: MVTec's ground truth is named
        # <stem>_mask.png too, and --out its folder replaced the masks with predictions
        if (written.exists() or written.is_symlink()) and written.name not in earlier:
            raise ValueError(f"--out {out}: holds {written.name}, which this command would replace and an earlier "
                             "`ustudents predict` did not write (it is not in results.json there); give an empty "
                             "--out folder or one an earlier predict wrote")
    # images of the user's there (a dataset's train/good): masks and overlays put beside them would be
    # read with them, e.g. trained on as good images
    theirs = sorted(f.name for f in (out.iterdir() if out.is_dir() else ())
                    if f.suffix.lower() in IMAGE_SUFFIXES and f.name not in earlier)
    if theirs:
        shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise ValueError(f"--out {out}: holds images an earlier `ustudents predict` did not write ({shown}); masks "
                         "and overlays written beside them would mix with them (in a dataset's folder, be read as "
                         "its images); give an empty --out folder or one an earlier predict wrote")
    return PredictPlan(list(paths), out, names, inputs, earlier)


def predict(engine: Engine, plan: PredictPlan, on_result=lambda r: None, on_stop=lambda done: None) -> list[dict]:
    """Score the images of `plan` (plan_predict); write <out>/<stem>_mask.png, <stem>_overlay.png and
    results.json (names are prefixed with index and folder when two images share a file name);
    `on_result` sees each image's record as it is written, `on_stop` how many were done where the run
    stops part-way (Ctrl-C, a full disk, any error), which leaves no results.json (unless the stop came
    as it was written: a signal is taken after the rename that put it in place). An earlier predict's
    outputs in `out` are replaced: at the end `out` holds this run's alone. One run at a time per `out`.

    Every image was decoded once by plan_predict before anything is written, so a bad one among
    thousands leaves no partial output; they are scored a batch at a time, so memory holds one batch
    of frames and maps, not the whole set (5-megapixel frames and their float maps add up to GBs)."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    # one run at a time: two wrote each other's masks under one name, and the first's results.json was lost
    with locked(out, f"--out {out}: another `ustudents predict` is writing there now; wait for it to finish, or "
                     "give another --out"):
        return _predict(engine, plan.paths, plan.names, out, plan.earlier, plan.inputs, on_result, on_stop)


def _predict(engine: Engine, paths: list[Path], names: list[str], out: Path, earlier: set[str],
             inputs: dict[Path, Path], on_result, on_stop) -> list[dict]:
    """predict's writing, once its checks passed and it holds `out`."""
    bundle = engine.bundle
    # listed before the first is written: a run stopped part-way (Ctrl-C, a full disk) leaves outputs that
    # its results.json, written last, does not name, and the run again must be allowed to replace them
    own = {f"{n}_{kind}.png" for n in names for kind in ("mask", "overlay")}
    write_json(out / PREDICT_OUTPUTS, sorted(earlier | own))
    results = []
    try:
        # an earlier run's results.json goes before the first picture is replaced: left there by a run
        # stopped part-way, it named this run's new masks with the old run's scores and verdicts
        (out / "results.json").unlink(missing_ok=True)
        for start in range(0, len(paths), engine.max_batch):
            batch = slice(start, start + engine.max_batch)
            frames = [read_image(p, bundle.uint16_bits) for p in paths[batch]]
            for path, name, frame, pr in zip(paths[batch], names[batch], frames, engine.predict(frames)):
                mask_file = out / f"{name}_mask.png"
                overlay_file = out / f"{name}_overlay.png"
                write_png(mask_file, pr.mask.astype(np.uint8) * 255)
                write_png(overlay_file, heatmap_overlay(frame, pr.mask_level, bundle.mask_threshold, pr.mask))
                results.append({"image": str(path), "score": pr.score, "anomalous": bool(pr.anomalous),
                                "threshold": bundle.image_threshold, "mask_threshold": bundle.mask_threshold,
                                "mask": str(mask_file), "overlay": str(overlay_file),
                                "model": bundle.manifest["id"], "engine": engine.describe()})
                on_result(results[-1])
        write_json(out / "results.json", results)
    except BaseException:
        on_stop(len(results))
        raise
    # --out holds this run's results alone: an earlier run's masks and overlays left beside them, which
    # results.json no longer names, would read as this run's
    for name in sorted(earlier - own - {"results.json"}):
        if real_path(out / name) not in inputs:
            (out / name).unlink(missing_ok=True)
    write_json(out / PREDICT_OUTPUTS, sorted(own))
    return results


PREDICT_OUTPUTS = ".ustudents-predict.json"  # the names of the files predict writes in its --out, in one list


def earlier_predictions(out: Path) -> set[str]:
    """Names of the files earlier predicts wrote in `out`, which a new one may replace: those its
    list (PREDICT_OUTPUTS) or its results.json name; empty where neither is there."""
    names = listed_outputs(out / PREDICT_OUTPUTS)
    try:
        records = json.loads((out / "results.json").read_text())
        names |= {Path(r[kind]).name for r in records for kind in ("mask", "overlay")} | {"results.json"}
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return names


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a PNG atomically (temporary file + rename); RGB arrays are converted for OpenCV."""
    ok, data = cv2.imencode(".png", image[:, :, ::-1] if image.ndim == 3 else image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_atomically(path, data.tobytes())


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(obj, indent=2) + "\n")
