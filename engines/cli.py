"""Command-line commands of the engines room (`build-engines`), and the backend options that
`evaluate` and `predict` share with it."""
from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from .bundle import ENGINE_DIR, MANIFEST, BundleError, changing, is_bundle, load_bundle, manifest_on_disk
from .files import os_error_line, real_path
from .frame_shapes import recalibrate_copy
from .images import (IMAGE_SUFFIXES, ImageError, first_copy, image_files, missing_folder_hint, read_image,
                     subfolder_hint)
from .memory import out_of_memory_line
from .runtime import BACKENDS, PRECISIONS, EngineError


class InputError(click.ClickException):
    """Bad input from the user: printed as one line, exit code 2."""

    exit_code = 2


class PathArg(click.Path):
    """click.Path refusing an empty value. Click takes "" (an unset variable in a script) for the
    current folder: `--out ""` wrote outputs there, and `calibrate --images ""` recalibrated a model
    on whatever images the current folder held."""

    def convert(self, value, param, ctx):
        return super().convert(not_empty(ctx, param, value), param, ctx)


EMPTY_PATH = "an empty path (an unset variable in a script?); give the file or folder"


def not_empty(ctx, param, value):
    """Click callback for a string option that holds a path or a name (`teacher --images skimage|DIR`),
    and PathArg's check: refuses "" and blanks."""
    if isinstance(value, str) and not value.strip():
        raise click.BadParameter(EMPTY_PATH, ctx=ctx, param=param)
    return value


# Every command's, under `ustudents` and as the standalone ustudents-train and ustudents-worker alike
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}


def warnings_as_lines() -> None:
    """The library's logged warnings print as "WARNING: ..." like a command's own, not as a bare line:
    a command installs no logging handler, so Python's last-resort handler prints them, by default the
    message alone. The worker installs its own handler (worker.logs), which this leaves alone."""
    if logging.lastResort is not None:
        logging.lastResort.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))


def user_errors_for(errors: tuple[type[Exception], ...]):
    """A decorator turning the expected failures `errors`, and memory the machine refused, into
    InputError (one line, exit 2), and Ctrl-C into exit 130; anything else is a bug and keeps its
    traceback."""
    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            warnings_as_lines()
            try:
                return fn(*args, **kwargs)
            except errors as err:
                raise InputError(os_error_line(err)) from None
            except (MemoryError, RuntimeError) as err:
                if (line := out_of_memory_line(err)) is None:
                    raise
                raise InputError(line) from None
            except KeyboardInterrupt:  # Click's own "Aborted!" exits 1, which reads as a failure, not a stop
                click.echo("\ninterrupted", err=True)
                raise SystemExit(130) from None
        return wrapper
    return decorator


def link_loop(path: Path) -> bool:
    """Whether `path` is a loop of symbolic links (named as such by real_path, not as a link to nothing)."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


def check_output(path: Path | None, option: str, folder: bool, link_to_make: bool = False) -> None:
    """Refuse now, before any work, an output `path` (a folder, or a file when not `folder`) that
    could not be written at the end: a file where a folder goes or the reverse, or no write access;
    and a folder that is a symbolic link to nothing (a share not mounted), which mkdir takes for a
    file, unless `link_to_make` (training makes the folder a link points to: a plant's `current`)."""
    if path is None:
        return
    path = Path(path)
    if folder and not link_to_make and path.is_symlink() and not path.exists() and not link_loop(path):
        raise InputError(f"{option} {path}: a link to {os.readlink(path)}, which does not exist; make that folder, "
                         f"or choose another {option}")
    if path.exists() and path.is_dir() != folder:
        raise InputError(f"{option} {path}: is a {'file' if folder else 'folder'}; give a "
                         f"{'folder' if folder else 'file name'}")
    target = path if folder and path.exists() else path.parent
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        raise InputError(f"{option} {path}: {target} is a file, so nothing can be made under it; choose another path")
    # A file made and removed, not os.access: root passes os.access where no file can be made (/proc,
    # /sys, some FUSE and network mounts), which the write at the end, after minutes of work, would find.
    # TemporaryFile: a file without a name where the file system allows (O_TMPFILE), so a Ctrl-C here
    # leaves no probe file behind; elsewhere one named and removed at once.
    try:
        tempfile.TemporaryFile(dir=target, prefix=".ustudents-probe-").close()
    except OSError as err:
        raise InputError(f"{option} {path}: no file can be made in {target} here ({err.strerror}); choose another "
                         "path") from None


def check_apart(out: Path | None, option: str, source: Path, what: str) -> None:
    """Refuse an output folder or file inside (or equal to) a folder of inputs (a category's images,
    not the whole data root; a model bundle), where what it writes could replace them."""
    if out is None:
        return
    o, s = real_path(out), real_path(source)
    if o == s or s in o.parents:
        raise InputError(f"{option} {out}: inside {what} {source}, where it could overwrite the files there; "
                         "choose a path outside it")


def check_outside_bundles(out: Path | None, option: str, replaces_itself: bool = False) -> None:
    """Refuse an output in a model bundle's folder (any bundle's, not only the command's model):
    `ustudents-train --out` that bundle replaces its folder whole, deleting what else is there.
    `replaces_itself`: `out` is a bundle to be replaced (train's --out), so only its parents count."""
    if out is None:
        return
    real = real_path(out)
    folders = real.parents if replaces_itself else (real, *real.parents)
    bundle = next((f for f in folders if is_bundle(f)), None)
    if bundle is not None:
        raise InputError(f"{option} {out}: inside the model bundle {bundle}, whose folder is replaced whole when it "
                         "is trained again (deleting what else is there); choose a path outside it")


def check_bundle_writable(path: Path, engines_too: bool = False) -> None:
    """Refuse now, before minutes of work, a bundle whose folder (and, for `engines_too`, its engines/
    folder, where build-engines writes) cannot be written (a read-only mount)."""
    # and the write bits too: root passes os.access on a folder made read-only with chmod a-w
    if not os.access(path, os.W_OK) or not Path(path).stat().st_mode & 0o222:
        raise InputError(f"{path}: the bundle folder is not writable here (a read-only mount, or chmod a-w?); copy "
                         "the bundle to a writable folder and run the command on the copy")
    engines = path / ENGINE_DIR
    # the manifest and engines/ too: root's writes passed their chmod a-w and changed their mode
    for inner in (path / MANIFEST, engines):
        if inner.exists() and not inner.stat().st_mode & 0o222:
            raise InputError(f"{inner}: made read-only (chmod a-w) inside the bundle; make it writable (chmod u+w "
                             f"{inner}), or copy the bundle to a writable folder and run the command on the copy")
    # checked here: else the error named a hidden temporary file in it
    if engines_too and engines.is_dir() and not os.access(engines, os.W_OK):
        raise InputError(f"{engines}: the bundle's engines folder is not writable here; make it writable "
                         f"(chmod u+w {engines}), or copy the bundle to a writable folder and run the command on "
                         "the copy")


def nohup(sig: int) -> bool:
    """SIGHUP set to be ignored (`nohup`): then a closed terminal must not stop a long run, nor a worker."""
    return sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN


@contextmanager
def stop_signals_as_ctrl_c():
    """`docker stop`, systemd and Kubernetes end a job with SIGTERM, and a closed terminal (an SSH
    session dropped) with SIGHUP, either of which would kill a command where it stands: handled as
    Ctrl-C instead, each cleans up as on Ctrl-C (training keeps its checkpoint and removes the cached
    teacher targets; a bundle being changed keeps no partial file; a worker loading its models stops
    its endpoints). (Signals reach only the main thread; elsewhere nothing changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP) if not nohup(sig)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@contextmanager
def changing_bundle(model: Path, command: str):
    """A command that changes a bundle: refused on a read-only one, one at a time (bundle.changing), and
    on Ctrl-C or SIGTERM it exits 130: every file and the manifest are replaced whole, so the bundle
    holds what the command had finished (an engine it had recorded) and nothing half-written. Yields
    the bundle, loaded (and its weights verified) once, under the lock."""
    if not Path(model).is_dir():
        load_bundle(model)  # no folder to lock: its one-line "not a model bundle directory"
    before = None
    try:
        with changing(model), stop_signals_as_ctrl_c():
            bundle = load_bundle(model)
            before = manifest_on_disk(bundle.path)
            check_bundle_writable(bundle.path, engines_too=command == "build-engines")
            yield bundle
    except KeyboardInterrupt:
        # calibrate's one manifest write is its change: a stop in the cleanup after its rename said "run
        # the command again to finish" of a bundle already recalibrated (build-engines may have more to
        # build after an engine it recorded)
        if command == "calibrate" and before is not None and manifest_on_disk(model) != before:
            click.echo(f"\ninterrupted: {model} holds what {command} wrote (its manifest was replaced before the "
                       "stop); nothing half-written, nothing to run again", err=True)
        else:
            click.echo(f"\ninterrupted: {model} holds nothing half-written ({command} replaces each file whole); "
                       "run the command again to finish", err=True)
        raise SystemExit(130) from None


user_errors = user_errors_for((BundleError, EngineError, ImageError, ValueError, OSError))


def device_form(ctx, param, value: str) -> str:
    """--device as written: auto, cpu, cuda or cuda:N (whether that GPU is here is load_engine's check)."""
    import torch

    try:
        ok = value == "auto" or torch.device(value).type in ("cpu", "cuda")
    except (RuntimeError, ValueError):
        ok = False
    if not ok:
        raise click.BadParameter(f"{value!r}: give auto, cpu, cuda or cuda:N (N as torch.cuda counts the visible GPUs)")
    return value


def engine_options(fn):
    """--backend, --precision and --device, as `load_engine` takes them."""
    fn = click.option("--device", default="auto", show_default=True, callback=device_form,
                      help="auto, cpu, cuda or cuda:N; auto = cuda when PyTorch sees a GPU, else cpu.")(fn)
    fn = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                      help="Network precision.  [default: torch: the one the bundle was calibrated in where the "
                           "device runs it natively, else fp32; built engines: the one built]")(fn)
    fn = click.option("--backend", type=click.Choice(("auto",) + BACKENDS), default="auto", show_default=True,
                      help="auto = the fastest present: tensorrt on a GPU with a plan for it, else torch (on CPU "
                           "with FFT convolutions where they measure faster). onnxruntime and tensorrt need "
                           "`ustudents build-engines` first.")(fn)
    return fn


MIN_CALIBRATION_IMAGES = 8
MAX_ENGINE_BATCH = 256  # the largest batch a worker asks for (its --batch); TensorRT plans size memory by it


def good_frames(folder: Path | None, bundle, option: str, limit: int = 8) -> list:
    """Up to `limit` images from a folder, for parity checks on real images (16-bit data: the bundle's
    bits), each of a shape the model knows, as the worker judges frames (strips 16 px high set int8 ranges
    on textures no frame shows, and passed the parity check made on them); `option` names it in errors."""
    if folder is None:
        return []
    if not Path(folder).is_dir():
        raise InputError(f"{option} {folder}: folder not found{missing_folder_hint(folder)}; give a folder of good "
                         "images")
    files = image_files(folder)
    if not files:
        raise InputError(f"{option} {folder}: no images ({'/'.join(IMAGE_SUFFIXES)}){subfolder_hint(folder)}; give a "
                         "folder of good images")
    images = [read_image(f, bundle.uint16_bits) for f in files[:limit]]
    if (shapes := bundle.frame_shapes) is not None:  # a bundle from before the record judges every shape
        for f, image in zip(files, images):
            shapes.check(image, str(f), f"give good images of those frames in {option}, after recalibrating a copy of "
                                        f"the model on them ({recalibrate_copy(bundle.path)})")
    return images


@click.command("build-engines", short_help="Build MODEL's ONNX or TensorRT engine.")
@click.argument("model", type=PathArg(path_type=Path))
@click.option("--backend", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="onnx: an ONNX Runtime engine (any machine); tensorrt: a plan for this machine's GPU.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16: the networks in half precision, the scoring head in fp32. int8: quantize/dequantize "
                   "nodes around every convolution, ranges calibrated on --calibration-images.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, MAX_ENGINE_BATCH),
              help="Largest batch the TensorRT plan serves (a worker's --batch is at most 256); an ONNX engine "
                   "runs any batch.")
@click.option("--check-images", type=PathArg(path_type=Path), default=None,
              help="Good images for the parity check against PyTorch.  [default: random noise images; int8: "
                   "the --calibration-images]")
@click.option("--calibration-images", type=PathArg(path_type=Path), default=None,
              help="int8 only, required: good images (e.g. the category's train/good) whose activations set "
                   "the quantization ranges; up to 32 are used.")
@user_errors
def build_engines_cmd(model, backend, precision, max_batch, check_images, calibration_images):
    """Export MODEL's fused ensemble to ONNX, check it against PyTorch and store it in the bundle;
    with --backend tensorrt, also build a TensorRT plan for this GPU."""
    if precision == "int8" and calibration_images is None:
        raise InputError("--precision int8: needs --calibration-images DIR, good images (e.g. the category's "
                         "train/good) whose activations set the quantization ranges")
    if calibration_images is not None and precision != "int8":  # silently unused, it suggested an int8 engine
        raise InputError(f"--calibration-images: only --precision int8 is calibrated (this is {precision}); leave "
                         "it out, or add --precision int8")
    with changing_bundle(model, "build-engines") as bundle:
        _build_engines(bundle, backend, precision, max_batch, check_images, calibration_images)


def _build_engines(bundle, backend, precision, max_batch, check_images, calibration_images) -> None:
    from .onnx_engine import ParityError, build_onnx, require_onnx

    require_onnx()
    if backend == "tensorrt":
        from .tensorrt_build import require_tensorrt
        require_tensorrt()
    calibration = (good_frames(calibration_images, bundle, "--calibration-images", limit=32)
                   if precision == "int8" else None)
    if calibration is not None and len(calibration) < MIN_CALIBRATION_IMAGES:
        # ranges from one image saturate on the next frame's variation, and the parity check then runs
        # on that same image, proving nothing
        raise InputError(f"--calibration-images {calibration_images}: {len(calibration)} image(s); int8 ranges need "
                         f"at least {MIN_CALIBRATION_IMAGES} good images (up to 32 are used)")
    if calibration is not None:
        # ranges set on blank frames or copies miss the good images' spread, and the parity check, run on
        # the same images, passed an engine that called every defect ok
        names = [f.name for f in image_files(calibration_images)[:len(calibration)]]
        blank = [n for n, img in zip(names, calibration) if img.min() == img.max()]
        if blank:
            raise InputError(f"--calibration-images {calibration_images}: {len(blank)} of the {len(names)} images are "
                             f"one flat colour (blank frames?), e.g. {blank[0]}; int8 ranges must come from good parts")
        pair = first_copy(calibration)
        if pair is not None:
            raise InputError(f"--calibration-images {calibration_images}: {names[pair[0]]} and {names[pair[1]]} are "
                             "the same picture; int8 ranges need varied good images: remove the copies")
    # int8 ranges are set on good images and saturate on noise, so its parity is checked on good
    # images too: --check-images, else the calibration images (on noise the documented command failed it)
    frames = (good_frames(check_images, bundle, "--check-images") if check_images or precision != "int8"
              else good_frames(calibration_images, bundle, "--calibration-images"))
    try:
        entry = build_onnx(bundle, precision, frames, calibration)
    except ParityError as err:
        if precision == "int8":  # the ranges, set on the user's images, did not hold: theirs to change
            raise InputError(f"{err}; int8 ranges from --calibration-images did not hold: give more, and more "
                             "varied, good images (e.g. all of train/good), or build fp16 or fp32") from None
        raise click.ClickException(f"{err}. Report this with the bundle and precision") from None
    p = entry["parity"]
    click.echo(f"{bundle.path / entry['file']}: ONNX Runtime vs PyTorch on {p['images']} {p['on']}: max |diff| "
               f"{p['max_abs_diff']:.2e} (tolerance {p['tolerance']}), masks agree on {p['mask_agreement']:.4%} of pixels")
    if backend == "tensorrt":
        from .tensorrt_build import build_tensorrt
        entry = build_tensorrt(bundle, precision, max_batch)
        click.echo(f"{bundle.path / entry['file']}: TensorRT {entry['tensorrt_version']} {precision} plan for "
                   f"{entry['gpu']}, batch 1..{max_batch}")


COMMANDS = (build_engines_cmd,)
