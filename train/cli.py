"""Command-line commands of the training room: teacher, train, calibrate, evaluate, predict.

Every expected failure (bad folder, unreadable image, damaged bundle, bad option) becomes one line
naming the file and the fix, with exit code 2; tracebacks are left for bugs.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
from pathlib import Path

import click
import torch

from ustudents.engines.bundle import (BundleError, check_replaceable, check_writable, load_bundle, locked,
                                      manifest_on_disk, rewrite_bundle, write_bundle)
from ustudents.engines.cli import (CONTEXT_SETTINGS, InputError, PathArg, changing_bundle, check_apart, check_output,
                                   check_outside_bundles, device_form, engine_options, not_empty,
                                   stop_signals_as_ctrl_c, user_errors_for)
from ustudents.engines.files import real_path
from ustudents.engines.frame_shapes import FrameShapes
from ustudents.engines.images import (IMAGE_SUFFIXES, ImageError, image_files, is_image_file, missing_folder_hint,
                                     subfolder_hint)
from ustudents.engines.runtime import EngineError, default_torch_precision, native_bf16, resolve_device
from ustudents.engines.patchnet import SCALES

from .backbones import BACKBONES, BackboneError
from .calibrate import DEFAULT_IMAGE_FPR, DEFAULT_TARGET_FPR, CalibrationError
from .dataset import DatasetError
from .teacher import SCHEDULES, TARGETS, TeacherConfig, TeacherError
from .teacher_images import POOL_IMAGES, POOL_REFRESH, SKIMAGE_SOURCE
from .teacher_files import DEFAULT_DIR, TeacherFileError, load_teachers

INPUT_ERRORS = (DatasetError, BundleError, ImageError, BackboneError, CalibrationError, TeacherError,
                TeacherFileError, EngineError, ValueError, OSError)


user_errors = user_errors_for(INPUT_ERRORS)


def parse_scales(ctx, param, value: str) -> list[int]:
    try:
        items = value.split(",")
        if len(items) > 1 and not all(s.strip() for s in items):  # "17,,33": a scale left out by a slip?
            raise ValueError
        given = [int(s) for s in items if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give receptive fields separated by commas, e.g. 17,33,65") from None
    if not given or any(p not in SCALES for p in given):
        raise click.BadParameter(f"{value!r}: each scale must be one of {','.join(map(str, SCALES))}")
    twice = sorted({p for p in given if given.count(p) > 1})
    if twice:  # a slip for another scale (17,17 for 17,33): training fewer scales than meant would go unnoticed
        raise click.BadParameter(f"{value!r}: {', '.join(map(str, twice))} given more than once; name each scale "
                                 "once, e.g. 17,33,65")
    return sorted(given)


def parse_ints(ctx, param, value: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(s) for s in value.split(",") if s.strip()}))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give whole numbers separated by commas, e.g. 8,16") from None


def resolve_amp(amp: str, device: torch.device) -> bool:
    return native_bf16(device) if amp == "auto" else amp == "on"


scales_option = click.option("--scales", default="17,33,65", show_default=True, callback=parse_scales,
                             metavar="P[,P...]", help="Receptive fields p of the scales, separated by commas: any of 17, 33, 65.")
device_option = click.option("--device", default="auto", show_default=True, callback=device_form,
                             help="auto, cpu, cuda or cuda:N; auto = cuda when PyTorch sees a GPU, else cpu.")
amp_option = click.option("--amp", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                          help="bfloat16 autocast for training passes; auto = on where the CPU/GPU has native "
                               "bfloat16. Targets, statistics and scores stay float32.")


def check_json_replaceable(path: Path | None) -> None:
    """`evaluate --json` replaces an earlier evaluation's results, never another file: it wrote over
    another bundle's manifest.json, a teachers.json, an image (found in an audit)."""
    if path is None or not path.is_file():
        return
    earlier = None
    if path.stat().st_size < 2 ** 24:  # results are kilobytes; an image or a video is not read whole
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            pass
    if not (isinstance(earlier, dict) and {"bundle", "test_images", "image_auroc", "per_scale"} <= earlier.keys()):
        raise InputError(f"--json {path}: holds a file that is not an earlier `ustudents evaluate` result, which "
                         "this command would replace; give a new file name or move that file away")


def evaluate_command(model: Path, data_root: Path) -> str:
    """The `ustudents evaluate` command for a written model, quoted to paste."""
    return f"`ustudents evaluate {shlex.quote(str(model))} --data-root {shlex.quote(str(data_root))}`"


@click.command("train", short_help="Train and calibrate a model of CATEGORY.")
@click.argument("category")
@click.option("--data-root", type=PathArg(path_type=Path), required=True,
              help="MVTec AD root: DIR/CATEGORY/train/good, DIR/CATEGORY/test/<type>, DIR/CATEGORY/ground_truth.")
@click.option("--out", type=PathArg(path_type=Path), default=None,
              help="Bundle directory to write.  [default: models/CATEGORY]")
@scales_option
@click.option("--students", default=3, show_default=True, help="M, students per scale (2 to 16).")
@click.option("--epochs", default=100, show_default=True, help="Passes over the training images (paper: 100).")
@click.option("--image-size", default=256, show_default=True, help="Images are resized to this square side (64 to 1024).")
@device_option
@click.option("--seed", default=0, show_default=True, help="Seeds initialization, crops and the validation split.")
@click.option("--batch", default=1, show_default=True, help="Images per student step (paper: 1).")
@click.option("--lr", default=1e-4, show_default=True, help="Adam learning rate (paper: 1e-4).")
@click.option("--weight-decay", default=1e-5, show_default=True, help="Adam weight decay (paper: 1e-5).")
@click.option("--max-minutes", default=0.0, show_default=True,
              help="Limit on student training over all scales, in minutes (0 = none): each scale stops after "
                   "the last epoch that fits its share, so a slow machine trains fewer epochs.")
@click.option("--crop", default=0, show_default=True,
              help="Train on random CROP x CROP windows of the dense output instead of whole images (CPU economy); 0, or the "
                   "image size and more, = whole images.")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="Share of train/good held out for calibration (never the test set).")
@click.option("--target-fpr", default=DEFAULT_TARGET_FPR, show_default=True,
              help="Mask threshold: the share of validation pixels allowed above it.")
@click.option("--image-fpr", default=DEFAULT_IMAGE_FPR, show_default=True,
              help="Image threshold: the share of good images flagged anomalous (position score; README: Scores).")
@click.option("--teachers", type=PathArg(path_type=Path), default=DEFAULT_DIR, show_default=False,
              help="Folder of teacher_p<P>.safetensors.  [default: the shipped teachers]")
@amp_option
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Evaluate on the category's test set afterwards (stored in the manifest).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the checkpoint an interrupted run with the same settings and data left beside "
                   "--out; --no-resume starts over.")
@user_errors
def train_cmd(category, data_root, out, scales, students, epochs, image_size, device, seed, batch, lr,
              weight_decay, max_minutes, crop, val_fraction, target_fpr, image_fpr, teachers, amp, evaluate, resume):
    """Train the student ensembles of CATEGORY and write a calibrated model bundle.

    Interrupted (Ctrl-C, a crash), the same command continues where the students' training stopped."""
    from .evaluate import evaluate as run_evaluation, format_table
    from . import checkpoints
    from .dataset import checked_test_set, train_samples
    from .pipeline import TrainConfig, TrainingInterrupted, check_config, train
    from .students import StudentConfig

    # The inputs in the order a user reads the command: CATEGORY and --data-root first, so that every
    # later message names real folders; then the options; then --out; then the test set.
    train_samples(data_root, category)
    dev = resolve_device(device)
    out = out or Path("models") / category
    if out.name in ("", ".", ".."):  # it went through training, then failed, its work folders made inside it
        raise InputError(f"--out {out}: names no folder of its own (a bundle replaces its folder whole, and its "
                         "work folders go beside it); give the bundle's folder, e.g. --out ./"
                         f"{category.strip('/') or 'model'}-model")
    cfg = TrainConfig(category=category, data_root=data_root, out=out, scales=scales, image_size=image_size,
                      val_fraction=val_fraction, target_fpr=target_fpr, image_fpr=image_fpr, teachers=teachers,
                      device=str(dev),
                      student=StudentConfig(students=students, epochs=epochs, batch=batch, lr=lr,
                                            weight_decay=weight_decay, crop=crop, amp=resolve_amp(amp, dev), seed=seed,
                                            max_minutes=max_minutes), resume=resume)
    check_config(cfg)
    check_output(out, "--out", folder=True, link_to_make=True)
    check_replaceable(out)
    if out.is_symlink() and not out.exists():  # a plant's `current` link to the next version, or a share not mounted
        click.echo(f"--out {out}: a symbolic link to {os.readlink(out)}, which does not exist yet: the bundle is made "
                   "there (if that is a share, make sure it is mounted)")
    check_apart(out, "--out", Path(data_root) / category, "the category's images")
    check_outside_bundles(out, "--out", replaces_itself=True)
    check_writable(out)  # these are cheap: before the test set is read
    load_teachers(teachers, scales)
    checkpoints.check_free(checkpoints.folder_for(out), out)
    test_dir = Path(data_root) / category / "test"
    if evaluate and not test_dir.exists():
        # a plant may have good images only: the model is still worth training
        click.echo(f"{test_dir}: not found{missing_folder_hint(test_dir)}, so the model will not be evaluated (add "
                   "test/<type>/ images and ground_truth/<type>/ masks to evaluate it)")
        evaluate = False
    if evaluate:
        try:  # every test image and mask found and read now, not after hours of training
            checked_test_set(data_root, category, image_size, every_image=True)
        except ValueError as err:
            raise InputError(f"{err} (or train without evaluating: --no-evaluate)") from None
    try:
        with stop_signals_as_ctrl_c():
            path = train(cfg, log=click.echo)
    except TrainingInterrupted as stop:
        if stop.written is not None:
            click.echo(f"\ninterrupted after the model was written to {out}" + (
                f"; not evaluated: {evaluate_command(out, data_root)} does it" if evaluate else ""), err=True)
            raise SystemExit(130) from None
        how = "the same command" if resume else "the command without --no-resume"
        click.echo(f"\ninterrupted: no model written to {out}{stop.kept(how)}", err=True)
        raise SystemExit(130) from None
    if evaluate:
        from ustudents.engines.runtime import load_engine
        try:
            with stop_signals_as_ctrl_c():
                # the precision a worker here runs it in (calibrated bf16 only where bf16 is native)
                engine = load_engine(path, backend="torch", device=dev, precision=None)
                results = run_evaluation(engine, data_root, log=click.echo)
        except EngineError as err:  # the engine, not the test set
            raise InputError(f"{err} (the model is written to {path}; evaluate it with "
                             f"{evaluate_command(path, data_root)})") from None
        except (ValueError, OSError) as err:  # the test set; the model is written and fine
            raise InputError(f"{err} (the model is written to {path}: fix the test set, then run "
                             f"{evaluate_command(path, data_root)})") from None
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted while evaluating: the model is written to {path}; evaluate it with "
                       f"{evaluate_command(path, data_root)}", err=True)
            raise SystemExit(130) from None
        click.echo(format_table(results))


@click.command("teacher", short_help="Distil teacher networks from an ImageNet CNN.")
@scales_option
@click.option("--out", type=PathArg(path_type=Path), default=Path("teachers"), show_default=True,
              help="Folder to write teacher_p<P>.safetensors and teachers.json into.")
@click.option("--backbone", type=click.Choice(BACKBONES), default="efficientnet-lite0", show_default=True,
              help="Pretrained ImageNet network P to distil.")
@click.option("--backbone-weights", default=None, callback=not_empty,
              metavar="FILE|URL", help="Weights file or URL for P (torchvision format for resnet18).  [default: "
                                       "efficientnet-lite0: its packaged weights; resnet18: required]")
@click.option("--target", type=click.Choice(TARGETS), default="dense", show_default=True,
              help="What the teacher learns from P: 'dense' = P's stride-8/16 feature maps of whole images, learnt "
                   "densely on windows; 'patch' = P's global descriptor of each patch (the paper's). README: Teachers.")
@click.option("--target-strides", default="8,16", show_default=True, callback=parse_ints,
              help="Which of P's feature maps the dense target holds: 8, 16 or 8,16 (README: Teachers).")
@click.option("--backbone-input", default=128, show_default=True,
              help="Square side, in pixels, that patches are resized to before P sees them (--target patch).")
@click.option("--crop", default=32, show_default=True, help="Side of each training window's output (--target dense).")
@click.option("--images", default=SKIMAGE_SOURCE, show_default=True, callback=not_empty,
              help="Natural images to cut patches from: a folder of any size (e.g. an ImageNet train folder; it "
                   "streams through --pool-images), or 'skimage' for the photos scikit-image ships.")
@click.option("--pool-images", default=POOL_IMAGES, show_default=True,
              help="Images held in memory at once (with P's dense maps: about 60 MB per ImageNet-sized photo). "
                   "A folder of more streams through the pool.")
@click.option("--pool-refresh", default=POOL_REFRESH, show_default=True,
              help="While a folder streams: steps per image replaced by the next (P runs on each); 0 = never.")
@click.option("--patches", default=6000, show_default=True,
              help="Patches whose P descriptors are computed once and trained on (--target patch).")
@click.option("--steps", default=1500, show_default=True, help="Optimizer steps per teacher.")
@click.option("--batch", default=None, type=int,
              help="Windows per step (--target dense), or patches per step (--target patch; paper: 64).  [default: 8 windows, 64 patches]")
@click.option("--lr", default=2e-4, show_default=True, help="Adam learning rate (paper: 2e-4).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="constant", show_default=True,
              help="Learning rate over the steps: constant (the paper's) or cosine decay from --lr to 0.")
@click.option("--weight-decay", default=1e-5, show_default=True, help="Adam weight decay (paper: 1e-5).")
@click.option("--lambda-k", default=1.0, show_default=True, help="Weight of the knowledge distillation loss.")
@click.option("--lambda-c", default=1.0, show_default=True, help="Weight of the compactness loss.")
@click.option("--lambda-m", default=0.0, show_default=True, help="Weight of the triplet (metric learning) loss.")
@click.option("--margin", default=1.0, show_default=True, help="Triplet margin delta.")
@click.option("--seed", default=0, show_default=True,
              help="Seeds everything random: initialization, the photos' order, the windows, patches and triplets drawn.")
@click.option("--replace-shipped", is_flag=True,
              help="Allow --out to be the shipped default teachers' folder, which every training without "
                   "--teachers uses (to remake them, as their model card does).")
@click.option("--replace", is_flag=True,
              help="Replace teachers of these scales that --out already holds (else refused: each took hours).")
@device_option
@amp_option
@user_errors
def teacher_cmd(scales, out, backbone, backbone_weights, target, target_strides, backbone_input, crop, images, pool_images,
                pool_refresh, patches, steps, batch, lr, schedule, weight_decay, lambda_k, lambda_c, lambda_m, margin, seed,
                replace_shipped, replace, device, amp):
    """Distil teacher patch networks from a pretrained ImageNet CNN."""
    from .teacher_files import read_records, sweep_stages, teacher_path

    # an option of the other target changes nothing: a user giving it meant something it will not do
    ctx = click.get_current_context()
    for option, applies_to in (("backbone_input", "patch"), ("patches", "patch"), ("crop", "dense"),
                               ("target_strides", "dense")):
        if target != applies_to and ctx.get_parameter_source(option) != click.core.ParameterSource.DEFAULT:
            flag = "--" + option.replace("_", "-")
            raise InputError(f"{flag}: applies to --target {applies_to} only, and this is --target {target}; leave "
                             f"{flag} out, or add --target {applies_to}")
    check_output(out, "--out", folder=True)
    check_outside_bundles(out, "--out")
    if images != SKIMAGE_SOURCE:
        check_apart(out, "--out", Path(images), "the --images folder")
    pictures = sorted(f.name for f in (Path(out).iterdir() if Path(out).is_dir() else ()) if is_image_file(f))
    if pictures:  # a dataset's train/good: teachers written among its images
        raise InputError(f"--out {out}: holds images ({', '.join(pictures[:3])}{' ...' if len(pictures) > 3 else ''}), "
                         "not teachers; give a folder of teachers, or a new one")
    if not replace_shipped and real_path(out) == real_path(DEFAULT_DIR):
        raise InputError(f"--out {out}: the shipped default teachers, which every ustudents-train without --teachers "
                         "uses; give another folder (and --teachers it to ustudents-train), or add --replace-shipped")
    held = [p for p in scales if teacher_path(out, p).exists()]
    if held and not (replace or replace_shipped):  # a finished distillation was replaced without a word
        rest = [p for p in scales if p not in held]  # a run stopped part-way: the scales it did not write
        raise InputError(f"--out {out}: holds teachers for p={','.join(map(str, held))} already, which distilling "
                         "again would replace; give another --out, or add --replace" +
                         (f", or distil only the others with --scales {','.join(map(str, rest))}" if rest else ""))
    dev = resolve_device(device)
    made = [f for f in (Path(out), *Path(out).parents) if not f.exists()]  # what mkdir makes, deepest first
    Path(out).mkdir(parents=True, exist_ok=True)  # to lock it: a second run into it read and rewrote teachers.json
    written: list[int] = []                       # from under this one, losing a scale's record
    try:
        with locked(out, f"--out {out}: another `ustudents teacher` is writing teachers there now; wait for it to "
                         "finish, or give another --out"):
            read_records(out)  # a damaged teachers.json there is reported now, not after distillation
            sweep_stages(out)
            distil(scales, out, written, dict(
                backbone=backbone, backbone_weights=backbone_weights, target=target, target_strides=target_strides,
                backbone_input=backbone_input, crop=crop, images=images, pool_images=pool_images,
                pool_refresh=pool_refresh, patches=patches, steps=steps, batch=batch, lr=lr,
                schedule=schedule, weight_decay=weight_decay, lambda_k=lambda_k, lambda_c=lambda_c, lambda_m=lambda_m,
                margin=margin, seed=seed, device=str(dev), amp=resolve_amp(amp, dev)))
    except BaseException:
        if written and set(written) != set(scales):  # scale by scale: say what a stopped run already replaced
            rest = ",".join(str(p) for p in scales if p not in written)
            click.echo(f"{out}: this run already wrote p={', p='.join(map(str, written))} (and their records in "
                       f"teachers.json); the other scales there are unchanged: to distil the rest, run the same "
                       f"command with --scales {rest}", err=True)
        raise
    finally:
        for folder in made:  # nothing written: no empty folder of this run's left behind
            if any(folder.iterdir()):
                break
            folder.rmdir()


def distil(scales: list[int], out: Path, written: list[int], settings: dict) -> None:
    """Distil and save each scale in turn, the largest first, appending each saved one to `written`.
    What the images must hold grows with p (a window of --crop plus the patch, the triplet loss's
    shifts), so a folder too small for a scale is refused before any scale has been distilled, not
    after hours of the smaller ones."""
    from .teacher import train_teacher
    from .teacher_files import save_teacher

    with stop_signals_as_ctrl_c():  # `docker stop`, between scales too: one line and exit 130, as Ctrl-C
        for p in sorted(scales, reverse=True):
            state, record = train_teacher(TeacherConfig(p=p, **settings))
            path = save_teacher(out, p, state, record)
            written.append(p)
            click.echo(f"p={p}: {path} (decoder recovers {record['explained_variance_of_P']:.1%} of P's variance, "
                       f"{record['wall_s']:.0f} s)")
            if record["explained_variance_of_P"] <= 0:  # written all the same (a quick smoke run may want it)
                click.echo(f"WARNING: p={p}: the teacher's descriptors predict P's features no better than their mean: "
                           f"it learned nothing of P, and students trained on it detect nothing; distil longer "
                           f"(--steps, now {settings['steps']}) or at another --lr (now {settings['lr']:g})")


@click.command("calibrate", short_help="Recalibrate MODEL on new good images.")
@click.argument("model", type=PathArg(path_type=Path))
@click.option("--images", type=PathArg(path_type=Path), required=True,
              help="Folder of defect-free images from the new setup (camera, lighting).")
@click.option("--target-fpr", default=None, type=float,
              help="Share of pixels allowed above the mask threshold.  [default: the bundle's, else "
                   f"{DEFAULT_TARGET_FPR:g}]")
@click.option("--image-fpr", default=None, type=float,
              help="Share of good images flagged anomalous (position score).  [default: the bundle's, else "
                   f"{DEFAULT_IMAGE_FPR}]")
@click.option("--out", type=PathArg(path_type=Path), default=None,
              help="Write the recalibrated bundle here (a new folder, or a bundle there replaced whole), MODEL left "
                   "as it is.  [default: MODEL, rewritten in place]")
@device_option
@user_errors
def calibrate_cmd(model, images, target_fpr, image_fpr, out, device):
    """Re-estimate e/v statistics, thresholds and image score of MODEL on new good images, without retraining.

    Runs in the precision the bundle runs in on this machine: bf16 where it was calibrated in bf16 and
    the device has it natively, else fp32. The bundle is rewritten atomically (with --out, written
    there, as a new bundle); its built engines held the old statistics and are dropped."""
    if out is None:
        with changing_bundle(model, "calibrate") as bundle:  # not beside a build-engines: its engine would hold old statistics
            _calibrate(bundle, model, images, target_fpr, image_fpr, device)
        return
    # A copy for a second camera, or the line's next version beside the served one: `cp -r` then calibrate
    # in place, run twice (after a refusal, at the next camera change), copied the bundle into the copy
    bundle = load_bundle(model)
    if out.name in ("", ".", ".."):  # as ustudents-train's --out: found after the network pass, not before
        raise InputError(f"--out {out}: names no folder of its own (a bundle replaces its folder whole); give the "
                         f"copy's folder, e.g. --out ./{bundle.path.resolve().name}-cam2")
    if real_path(out) == real_path(bundle.path) or (out.exists() and os.path.samefile(out, bundle.path)):
        raise InputError(f"--out {out}: that is MODEL itself; leave --out out to recalibrate it in place")
    check_output(out, "--out", folder=True, link_to_make=True)
    check_replaceable(out)
    check_apart(out, "--out", images, "the images calibrated on")
    check_outside_bundles(out, "--out", replaces_itself=True)
    check_writable(out)
    before = manifest_on_disk(out)
    if before is not None and trained_id(str(before.get("id"))) != trained_id(bundle.manifest["id"]):
        # a typo naming another line's bundle replaced that model whole
        raise InputError(f"--out {out}: holds the bundle of another training ({before.get('id')}; MODEL is "
                         f"{bundle.manifest['id']}), which it would replace; choose another --out")
    parent = real_path(out).parent
    try:  # two calibrations into one folder: each removed what it took for the other's killed leftovers
        with locked(parent, f"--out {out}: another calibrate (or a training) is writing a bundle in {parent} now; run "
                            "this one when it has finished") if parent.is_dir() else contextlib.nullcontext(), \
                stop_signals_as_ctrl_c():
            _calibrate(bundle, model, images, target_fpr, image_fpr, device, out=out, replacing=before)
    except KeyboardInterrupt:
        done = manifest_on_disk(out) != before  # write_bundle replaces it whole: old or new, never half
        click.echo(f"\ninterrupted: {out} " + ("holds the recalibrated bundle" if done else "is as it was") +
                   f"; {model} is unchanged" + ("" if done else "; run the command again"), err=True)
        raise SystemExit(130) from None


def trained_id(model_id: str) -> str:
    """The id of the training a model comes from: its id without a calibration's suffix."""
    return re.sub(r"-cal\d{8}T\d{6}Z$", "", model_id)


def recalibrated_id(model_id: str) -> str:
    """The trained model's id with the time of this calibration: results and ustudents_model_info tell
    the new thresholds from the old (two workers of a rolling update, a copy recalibrated for a second
    camera), and still name the training they share."""
    return f"{trained_id(model_id)}-cal{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def _calibrate(bundle, model, images, target_fpr, image_fpr, device, out: Path | None = None,
               replacing: dict | None = None) -> None:
    """Calibrate `bundle` (loaded from `model`) on `images`: rewritten in place, or written to `out`
    (replacing the manifest of a bundle there, None where there was none)."""
    from .calibrate import calibrate, check_rate, check_resolvable
    from .dataset import Sample, bit_depths, fingerprint, load_images, refuse_copies
    from .pipeline import check_not_blank, image_fpr_warning, image_score_line, mask_line

    if not Path(images).is_dir():
        raise InputError(f"--images {images}: folder not found{missing_folder_hint(images)}; give a folder of good "
                         "images from the new setup")
    files = image_files(images)
    if len(files) < 2:
        raise InputError(f"{images}: needs a folder with at least 2 good images ({'/'.join(IMAGE_SUFFIXES)})"
                         f"{subfolder_hint(images)}")
    # a bundle from before the field, or edited by hand, keeps the default
    fpr = target_fpr if target_fpr is not None else bundle.manifest["threshold"].get("target_pixel_fpr",
                                                                                     DEFAULT_TARGET_FPR)
    image_fpr = image_fpr if image_fpr is not None else bundle.manifest.get("image_score", {}).get(
        "target_image_fpr", DEFAULT_IMAGE_FPR)
    for option, rate in (("--target-fpr", fpr), ("--image-fpr", image_fpr)):
        try:  # before the network pass, not after
            check_rate(option, rate)
        except ValueError as err:
            raise InputError(str(err)) from None
    check_resolvable(fpr, len(files), bundle.image_size)
    samples = [Sample(path=f, defect="good") for f in files]
    # A new camera may write more bits (a 12-bit one after an 8-bit one): its 16-bit images say how many.
    depths = bit_depths(samples)
    bits = depths.bits or bundle.uint16_bits
    warning = depths.mixed_warning(f"--images {images}")
    if warning:
        click.echo(warning)
    shapes: list[tuple[int, int]] = []
    arr = load_images(samples, bundle.image_size, desc="loading images", bits=bits, dark_hint=False,  # bits: theirs
                      shapes=shapes)
    refuse_copies(f"--images {images}", samples, arr)
    # the files as they were read, before minutes of network passes: a line's frame folder may lose one to
    # its retention job meanwhile (the calibration then ended without a word written)
    taken = fingerprint(samples, images)
    # frames collected while the line runs: a capped lens among them would set the thresholds served
    check_not_blank(f"--images {images}", samples, arr, click.echo, calibrating=True)
    dev = resolve_device(device)
    # the statistics and threshold must hold for the engine that will use them
    bf16 = default_torch_precision(bundle, dev) == "bf16"
    try:
        cal = calibrate(bundle.model(), arr, dev, fpr, image_fpr, bf16=bf16)
    except CalibrationError as err:
        raise InputError(f"--images {images}: {err}") from None
    statistics = bundle.manifest["statistics"]
    for p, s in cal.stats.items():
        statistics[str(p)].update(e_mu=s.e_mu, e_sigma=s.e_sigma, v_mu=s.v_mu, v_sigma=s.v_sigma)
    # which images: the path as the machine sees it, and their contents (the path may hold others later)
    threshold = dict(cal.threshold, source=str(Path(images).absolute()), fingerprint=taken)
    # The stored evaluation described the old calibration, and built engines bake the old statistics
    # in: neither applies any more. The position statistics are tensors, so weights and manifest are
    # rewritten, in place (rewrite_bundle: the folder and what else it holds stay).
    manifest = dict(bundle.manifest, statistics=statistics, threshold=threshold, image_score=cal.image_score,
                    evaluation=None, engines=[], input={**bundle.manifest.get("input", {}), "uint16_bits": bits},
                    id=recalibrated_id(bundle.manifest["id"]))
    # the training images' shapes stay known (the students learned them) and these join them (a new
    # camera's); a bundle from before the record knows these alone: the line's frames
    known = FrameShapes.of(shapes).union(bundle.frame_shapes)
    manifest["frame_shapes"] = known.to_json()
    tensors = {**bundle.network_tensors(), **cal.tensors}
    rewrite_bundle(bundle.path, manifest, tensors) if out is None else write_bundle(out, manifest, tensors)
    model = model if out is None else out  # the bundle the lines below speak of
    click.echo(f"{model}: recalibrated on {len(files)} images; {mask_line(threshold)}, non-empty masks on "
               f"{threshold['validation_image_fpr']:.1%} of these images; {image_score_line(cal.image_score)}")
    warning = image_fpr_warning(cal.image_score, image_fpr, "calibrate again with more good images in --images")
    if warning:
        click.echo(warning)
    if bundle.frame_shapes is None:  # a bundle from before the record judged every shape; these frames are the line's
        click.echo(f"{model}: frames of {known.describe()} are judged from now on, others dead-lettered "
                   "(unexpected_shape); it recorded no shapes before, and judged every one")
    elif known != bundle.frame_shapes:
        click.echo(f"{model}: frames of {known.describe()} are judged from now on")
    if bits != bundle.uint16_bits:
        click.echo(f"{model}: these images are 16-bit holding {bits} bits (the model read {bundle.uint16_bits}): "
                   "frames are read with that from now on")
    if engines := bundle.manifest.get("engines") or (replacing or {}).get("engines"):
        from ustudents.engines.bundle import ENGINE_PRECISIONS
        from ustudents.engines.runtime import build_command
        # in the order the backends run them when no precision is asked for, as every such list is said
        built = sorted({(e["backend"], e["precision"]) for e in engines},
                       key=lambda b: (b[0], ENGINE_PRECISIONS.index(b[1])))
        if out is None:
            click.echo(f"{model}: its built engines held the old statistics and were dropped; rebuild with "
                       + " and ".join(build_command(bundle, *b) for b in built))
        else:
            copy = load_bundle(out)
            click.echo(f"{model}: the built engines held the old statistics and are not copied; build them with "
                       + " and ".join(build_command(copy, *b) for b in built))
    if out is not None and replacing is None:
        click.echo(f"{model}: point the line's workers at it and restart them together (README: Recalibrating after "
                   "a camera change)")
        return
    # a worker reads its bundle once: recalibrated under it, a line judged with two thresholds at once
    # (the running workers' and those started after), and nothing said so
    click.echo(f"{model}: a worker serving it keeps judging with what it loaded until it restarts; "
               + ("serve a recalibrated copy (--out) and " if out is None else "")
               + "restart the line's workers together (README: Recalibrating after a camera change)")


@click.command("evaluate", short_help="Image/pixel AUROC and AU-PRO of MODEL on a test set.")
@click.argument("model", type=PathArg(path_type=Path))
@click.option("--data-root", type=PathArg(path_type=Path), required=True, help="MVTec AD root holding the bundle's category.")
@click.option("--json", "json_file", type=PathArg(path_type=Path), default=None, help="Also write the results here.")
@click.option("--overlays", type=PathArg(path_type=Path), default=None, help="Write a heatmap overlay per test image here.")
@click.option("--batch", default=4, show_default=True, help="Images per forward pass.")
@engine_options
@user_errors
def evaluate_cmd(model, data_root, json_file, overlays, batch, backend, precision, device):
    """Image AUROC, pixel AUROC and AU-PRO (FPR <= 0.3) of MODEL on its category's test set."""
    from ustudents.engines.runtime import load_engine

    from .evaluate import checked_for, evaluate, format_table, write_json

    if batch < 1:
        raise InputError(f"--batch {batch}: must be at least 1")
    check_output(json_file, "--json", folder=False)
    check_output(overlays, "--overlays", folder=True)
    bundle = load_bundle(model)  # once: loading verifies the weights' checksum
    for path, option in ((json_file, "--json"), (overlays, "--overlays")):  # never over an input
        # the whole data root, not the category's folder: another category's images are images too
        check_apart(path, option, Path(data_root), "the data root")
        check_outside_bundles(path, option)
    check_json_replaceable(json_file)
    if json_file is not None and overlays is not None and (real_path(json_file) == real_path(overlays)
                                                           or real_path(overlays) in real_path(json_file).parents):
        raise InputError(f"--json {json_file}: the --overlays folder or inside it, where an overlay could replace it; "
                         "give it a path apart")
    with stop_signals_as_ctrl_c():  # `docker stop`, a closed terminal: one line, exit 130, no partial file
        checked = checked_for(bundle, data_root, overlays)  # before the engine loads (a TensorRT plan's wait)
        engine = load_engine(bundle, backend, device, precision, max_batch=batch)
        click.echo(f"engine: {engine.describe()}")
        results = evaluate(engine, data_root, overlays, log=click.echo, checked=checked)
        click.echo(format_table(results))
        if json_file:
            write_json(json_file, results)


@click.command("predict", short_help="Score image files: verdicts, masks, overlays.")
@click.argument("model", type=PathArg(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=PathArg(path_type=Path), metavar="IMAGE...")
@click.option("--out", type=PathArg(path_type=Path), required=True, help="Folder for masks, overlays and results.json.")
@engine_options
@user_errors
def predict_cmd(model, images, out, backend, precision, device):
    """Score IMAGE files: per image its score, verdict, mask PNG and heatmap overlay PNG."""
    from ustudents.engines.runtime import load_engine

    from .evaluate import plan_predict, predict

    check_output(out, "--out", folder=True)
    check_apart(out, "--out", model, "the model bundle")  # also when MODEL is not a bundle: never over an input
    check_outside_bundles(out, "--out")

    def line(r: dict) -> None:
        verdict = "ANOMALOUS" if r["anomalous"] else "ok"
        click.echo(f"{r['image']}\tscore {r['score']:.3f}\t{verdict}\tmask {r['mask']}")
    def stopped(done: int) -> None:
        if not (out / "results.json").exists():  # a stop as it was written (after its rename) leaves it whole
            click.echo(f"--out {out}: stopped part-way, after {done} of {len(plan.paths)} images, so it holds no "
                       "results.json (written once every image is scored); the lines above give the scores of "
                       "those done. Run again to replace the outputs", err=True)
    with stop_signals_as_ctrl_c():  # `docker stop`, a closed terminal: as Ctrl-C
        plan = plan_predict(list(images), out, load_bundle(model))  # before the engine loads
        engine = load_engine(model, backend, device, precision)
        click.echo(f"engine: {engine.describe()}")
        replacing = bool(plan.earlier)
        predict(engine, plan, on_result=line, on_stop=stopped)
    if replacing:  # said once done: a refusal would have left the earlier results as they were
        click.echo(f"--out {out}: these results replaced those of the earlier predict there")


COMMANDS = (train_cmd, teacher_cmd, calibrate_cmd, evaluate_cmd, predict_cmd)


def train_main() -> None:
    """`ustudents-train` = `ustudents train`."""
    train_cmd(prog_name="ustudents-train", **CONTEXT_SETTINGS)

