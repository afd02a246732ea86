"""The worker process: Redis stream in, one result (or dead letter) per frame out.

Three stages, each a thread, joined by bounded queues, so decoding the next batch and encoding and
publishing the previous one overlap inference, and memory stays bounded: at most
`2 * queue_batches + 3` batches in flight, and the reader reads no more while the decoded frames and
unpublished results held reach `inflight_mb` (HeldBytes):

    reader ──(decode pool)──► [decoded] ──► inference ──► [scored] ──► publisher
    XREADGROUP / claim script               Engine.predict            PNG, publish + XACK (one script)

The reader first re-reads this consumer's own pending entries (id 0), then new ones (`>`); every
`claim_idle_ms / 2` it claims entries that silent consumers left pending (streams.CLAIM_SCRIPT). Those two
kinds were handed out before and never completed, maybe because they killed a worker, so they go
through one at a time with nothing else in flight (`_send_redelivered`). Every
Redis call retries with backoff while Redis is away (not ready meanwhile); nothing is acknowledged
except together with its result (streams.publish). SIGTERM/SIGINT stop the reader; the batches
already read are finished and published within `shutdown_timeout_s`, then the process exits 0.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import redis

from ustudents import __version__
from ustudents.engines.bundle import load_bundle
from ustudents.engines.cli import nohup
from ustudents.engines.frame_shapes import UnexpectedShape
from ustudents.engines.images import ImageError
from ustudents.engines.runtime import Engine, Prediction, load_engine

from . import codec, schema
from .connection import UNAVAILABLE, Backoff, RedisState, connect, redis_of, refusal, refusal_advice, unblocked
from .logs import Throttled
from .metrics import HealthServer, WorkerMetrics
from .settings import WorkerSettings
from .streams import Entry, PublishRefused, Record, StreamIO

log = logging.getLogger("ustudents.worker")
# A worker stalled this many times stall_timeout_s exits by itself (run): liveness has failed since
# stall_timeout_s, and an orchestrator that restarts on it (Kubernetes) has done so by then.
STALL_EXIT_FACTOR = 2
# A stop signal repeated within this many seconds is the same stop sent twice, not a second one. The
# time is taken when Python runs the handler, not when the signal came: in CI the handler of GNU
# timeout's second SIGTERM, sent at once, ran 1.01 s after the first's (the main thread was in a
# join that did not wake for it: JOIN_SLICE_S now bounds that), so 1.0 took it for a second stop.
REPEATED_SIGNAL_S = 3.0
JOIN_SLICE_S = 0.2  # the longest a signal handler waits while the main thread waits for the stages
SIGNAL_POLL_S = 0.2  # the longest Worker.run takes to act on a stop signal its handler recorded
# A worker holds its consumer name in Redis for NAME_HOLD_S, renewed every NAME_RENEW_S (a failed
# renewal is tried again within a second) (StreamIO.hold_name): a dead worker's name is free again
# within NAME_HOLD_S.
NAME_HOLD_S, NAME_RENEW_S = 20, 5

STOP = object()  # end of a queue
# What becomes of the entries a stop leaves unpublished (its log line), where the group outlives the worker
LEFT_PENDING = "they stay pending and another worker claims them after claim_idle_ms"
# The group's lag, pending and length are withdrawn from /metrics after this many refreshes in a row
# (every stats_interval_s) that could not read them (_monitor).
STATE_GRACE_READS = 3
# The end-to-end latency runs from an entry's arrival (the time in its id, Redis's clock) to its result,
# on Redis's clock too (StreamIO.clock_offset): the camera's and the worker's clocks play no part (a
# camera's `ts` 30 s behind read as 30 s of latency, for ever). An id's time further ahead than the
# offset's error is no arrival time: an id a producer set, or one Redis made after it (Redis's ids
# never go below the last one's), or Redis's clock stepped back; such entries are left out.
ARRIVAL_AHEAD_S = 1.0
# A forward step of Redis's clock larger than this (against the worker's monotonic one, between two
# claims; less where claim_idle_ms is short) postpones the claim (_reader): readings of the offset
# agree within milliseconds
CLOCK_LEAP_S = 2.0


class ModelFailing(RuntimeError):
    """The model raised on `max_failures_in_row` frames in a row: the fault is the model or the
    device, not the frames, so the worker stops instead of dead-lettering good frames."""


def described(models: dict[str, str]) -> str:
    """'plates (plates-2026...), tiles (tiles-2026...-cal...)': models by category, with their ids."""
    return ", ".join(f"{category} ({model})" for category, model in sorted(models.items()))


def load_engines(settings: WorkerSettings) -> dict[str, Engine]:
    """One engine per served bundle, keyed by the bundle's category, each warmed up (Engine.warm_up:
    so that no real batch is the slow first one). Raises BundleError/EngineError/ValueError. Every
    bundle is read and the categories compared before any engine loads: a missing or second bundle
    of a category was found after the ones before it were loaded and warmed up (minutes on a CPU or
    with a plan to build), on every restart of a crash-looping worker."""
    first: dict[str, Path] = {}
    for path in settings.model_dirs:
        category = load_bundle(path).manifest["category"]
        if category in first and os.path.samefile(first[category], path):
            also = "" if str(first[category]) == str(path) else f", also as {first[category]}"
            raise ValueError(f"{path}: given twice (--model or USTUDENTS_MODEL{also}); give each model once")
        if category in first:
            raise ValueError(f"{path}: a second model for category {category!r} (also {first[category]}); "
                             "serve one model per category")
        first[category] = path
    engines: dict[str, Engine] = {}
    for category, path in first.items():
        engine = load_engine(path, backend=settings.backend, device=settings.device,
                             precision=settings.precision, max_batch=settings.batch)
        engine.warm_up()
        engines[category] = engine
    return engines


@dataclass
class Work:
    """A micro-batch on its way: per entry, its decoding (Future of the frame), a dead letter, or
    None (already published: acknowledge only); and the category of the engine to use."""
    entries: list[Entry]
    prepared: list[Future | schema.DeadLetter | None]
    categories: list[str | None]


@dataclass
class Outcome:
    kind: str  # "ack" | "dead" | "scored" | "failed"
    dead: schema.DeadLetter | None = None
    # "scored": what publishing needs of the prediction and no more, since it waits for the publisher at
    # the frame's full size: the verdict and mask, and for the overlay the frame and what the mask thresholds
    score: float = 0.0
    anomalous: bool = False
    mask: np.ndarray | None = None
    frame: np.ndarray | None = None  # only with the overlay (heatmap)
    mask_level: np.ndarray | None = None  # only with the overlay
    category: str | None = None
    error: str = ""
    uncharge: str | None = None  # "failed": the attempt token to take back (StreamIO.forget_attempts)

    @property
    def held(self) -> int:
        """Bytes of the arrays this outcome holds until it is published (HeldBytes)."""
        return sum(a.nbytes for a in (self.mask, self.frame, self.mask_level) if a is not None)


class HeldBytes:
    """Bytes of decoded frames and of results not yet published: taken when a frame is decoded, moved
    to its outcome's arrays after inference, given back once it is published. The reader waits for
    room before it reads (wait_for_room), so that memory is bounded in bytes as well as in batches:
    frames of tens of megapixels held 2 * queue_batches + 3 batches deep would otherwise take
    gigabytes (benchmarks/worker_memory.py)."""

    def __init__(self, limit_bytes: int, on_change=None):
        self.limit = limit_bytes  # 0: no bound
        self.held = 0
        self.decoding = 0  # frames handed to the decoders and not yet decoded: their size is not known yet
        self.frame_bytes = 0  # the last decoded frame's size: what the next one is taken to need (wait_for_room)
        self.changed = threading.Condition()
        self.on_change = on_change or (lambda held: None)

    def expect(self, frames: int) -> None:
        with self.changed:
            self.decoding += frames

    def decoded(self, nbytes: int, size: int = 0) -> None:
        """One expected frame decoded, now held (nbytes 0: its decoding failed, or the frame was let go
        at once; `size`, its size then, tells the frames' size all the same)."""
        with self.changed:
            self.decoding -= 1
            self.frame_bytes = nbytes or size or self.frame_bytes
            self._add(nbytes)

    def move(self, give: int, take: int) -> None:
        with self.changed:
            self._add(take - give)

    def _add(self, nbytes: int) -> None:
        self.held += nbytes
        self.on_change(self.held)
        self.changed.notify_all()

    def wait_for_room(self, batch: int, nothing_in_flight, stop: threading.Event) -> int:
        """How many frames to read next, at most `batch`: as many as fit in the room left, counting
        those still being decoded, if each is the size of the last one decoded. Waits while none fit,
        unless nothing is in flight (a frame above the whole limit still goes through, alone) or
        `stop` is set. So the limit is exceeded by less than one frame, unless the frames grow. Until
        a frame has told their size, one is read at a time: a whole first batch of frames of unknown
        size could take up to a batch more than the limit."""
        with self.changed:
            while True:
                if not self.limit:
                    return batch
                if self.frame_bytes:
                    fit = (self.limit - self.held - self.decoding * self.frame_bytes) // self.frame_bytes
                    if fit >= 1:
                        return min(batch, fit)
                elif not self.decoding:  # nothing read yet tells the frames' size: one finds it out
                    return 1
                if nothing_in_flight() or stop.is_set():
                    return 1
                self.changed.wait(0.2)


def advice(err: BaseException) -> str:
    """A refusal's advice (connection.refusal_advice) as "; <what to do>" for its log line; "" if none."""
    found = refusal_advice(err)
    return f"; {found}" if found else ""


@dataclass
class Totals:
    """Counts for the periodic summary line."""
    processed: int = 0
    anomalies: int = 0
    dead: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class SetupRefused(Exception):
    """What the start-up checks of Redis refuse (a second group on the stream, a password or database
    Redis refuses): no retry mends it, so the worker stops with exit code 2, as at start."""


# what an unexpected_shape dead letter advises: a copy, since the served bundle is the workers' (Runbook)
RECALIBRATE = ("recalibrate a copy of the model on good ones (README, Runbook: Recalibrating after a camera "
               "change)")


class Worker:
    def __init__(self, settings: WorkerSettings, engines: dict[str, Engine], client: redis.Redis | None = None,
                 server: HealthServer | None = None, setup_check: Callable[[], bool] | None = None,
                 left_pending: str = LEFT_PENDING):
        """`setup_check`: the start-up checks of Redis (worker.cli.check_redis_setup), where Redis could
        not be reached at start: run at first contact; True once they ran, False while Redis is
        unreachable, SetupRefused for what they refuse. `left_pending`: what becomes of the entries
        a stop leaves unpublished, for its log line (the demo drops them with its stream)."""
        if not engines:
            raise ValueError("a worker needs at least one model")
        self.s, self.engines, self.left_pending = settings, engines, left_pending
        self.single = next(iter(engines)) if len(engines) == 1 else None
        self.models = {category: e.info["model"] for category, e in engines.items()}  # announced (_hold_name)
        self.shapes = {category: e.bundle.frame_shapes for category, e in engines.items()}  # None: not checked
        s = settings
        self.metrics = WorkerMetrics(s.stream, s.group, list(engines))
        for engine in engines.values():
            info = engine.info
            self.metrics.model_info.labels(s.stream, info["model"], __version__, info["category"], info["backend"],
                                           info["precision"], info["device"]).set(1)
        self.redis_state = RedisState(on_change=lambda up: self._update_ready(),
                                      on_reconnect=lambda: self.metrics.reconnects.labels(s.stream).inc(),
                                      url=s.redis_url)
        password = s.redis_password.get_secret_value() if s.redis_password else None
        self.client = client or connect(s.redis_url, password, read_timeout_s=s.block_ms / 1000 + 10)
        self.io = StreamIO(self.client, s.stream, s.group, s.consumer, results_maxlen=s.results_maxlen,
                           dead_maxlen=s.dead_maxlen, dedupe_ttl_s=s.dedupe_ttl_s)
        self.stopping = threading.Event()  # stop reading; finish what was read
        self.signalled_at: float | None = None  # monotonic time of the first SIGTERM/SIGINT
        self.stop_signal: int | None = None  # that signal, for run()'s loop to act on
        self.abandon = threading.Event()  # give up on what is in flight (deadline passed, or a stage crashed)
        self.decoded: queue.Queue = queue.Queue(maxsize=s.queue_batches)
        self.scored: queue.Queue = queue.Queue(maxsize=s.queue_batches)
        self.pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="decode")
        self.held = HeldBytes(s.inflight_mb << 20, self.metrics.held.labels(s.stream).set)
        self.inflight: set[str] = set()
        self.inflight_lock = threading.Lock()
        # in flight, trimmed from the stream meanwhile (the claim reports them gone): no retry could
        # read a failed attempt's frame, so it is dead-lettered `trimmed` at once (_failed)
        self.gone_in_flight: set[str] = set()
        self.last_errors: OrderedDict[str, str] = OrderedDict()  # entry id -> its last processing error
        self.crashed: BaseException | None = None
        self.threads: list[threading.Thread] = []
        self.server = server  # the endpoints served while the models loaded (metrics.starting), taken over
        self.totals = Totals()
        self.redis_offset: float | None = None  # Redis's clock less time.monotonic() (_monitor refreshes it)
        self.time_refused = False  # Redis refused TIME (an ACL without +time)
        self.throttled = Throttled(log, s.log_interval_s)
        self.lag_known: bool | None = None  # None: not read yet
        # by category, each model's own: on a worker serving several, another model's scored frames
        # hid a broken one, whose good frames were then charged and dead-lettered
        self.failures_in_row: dict[str, int] = defaultdict(int)  # frames it failed on since it last scored one
        self.model_scored: set[str] = set()  # the categories whose model has scored a frame in this process
        self.last_beat = time.monotonic()  # when a stage last moved a batch on (alive(): stall check)
        self.name_token = uuid.uuid4().hex  # this worker's hold on its consumer name (_take_name)
        self.name_held, self.name_stamp = False, 0
        self.name_lock = threading.Lock()  # a renewal in flight, against the release at exit
        self.ready_lock = threading.Lock()
        self.name_wait: str | None = None  # why it is not reading yet: its name is another live worker's
        self.setup_check = setup_check
        self.setup_refused = False  # exit code 2

    # -- lifecycle -------------------------------------------------------------------------------
    def start_server(self) -> None:
        """Serve /metrics, /healthz and /readyz (raises OSError when the port is taken)."""
        if self.server is not None:
            self.server.serve(self.metrics.exposition, self.alive, self.ready)
        elif self.s.metrics_port:
            self.server = HealthServer(self.s.metrics_host, self.s.metrics_port, self.metrics.exposition, self.alive,
                                       self.ready)
            self.server.start()

    def stop(self) -> None:
        """Stop reading; in-flight batches are finished and published (graceful shutdown)."""
        self.stopping.set()
        self._update_ready()

    def run(self) -> int:
        """Serve until stop() or SIGTERM/SIGINT. Returns the exit code: 0 when everything read
        was published, 1 when the deadline passed first or a stage crashed (what was not published
        stays pending and is reclaimed by another worker), 2 when the start-up checks of a Redis first
        reached after the start refused it (_checked_setup)."""
        if threading.current_thread() is threading.main_thread():
            # SIGHUP too (a closed terminal, a supervisor's reload): it ended the worker at once, no log
            # line, its consumer left in the group and its name held until the hold lapsed
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                if not nohup(sig):
                    signal.signal(sig, self._on_signal)
        self.start_server()
        self._update_ready()
        s = self.s
        log.info("worker %s serving stream %s (group %s) at Redis %s with %s; batch %d", s.consumer, s.stream, s.group,
                 redis_of(self.client),
                 ", ".join(f"{c}: {e.info['model']} on {e.describe()}" for c, e in self.engines.items()), s.batch,
                 extra={"event": "start", "stream": s.stream, "group": s.group, "consumer": s.consumer,
                        "redis": redis_of(self.client),
                        "models": {c: e.info for c, e in self.engines.items()},
                        "metrics_port": self.server.port if self.server else None})
        for category, shapes in self.shapes.items():
            if shapes is None:  # a bundle from before the record (engines.frame_shapes)
                log.warning("%s records no frame shapes (an earlier ustudents made it): frames of any shape are "
                            "scored, squashed into its square; %s to have frames unlike them dead-lettered "
                            "(unexpected_shape)", self.engines[category].bundle.path, RECALIBRATE,
                            extra={"event": "shapes_unchecked", "category": category})
        stages = [("reader", self._reader), ("inference", self._inference), ("publisher", self._publisher)]
        began = time.monotonic()  # before the first read can count a gap
        self.metrics.serving_for.labels(s.stream).set_function(lambda: time.monotonic() - began)
        self.threads = [self._spawn(name, fn) for name, fn in stages]
        helpers = [self._spawn("monitor", self._monitor), self._spawn("keeper", self._keep_inflight_claimed)]
        while not self.stopping.wait(SIGNAL_POLL_S):
            if self.stop_signal is not None:
                log.info("%s received", signal.Signals(self.stop_signal).name, extra={"event": "signal"})
                self.stop()
                continue
            stalled = self.stalled_s()
            if stalled > STALL_EXIT_FACTOR * s.stall_timeout_s:
                # /healthz has failed for stall_timeout_s and nothing restarted the worker (compose
                # restarts a container that exits, not one that is unhealthy): exit, leaving what it
                # holds pending for the others
                self.crashed = RuntimeError(f"no batch moved for {stalled:.0f} s ({STALL_EXIT_FACTOR} x "
                                            f"stall_timeout_s {s.stall_timeout_s:g} s)")
                log.error("stalled: %s; exiting so that a fresh worker starts", self.crashed,
                          extra={"event": "stalled_exit"})
                self.abandon.set()
                self.stop()
        deadline = time.monotonic() + s.shutdown_timeout_s
        if self.crashed is None:
            log.info("stopping: finishing the batches in flight (deadline %.0f s)", s.shutdown_timeout_s,
                     extra={"event": "stopping"})
        for t in self.threads:
            # In slices: the kernel may give a signal (a person's second Ctrl-C) to any thread, and
            # Python runs its handler in this one, which a join does not wake for: the forced exit
            # waited for the stage to finish or the deadline to pass.
            while t.is_alive() and time.monotonic() < deadline:
                t.join(min(JOIN_SLICE_S, max(0.0, deadline - time.monotonic())))
        drained = not any(t.is_alive() for t in self.threads) and not self.abandon.is_set()
        if not drained:
            self.abandon.set()
            with self.inflight_lock:
                left = len(self.inflight)
            why = "a stage stopped" if self.crashed is not None else "shutdown deadline passed"
            log.warning("%s with %d entries unpublished; %s", why, left, self.left_pending,
                        extra={"event": "stop_incomplete", "left": left})
        elif self.name_held:  # never another live worker's consumer, whose just-read entries would go with it
            try:
                self.io.delete_consumer_if_idle()
            except redis.RedisError:
                pass
        held, self.name_held = self.name_held, False  # the keeper renews no more
        # free at once for a restart under the same name, drained or not; not while a renewal is in
        # flight, which would set it again after the release (a renewal stuck on Redis: it lapses)
        if held and self.name_lock.acquire(timeout=2.0):
            try:
                self.io.release_name(self.name_token)
            except redis.RedisError:
                pass  # it lapses within NAME_HOLD_S
            finally:
                self.name_lock.release()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for t in helpers:  # so that none reports on a Redis its caller stops after run() (the demo's)
            t.join(2.0)
        if self.server:
            self.server.stop()
        code = 2 if self.setup_refused else 0 if drained and self.crashed is None else 1
        log.info("worker stopped (exit %d): %d frames processed, %d dead-lettered", code, self.totals.processed,
                 sum(self.totals.dead.values()), extra={"event": "stop", "exit_code": code})
        return code

    def _on_signal(self, signum, frame) -> None:
        # Python runs this in the main thread between two of its bytecodes, also while that thread holds
        # a lock: Event.wait in run()'s loop holds the Event's own lock at moments, and stop() (Event.set)
        # here then waited for it for ever, a worker that never exited. So no such lock is taken here
        # (logging's are re-entrant): the stop is recorded, and run()'s loop stops the worker.
        now = time.monotonic()
        if self.signalled_at is not None and now - self.signalled_at < REPEATED_SIGNAL_S:
            # one stop sent twice: GNU timeout signals the worker, then its own process group, and so
            # do some supervisors; a person's second Ctrl-C comes later
            log.info("%s again at once: taken as the same stop", signal.Signals(signum).name, extra={"event": "signal"})
            return
        if self.stopping.is_set() or self.stop_signal is not None:
            try:
                log.warning("second %s: exiting now; unpublished entries stay pending for other workers",
                            signal.Signals(signum).name, extra={"event": "forced_exit"})
            finally:  # whatever the line met (a log handler that raised): the exit asked for
                os._exit(1)
        self.signalled_at, self.stop_signal = now, signum

    def _spawn(self, name: str, target) -> threading.Thread:
        def run():
            try:
                target()
            except BaseException as err:  # a bug: stop rather than hang; pending entries are reclaimed
                self.crashed = err
                if isinstance(err, ModelFailing):
                    log.error("%s", err, extra={"event": "model_failing", "stage": name})
                else:
                    log.exception("worker stage %s crashed; stopping", name, extra={"event": "crash", "stage": name})
                self.abandon.set()
                self.stop()
        t = threading.Thread(target=run, name=f"worker-{name}", daemon=True)
        t.start()
        return t

    # -- health ----------------------------------------------------------------------------------
    def alive(self) -> tuple[bool, str]:
        if self.crashed is not None:
            return False, f"a worker stage crashed: {self.crashed!r}"
        dead = [t.name for t in self.threads if not t.is_alive()]
        if dead and not self.stopping.is_set():
            return False, f"stopped threads: {', '.join(dead)}"
        idle = self.stalled_s()
        if idle > self.s.stall_timeout_s:
            # threads alive but nothing moves: a call that never returns (a hung GPU, a stuck decoder);
            # only a restart helps, and the entries held stay pending for the next worker
            with self.inflight_lock:
                held = len(self.inflight)
            return False, f"no batch moved for {idle:.0f} s with {held} entries in flight (stall_timeout_s)"
        return True, "alive"

    def stalled_s(self) -> float:
        """How long nothing has moved while entries are in flight (0 when none is)."""
        with self.inflight_lock:
            held = len(self.inflight)
        return time.monotonic() - self.last_beat if held else 0.0

    def _beat(self) -> None:
        self.last_beat = time.monotonic()

    def _hold(self, ids) -> None:
        """Put entries in flight. The first after an idle spell starts the stall clock: the last beat
        was before the spell, and an hour idle is no stall."""
        with self.inflight_lock:
            if not self.inflight:
                self._beat()
            self.inflight.update(ids)

    def ready(self) -> tuple[bool, str]:
        if self.stopping.is_set():
            return False, "shutting down"
        if self.name_wait:
            return False, self.name_wait
        if self.redis_state.up is not True:
            if self.redis_state.password_refused:
                return False, "redis refuses the worker's password"
            return False, "redis unreachable" if self.redis_state.up is False else "connecting to redis"
        refusing = dict(self.redis_state.refusing)
        if refusing:
            return False, "redis refuses " + "; ".join(f"the {stage} ({err})" for stage, err in sorted(refusing.items()))
        return True, "model loaded, redis reachable"

    def _update_ready(self) -> None:
        with self.ready_lock:  # two threads' changes at once: the gauge ends as ready() ends
            self.metrics.ready.labels(self.s.stream).set(1 if self.ready()[0] else 0)

    # -- queues that give up when the worker abandons its work -------------------------------------
    def _put(self, q: queue.Queue, item) -> bool:
        while not self.abandon.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def _get(self, q: queue.Queue):
        while not self.abandon.is_set():
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                pass
        return STOP

    def _refused(self, err: redis.ResponseError, op: str) -> None:
        """Redis refused the reader's `op`. Each operation is its own refusal, ended only by its own
        success: at its memory cap Redis refuses the publish script and the group's writes but not the
        claim, whose success every claim period made a worker that could read nothing new ready again."""
        self.redis_state.refused(f"reader's {op}", err)
        self.throttled.warning("redis_refused", "Redis refused the reader's %s (%s); retrying with backoff%s",
                               op, err, advice(err), event="redis_refused", error=str(err), operation=op)

    def _accepted(self, *ops: str) -> None:
        self.redis_state.ok()
        for op in ops:
            self.redis_state.accepted(f"reader's {op}")

    def _retry(self, call, interrupt: threading.Event, op: str):
        """call() until Redis answers and takes it; None if `interrupt` is set first. `op` names it."""
        backoff = Backoff(self.s.backoff_max_s)
        while True:
            try:
                out = call()
                self._accepted(op)
                return out
            except UNAVAILABLE as err:
                self.redis_state.failed(err)
            except redis.ResponseError as err:
                if not refusal(err):
                    raise
                self._refused(err, op)  # reachable, but refusing for now (failover, full)
            self._beat()  # waiting on Redis (readiness says so), not hung
            if backoff.wait(interrupt):
                return None

    # -- stage 1: reading ------------------------------------------------------------------------
    def _hold_name(self, stale: str = "") -> bool | str:
        self.name_stamp += 1
        held = self.io.hold_name(self.name_token, NAME_HOLD_S * 1000, self.name_stamp, stale)
        if held is True:
            try:  # for the group's other workers to compare (_compare_models): a help, never a stop
                self.io.announce_models(self.models, NAME_HOLD_S * 1000)
            except redis.RedisError:
                pass
        return held

    def _checked_setup(self) -> bool:
        """Redis was unreachable at start, so the start-up checks that refuse a second consumer group on
        the stream, a database Redis does not have or a password it refuses were skipped: the worker
        served as a second group, crashed with a traceback, or waited for ever. They run at first
        contact; what they refuse stops the worker (exit code 2). False when it stops first."""
        if self.setup_check is None:
            return True
        backoff = Backoff(self.s.backoff_max_s)
        while not self.stopping.is_set():
            try:
                if self.setup_check():
                    return True
            except SetupRefused as err:
                log.error("%s", err, extra={"event": "setup_refused"})
                self.setup_refused = True
                self.stop()
                return False
            if backoff.wait(self.stopping):
                break
        return False

    def _take_name(self) -> bool:
        """Hold this worker's consumer name before reading (StreamIO.hold_name). Another worker's
        hold is waited out, not ready meanwhile; one that is renewed over a renewal period is a live
        worker's: a default name (hostname-pid; containers on the host's network share hostname and
        pid 1) then gets a random suffix, a name given by --consumer is waited for as long as it is
        renewed. One that is not renewed (a dead worker's) lapses within NAME_HOLD_S, or is taken
        over once seen unrenewed for longer (a hold Redis keeps past its time). False when stopped
        first."""
        given, seen, seen_since = "consumer" in self.s.model_fields_set, None, 0.0
        while not self.stopping.is_set():
            # a hold unrenewed, on this worker's clock, for longer than a hold lasts is a dead worker's,
            # though Redis's clock stepped back keeps it (helper-107: an hour, the line not served)
            stale = seen if seen is not None and time.monotonic() - seen_since > NAME_HOLD_S + NAME_RENEW_S else ""
            held = self._retry(lambda: self._hold_name(stale), self.stopping, "name hold")
            if held is None:
                return False
            if held is True:
                if stale:
                    log.warning("consumer name %s: its hold went unrenewed for %.0f s, longer than a hold lasts, yet "
                                "Redis kept it (its clock stepped back?): a dead worker's, taken over", self.s.consumer,
                                time.monotonic() - seen_since,
                                extra={"event": "consumer_name_stale", "consumer": self.s.consumer})
                elif self.name_wait:
                    log.info("consumer name %s is free: reading", self.s.consumer,
                             extra={"event": "consumer_name_free", "consumer": self.s.consumer})
                self.name_held, self.name_wait = True, None
                self._update_ready()
                return True
            if seen is None:
                self.name_wait = (f"consumer name {self.s.consumer} is held: waiting for it (a dead worker's hold "
                                  f"lapses within {NAME_HOLD_S} s)")
            elif held != seen and not given:  # renewed: a live worker's
                taken, self.s = self.s.consumer, self.s.model_copy(
                    update={"consumer": f"{self.s.consumer}-{uuid.uuid4().hex[:6]}"})
                self.io.consumer = self.s.consumer
                log.warning("consumer name %s is held by another live worker (containers on the host's network "
                            "share its hostname and pid 1); this one reads as %s", taken, self.s.consumer,
                            extra={"event": "consumer_renamed", "consumer": self.s.consumer, "taken": taken})
                seen = None
                continue
            elif held != seen and not self.name_wait.startswith("consumer name held by another live worker"):
                self.name_wait = (f"consumer name held by another live worker: {self.s.consumer}; waiting for it (two "
                                  "workers given one --consumer would share one pending list: give each its own)")
                log.warning("%s", self.name_wait, extra={"event": "consumer_name_held", "consumer": self.s.consumer})
            self._update_ready()
            if held != seen:
                seen, seen_since = held, time.monotonic()
            if self.stopping.wait(1.0):
                return False
        return False

    def _reader(self) -> None:
        if not self._checked_setup() or not self._take_name():
            self._put(self.decoded, STOP)
            return
        s = self.s
        backoff = Backoff(s.backoff_max_s)
        history: str | None = "0"  # own pending entries first, from the start of the PEL
        claim_period = max(0.05, s.claim_idle_ms / 2000)
        # a stop waits for the blocked read: within half the shutdown deadline, whatever block_ms says
        block_ms = max(1, min(s.block_ms, int(s.shutdown_timeout_s * 500)))
        claim_at, claim_cursor = time.monotonic() + claim_period, "0-0"
        claim_clock: float | None = None  # Redis's clock less the monotonic one at the last claim
        group_ready = had_group = group_missing = False
        while not self.stopping.is_set():
            count = self.held.wait_for_room(s.batch, self._nothing_in_flight, self.stopping)
            if self.stopping.is_set():
                break
            # what this pass asks of Redis, in order: the last is the one an error came from; each is retried
            # until it goes through (the group made, the pending read, the claim, the new read)
            ops: list[str] = []
            try:
                if not group_ready:
                    ops.append("group check")
                    start = self.io.ensure_group()
                    where = "the stream's start" if start == "0" else "the newest with an outcome"
                    if had_group and (start is not None or group_missing):
                        # counted by each worker that was reading the group: the one that makes it again, and
                        # those that found it missing (NOGROUP) and another had made it again meanwhile
                        self.metrics.group_lost.labels(s.stream).inc()
                    if start is not None and had_group:
                        # the group this worker read from is gone: Redis came back without its data (no
                        # AOF), or the group or stream was deleted. Its pending list went with it: frames
                        # a worker no longer running had read are lost; running workers still publish theirs.
                        log.warning("consumer group %s on %s was gone (Redis restarted without persistence, or the "
                                    "group or stream deleted): made it again, reading after entry %s (%s). Frames "
                                    "read by a worker no longer running are lost, and where Redis lost its data so "
                                    "are those it held unread; frames running workers hold are still judged. Keep "
                                    "Redis's data with AOF (appendonly yes)",
                                    s.group, s.stream, start, where, extra={"event": "group_lost", "entry_id": start})
                    elif start is not None:
                        log.info("created consumer group %s on %s, reading after entry %s (%s)", s.group, s.stream,
                                 start, where, extra={"event": "group_created", "entry_id": start})
                    if not had_group and self.io.unwritten:
                        # a typo in --stream, or a Redis URL without the camera's database: the worker was
                        # ready on an empty stream of its own, the line unserved, and nothing said so. Not a
                        # WARNING: workers started before their camera (the runbook's order) see the same
                        log.info("stream %s at Redis %s has received no frame yet. If a camera already publishes "
                                 "to this line, check the stream's name and the Redis database: its frames wait "
                                 "there for a worker", s.stream, redis_of(self.client), extra={"event": "no_frames_yet"})
                    group_ready = had_group = True
                    group_missing = False
                deleted: list[str] = []
                if claim_clock is None and not self.time_refused:  # the first claim's leap is measured too
                    claim_clock = self._redis_clock()
                if history is not None:
                    ops.append("pending read")
                    raw = self.io.read(history, count, None)
                    source = "pending"
                    if not raw:
                        history = None
                        self._accepted(*ops)
                        continue
                    history = raw[-1][0].decode()
                elif time.monotonic() >= claim_at:
                    ops.append("claim")
                    leapt, claim_clock = self._redis_clock_leap(claim_clock)
                    if leapt:
                        # Redis times the entries' idle on its clock: stepped forward, every pending entry
                        # looks abandoned, live workers' in-flight ones too. Their keepers refresh them
                        # within claim_idle_ms / 3: claim after that (they were scored twice: helper-107)
                        claim_at = time.monotonic() + s.claim_idle_ms / 2000
                        self._accepted(*ops[:-1])
                        continue
                    claim_cursor, raw, deleted = self.io.autoclaim(s.claim_idle_ms, claim_cursor, count)
                    claim_at = time.monotonic() + (0 if claim_cursor != "0-0" else claim_period)
                    source = "claimed"
                    if raw or deleted:
                        log.info("claimed %d entries left pending by silent consumers", len(raw) + len(deleted),
                                 extra={"event": "claimed", "entries": len(raw) + len(deleted)})
                else:
                    ops.append("new read")
                    raw, lost = self.io.read_new(count)
                    source = "new"
                    if lost:  # reported before the wait below, which may fail: the gap is counted once
                        self._trimmed_unread(lost)
                    if not raw:  # the same operation: a refusal of it ends when either read goes through
                        raw = self.io.read(">", count, block_ms)
                self._accepted(*ops)
                backoff.reset()
            except UNAVAILABLE as err:
                self.redis_state.failed(err)
                group_ready = False
                # Redis may have handed out entries whose reply was lost: they sit pending on this
                # consumer, and no one else takes them before claim_idle_ms. Read them back first.
                history = "0"
                if backoff.wait(self.stopping):
                    break
                continue
            except redis.ResponseError as err:
                if refusal(err):  # reachable, but refusing for now (failover, full)
                    self._accepted(*ops[:-1])
                    self._refused(err, ops[-1])
                elif "NOGROUP" in str(err):  # said where the group is made again (or by the worker that does)
                    group_missing = had_group
                elif unblocked(err):
                    log.warning("Redis ended the blocked read (%s); checking the group and reading on", err,
                                extra={"event": "read_unblocked", "error": str(err)})
                elif "WRONGTYPE" in str(err):  # a stray SET on one of the line's keys: wait for it to be fixed,
                    self.redis_state.refused(f"reader's {ops[-1]}", err)  # not ready meanwhile (nothing is read)
                    self.throttled.warning("stream_wrongtype", "%s, %s:results or %s:dead is a Redis key of another "
                                           "type, not a stream (TYPE tells which); waiting for it to be fixed",
                                           s.stream, s.stream, s.stream, event="stream_wrongtype", error=str(err))
                else:
                    raise
                group_ready = False
                if backoff.wait(self.stopping):
                    break
                continue
            entries = [Entry(eid.decode(), fields) for eid, fields in raw] + [Entry(eid, {}) for eid in deleted]
            if source != "new":  # our own pending entries include those that wait in the pipeline
                with self.inflight_lock:
                    # in flight and gone from the stream: a failed attempt at one cannot be retried
                    self.gone_in_flight.update(i for i in deleted if i in self.inflight)
                    entries = [e for e in entries if e.id not in self.inflight]
                if source == "pending":  # a failed attempt's frame waits claim_idle_ms for its retry
                    entries = [e for e in entries if e.id not in self.last_errors]
            if entries and not (self._send(entries) if source == "new" else self._send_redelivered(entries)):
                break
        self._put(self.decoded, STOP)

    def _nothing_in_flight(self) -> bool:
        with self.inflight_lock:
            return not self.inflight

    def _trimmed_unread(self, lost: int) -> None:
        """Frames the producer's MAXLEN cut before any worker read them (StreamIO.read_new): lost, with
        no dead letter, since their fields are gone."""
        s = self.s
        if lost > 0:
            self.metrics.trimmed_unread.labels(s.stream).inc(lost)
            what = f"{lost} entries left stream {s.stream} before any worker read them: lost"
        else:  # the group has no read counter (made at an id, a Redis restart), or entries were deleted
            what = (f"entries may have left stream {s.stream} before any worker read them (Redis cannot tell "
                    "whether or how many: the group has no read counter, or entries were deleted ahead of it)")
        # a possible loss is its only trace (no count, no alert): never held back behind a counted one
        self.throttled.warning("trimmed_unread" if lost > 0 else "trimmed_unread_unknown", "%s; the backlog outgrew "
                               "the input stream's MAXLEN: add workers or raise the producer's MAXLEN", what,
                               event="trimmed_unread", entries=lost if lost > 0 else None)

    def _send(self, entries: list[Entry]) -> bool:
        """Prepare a micro-batch and queue it for inference; False if the worker abandons it first."""
        work = self._retry(lambda: self._prepare(entries), self.abandon, "frame preparation")
        self._beat()
        return work is not None and self._put(self.decoded, work)

    def _send_redelivered(self, entries: list[Entry]) -> bool:
        """Entries handed out before and never completed (this consumer's own pending after a
        restart, or claimed from a silent one). Their earlier attempt may have killed a worker (a
        decoder or driver crash, an OOM kill), and with it every frame of its batch. So each is
        processed alone, nothing else in flight from its decoding to its publishing, and counted in
        Redis before it starts: the frame that kills workers reaches max_deliveries by itself and is
        dead-lettered, and the frames that only shared its batch are scored."""
        done = self._retry(lambda: self.io.done(entries), self.abandon, "done-marker check")
        if done is None:
            return False
        for e, d in zip(entries, done):
            e.already_done = d
        settled = [e for e in entries if e.already_done or not e.fields]  # acknowledge, or dead-letter as trimmed
        suspects = [e for e in entries if not (e.already_done or not e.fields)]
        self._hold(e.id for e in suspects)  # kept claimed (keeper) while they wait their turn
        if settled and not self._send(settled):
            return False
        if suspects:
            log.info("%d entries were handed out before and never completed (a worker died or failed on them): "
                     "processing them one at a time", len(suspects),
                     extra={"event": "redelivered", "entries": len(suspects)})
        waiting = {e.id for e in suspects}
        for e in suspects:
            # alone: what was read before has been published, and nothing is read until it is
            if not self._wait_until(lambda: self.inflight <= waiting):
                return False
            tries = None
            if not self.stopping.is_set():
                token = f"{self.s.consumer}:{uuid.uuid4().hex}"  # one per attempt: a resent count counts once
                tries = self._retry(lambda: self.io.begin_attempt(e.id, token), self.stopping, "attempt count")
                e.token = token
            if tries is None:  # stopping: the rest stay pending, uncounted, for the restarted worker or another one
                with self.inflight_lock:
                    self.inflight.difference_update(waiting)
                return not self.abandon.is_set()
            e.attempt = tries + 1  # its first attempt was in the batch it was first delivered in
            waiting.discard(e.id)
            if not self._send([e]):
                return False
        return self._wait_until(lambda: not (self.inflight & {e.id for e in suspects}))

    def _wait_until(self, condition) -> bool:
        """Until condition() holds (checked under inflight_lock); False if the worker abandons first."""
        while not self.abandon.is_set():
            with self.inflight_lock:
                if condition():
                    return True
            time.sleep(0.01)  # no _beat(): waiting is not progress (a hung stage must still fail /healthz)
        return False

    def _prepare(self, entries: list[Entry]) -> Work:
        """Check each entry (published already? attempted too often? has an image? a model for it?),
        fetch `image_key` payloads, and start decoding."""
        s = self.s
        ids = [e.id for e in entries]
        keyed = [i for i, e in enumerate(entries)
                 if schema.IMAGE.encode() not in e.fields and schema.IMAGE_KEY.encode() in e.fields]
        # the key's own bytes: a name that is not UTF-8 must not be looked up as another one
        fetched = dict(zip(keyed, self.io.fetch_images([entries[i].fields[schema.IMAGE_KEY.encode()] for i in keyed],
                                                       s.max_frame_bytes))) if keyed else {}
        prepared: list[Future | schema.DeadLetter | None] = []
        categories: list[str | None] = []
        for i, e in enumerate(entries):
            category = None
            if e.already_done:
                item = None
            elif not e.fields:
                item = schema.DeadLetter(schema.TRIMMED, "the entry was removed from the input stream (MAXLEN "
                                                         "trimming or XDEL) before it was processed")
            elif e.attempt > s.max_deliveries:
                last = self.last_errors.get(e.id, "none recorded here: the worker died while processing it")
                item = schema.DeadLetter(schema.MAX_DELIVERIES, (
                    f"{e.attempt - 1} attempts at it did not complete (max_deliveries={s.max_deliveries}): a worker "
                    f"failed on it or died processing it, each attempt after the first with no other frame in "
                    f"flight; last error: {last}"))
            elif (wrong := schema.version_error(e.fields)) is not None:
                item = wrong
            else:
                category = self._category(e.fields)
                if isinstance(category, schema.DeadLetter):
                    item, category = category, None
                else:
                    data = codec.payload(e.fields, fetched.get(i), s.max_frame_bytes)
                    if not isinstance(data, schema.DeadLetter):
                        self.held.expect(1)
                    item = data if isinstance(data, schema.DeadLetter) else \
                        self.pool.submit(self._decode, data, f"entry {e.id} of {s.stream}", category)
            prepared.append(item)
            categories.append(category)
        self._hold(ids)
        return Work(entries, prepared, categories)

    def _decode(self, data: bytes, source: str, category: str) -> np.ndarray:
        """codec.decode for the category's model, its frame counted as held from here until it is scored
        (HeldBytes); UnexpectedShape where the model knows no such frames (engines.frame_shapes)."""
        frame = decoded = None
        shapes = self.shapes[category]
        try:
            decoded = codec.decode(data, source, self.engines[category].bundle.uint16_bits)
            frame = decoded if shapes is None else shapes.check(decoded, source, RECALIBRATE)
            return frame
        finally:
            # a frame of an unexpected shape is let go, but tells the frames' size: a camera whose every
            # frame changed shape was read one frame at a time (wait_for_room), its backlog growing
            self.held.decoded(0 if frame is None else frame.nbytes, 0 if decoded is None else decoded.nbytes)

    def _category(self, fields: dict[bytes, bytes]) -> str | schema.DeadLetter:
        category = schema.text(fields, schema.CATEGORY) or None  # "": a producer's unset variable, no category
        if category is None and self.single is not None:
            return self.single
        if category in self.engines:
            return category
        served = ", ".join(self.engines)
        if category is None:
            return schema.DeadLetter(schema.UNKNOWN_CATEGORY, f"no `category` (the field is absent or empty), and this "
                                     f"worker serves several: {served}; send the model's category with each frame")
        return schema.DeadLetter(schema.UNKNOWN_CATEGORY, f"category {category!r} is not served here (serving {served})")

    # -- stage 2: inference ----------------------------------------------------------------------
    def _inference(self) -> None:
        while True:
            work = self._get(self.decoded)
            if work is STOP:
                break
            outcomes = self._infer(work)
            work.prepared = []  # its futures hold the decoded frames, which the outcomes keep only for the overlay
            self._beat()
            if not self._put(self.scored, (work, outcomes)):
                break
        self._put(self.scored, STOP)

    def _infer(self, work: Work) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(work.entries)
        by_category: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for i, (entry, item, category) in enumerate(zip(work.entries, work.prepared, work.categories)):
            if item is None:
                out[i] = Outcome("ack")
            elif isinstance(item, schema.DeadLetter):
                out[i] = Outcome("dead", dead=item)
            else:
                try:
                    by_category[category].append((i, item.result()))
                except UnexpectedShape as err:
                    out[i] = Outcome("dead", dead=schema.DeadLetter(schema.UNEXPECTED_SHAPE, str(err)))
                except ImageError as err:
                    out[i] = Outcome("dead", dead=schema.DeadLetter(schema.DECODE_ERROR, str(err)))
                except Exception as err:  # noqa: BLE001 (anything else is retried, then dead-lettered)
                    out[i] = self._failed(entry, err, category)
        for category, items in by_category.items():
            engine = self.engines[category]
            frames = [f for _, f in items]
            t0 = time.perf_counter()
            try:
                predictions: list[Prediction | Exception] = list(engine.predict(frames, maps=self.s.heatmap))
            except Exception as err:  # noqa: BLE001 (isolate the frame that fails)
                if len(frames) == 1:
                    predictions = [err]
                else:
                    self.throttled.warning(f"batch_failed{self._of(category)}", "a batch of %d frames%s failed (%s: %s); "
                                           "scoring them one by one", len(frames), self._of(category),
                                           type(err).__name__, err, event="batch_failed")
                    predictions = [self._predict_one(engine, f) for f in frames]
            self.metrics.inference.labels(self.s.stream).observe(time.perf_counter() - t0)
            self.metrics.batch_size.labels(self.s.stream).observe(len(frames))
            for (i, frame), p in zip(items, predictions):
                out[i] = (self._failed(work.entries[i], p, category) if isinstance(p, Exception) else
                          self._scored(frame, p, category))
                self.held.move(frame.nbytes, out[i].held)
                self.failures_in_row[category] = self.failures_in_row[category] + 1 if isinstance(p, Exception) else 0
                if not isinstance(p, Exception):
                    self.model_scored.add(category)
            if self.failures_in_row[category] >= self.s.max_failures_in_row:
                # raised before this batch is published: its frames stay pending, none dead-lettered,
                # and none charged the attempt the broken model made
                self._drop_attempts([], [(e.id, e.token) for e in work.entries if e.token])
                which = self._of(category)
                raise ModelFailing(
                    f"the model{which} failed on the last {self.failures_in_row[category]} {'of its ' if which else ''}"
                    "frames in a row, none scored between "
                    f"(last: {type(predictions[-1]).__name__}: {predictions[-1]}): the model or the device is broken, not the frames; "
                    "stopping (exit 1) with the frames left pending for a restarted or another worker. "
                    "Check the model (`ustudents predict MODEL IMAGE`) and the GPU")
        return out  # type: ignore[return-value]

    def _scored(self, frame: np.ndarray, p: Prediction, category: str) -> Outcome:
        overlay = self.s.heatmap  # predict kept the full-size maps only for the overlay
        return Outcome("scored", score=p.score, anomalous=p.anomalous, mask=p.mask, category=category,
                       frame=frame if overlay else None, mask_level=p.mask_level if overlay else None)

    def _predict_one(self, engine: Engine, frame: np.ndarray) -> Prediction | Exception:
        try:
            return engine.predict([frame], maps=self.s.heatmap)[0]
        except Exception as err:  # noqa: BLE001
            return err

    def _of(self, category: str) -> str:
        """' of category 'x'' where the worker serves several models, else nothing: which model, in lines."""
        return f" of category {category!r}" if len(self.engines) > 1 else ""

    def _failed(self, entry: Entry, err: BaseException, category: str) -> Outcome:
        """A frame whose processing raised: dead-lettered on its last allowed delivery, else left
        pending (not acknowledged) for another attempt once it has been idle `claim_idle_ms`."""
        self.metrics.failures.labels(self.s.stream, category).inc()
        message = f"{type(err).__name__}: {err}"
        # Nothing scored yet in this process: the fault may be the model's or the device's (a
        # restarted worker whose model fails on every frame), so the attempt is not charged to the
        # frame (its count is taken back); ModelFailing ends such a worker.
        charged = category in self.model_scored
        with self.inflight_lock:
            gone = entry.id in self.gone_in_flight
        if gone:  # no retry can read it: the stream lost it during this attempt
            return Outcome("dead", dead=schema.DeadLetter(schema.TRIMMED, (
                f"the entry was removed from the input stream (MAXLEN trimming or XDEL) while attempt "
                f"{entry.attempt} processed it, and that attempt failed: {message}")))
        if charged and entry.attempt >= self.s.max_deliveries:
            return Outcome("dead", dead=schema.DeadLetter(
                schema.MAX_DELIVERIES, f"failed on attempt {entry.attempt} of max_deliveries="
                                       f"{self.s.max_deliveries}: {message}"))
        self.last_errors[entry.id] = message
        while len(self.last_errors) > 10_000:
            self.last_errors.popitem(last=False)
        # by model: a working model's retries held back a broken one's lines
        self.throttled.warning(f"frame_failed{self._of(category)}", "entry %s%s failed on attempt %d (%s); it stays "
                               "pending for a retry%s", entry.id, self._of(category), entry.attempt, message,
                               "" if charged else f" (not counted: this worker's model{self._of(category)} has scored "
                                                  "no frame yet)",
                               event="frame_failed", entry_id=entry.id)
        return Outcome("failed", error=message, uncharge=None if charged else entry.token)

    # -- stage 3: publishing ---------------------------------------------------------------------
    def _publisher(self) -> None:
        while True:
            item = self._get(self.scored)
            if item is STOP:
                break
            work, outcomes = item
            records = [r for r in (self._record(e, o) for e, o in zip(work.entries, outcomes)) if r is not None]
            written = self._publish(records) if records else []
            if written is None:  # abandoned: stays pending
                break
            self._account(written, {e.id: (e, o) for e, o in zip(work.entries, outcomes)})
            self.held.move(sum(o.held for o in outcomes), 0)
            self._drop_attempts([e.id for e, o in zip(work.entries, outcomes) if e.attempt > 1 and o.kind != "failed"],
                                [(e.id, o.uncharge) for e, o in zip(work.entries, outcomes) if o.uncharge])
            with self.inflight_lock:
                self.inflight.difference_update(e.id for e in work.entries)
                self.gone_in_flight.difference_update(e.id for e in work.entries)
            self._beat()

    def _drop_attempts(self, ids: list[str], taken_back: list[tuple[str, str]] = ()) -> None:
        """StreamIO.forget_attempts, best effort: a count left behind expires (TRIES_TTL_S), and an
        attempt not taken back costs the frame one attempt at most."""
        if ids or taken_back:
            try:
                self.io.forget_attempts(ids, taken_back)
            except (*UNAVAILABLE, redis.ResponseError):
                pass

    def _record(self, entry: Entry, outcome: Outcome) -> Record | None:
        s = self.s
        if outcome.kind == "ack":
            return Record(entry.id, None, fingerprint=entry.fingerprint)
        if outcome.kind == "failed":
            return None
        if outcome.kind == "dead":
            return Record(entry.id, self.io.dead, schema.dead_entry(entry.id, entry.fields, outcome.dead, s.dead_image_max_bytes),
                          kind=f"dead:{outcome.dead.reason}", fingerprint=entry.fingerprint)
        engine, o = self.engines[outcome.category], outcome
        heatmap = codec.heatmap_png(o.frame, o.mask_level, engine.mask_threshold, o.mask) if s.heatmap else None
        fields = schema.result_entry(
            entry.id, entry.fields, score=o.score, anomalous=o.anomalous, threshold=engine.image_threshold,
            mask_png=codec.mask_png(o.mask), model=engine.info["model"],
            latency_ms=(time.monotonic() - entry.received) * 1000, consumer=s.consumer, heatmap_png=heatmap)
        return Record(entry.id, self.io.results, fields, received=entry.received, fingerprint=entry.fingerprint)

    def _publish(self, records: list[Record]) -> list[Record] | None:
        """streams.publish until it succeeds; None if the worker abandons its work first."""
        backoff, attempt = Backoff(self.s.backoff_max_s), uuid.uuid4().hex  # one token over the retries
        while True:
            now = time.monotonic()
            for rec in records:  # up to this attempt: a publish that waited on Redis counts in the latency
                if rec.received is not None:
                    rec.fields[schema.LATENCY_MS] = f"{(now - rec.received) * 1000:.3f}"
            try:
                written = self.io.publish(records, attempt)
                self.redis_state.ok()
                self.redis_state.accepted("publisher")
                return written
            except UNAVAILABLE as err:
                self.redis_state.failed(err)
            except (PublishRefused, redis.ResponseError) as err:
                if not (isinstance(err, PublishRefused) or refusal(err)):
                    raise
                # nothing was written or acknowledged: the results wait here and the frames stay
                # pending, until the key is fixed or Redis takes writes again
                self.redis_state.refused("publisher", err)
                self.throttled.warning("publish_refused", "Redis refused the results (%s); retrying%s", err,
                                       advice(err), event="publish_refused", error=str(err))
            self._beat()  # waiting on Redis (readiness says so), not hung
            if backoff.wait(self.abandon):
                return None

    def _redis_clock(self, ask_if_refused: bool = False) -> float | None:
        """Redis's clock less the monotonic one, read now (and kept in redis_offset); None where Redis
        refuses TIME (a user allowed what the worker needed before it measured on Redis's clock: the
        start's check asks for +time, the demo's does not): the end-to-end latency then goes
        unmeasured, said in the log, and nothing else stops. Once refused, asked again only where
        `ask_if_refused` (the monitor), not at every batch or claim. Unreachable: raised."""
        if self.time_refused and not ask_if_refused:
            return None
        try:
            self.redis_offset, self.time_refused = self.io.clock_offset(), False
            return self.redis_offset
        except UNAVAILABLE:
            raise
        except redis.RedisError as err:
            self.time_refused = True
            self.throttled.warning("time_refused", "Redis refused TIME (%s): the end-to-end latency is not measured; "
                                   "allow the worker's user +time", err, event="time_refused")
            return None

    def _redis_clock_leap(self, before: float | None) -> tuple[bool, float | None]:
        """Whether Redis's clock went forward against the monotonic one since `before` (the reading at
        the last claim) by more than a keeper's period allows (claim_idle_ms / 3 can leave an entry
        claimable: half of it, CLOCK_LEAP_S at most), said in the log; and the reading now."""
        now = self._redis_clock()
        limit = max(0.05, min(CLOCK_LEAP_S, self.s.claim_idle_ms / 6000))
        if before is None or now is None or now - before <= limit:
            return False, now
        log.warning("Redis's clock leapt %.1f s forward: its pending entries' idle times did too, so claiming now "
                    "would take live workers' frames for abandoned ones; claiming after their keepers refresh them. "
                    "Let the Redis host's clock slew, not step (README, Operations)", now - before,
                    extra={"event": "redis_clock_leap", "leap_s": round(now - before, 1)})
        return True, now

    def _redis_now(self) -> float | None:
        """Redis's clock now (Unix seconds), from the offset _monitor keeps; None while it has none (read
        here once, as results were published: Redis answers)."""
        if self.redis_offset is None:
            try:
                self._redis_clock()
            except UNAVAILABLE:
                return None
        return None if self.redis_offset is None else time.monotonic() + self.redis_offset

    def _account(self, written: list[Record], by_id: dict[str, tuple[Entry, Outcome]]) -> None:
        m, stream, now = self.metrics, self.s.stream, self._redis_now()
        for rec in written:
            entry, outcome = by_id[rec.entry_id]
            if outcome.kind == "dead":
                reason = outcome.dead.reason
                m.dead_lettered.labels(stream, reason).inc()
                self.totals.dead[reason] += 1
                self.throttled.warning(f"dead:{reason}", "entry %s dead-lettered (%s): %s", entry.id, reason,
                                       outcome.dead.error, event="dead_letter", reason=reason, entry_id=entry.id)
                continue
            category = outcome.category
            m.processed.labels(stream, category).inc()
            m.observe_score(category, outcome.score, self.engines[category].image_threshold)
            self.totals.processed += 1
            if outcome.anomalous:
                m.anomalies.labels(stream, category).inc()
                self.totals.anomalies += 1
            age = None if now is None else now - StreamIO.arrival(entry.id)
            if age is not None and age >= -ARRIVAL_AHEAD_S:
                m.end_to_end.labels(stream).observe(max(0.0, age))  # below 0 by the offset's error only: 0
            elif age is not None:
                self.throttled.warning("arrival", "entry %s: its id's time is %.0f s ahead of Redis's clock, so it is "
                                       "no arrival time (an id a producer set, and every id Redis makes after it "
                                       "until its clock passes that time; or Redis's clock stepped back); such "
                                       "entries are left out of the end-to-end latency", entry.id, -age,
                                       event="foreign_id", entry_id=entry.id)
            if schema.capture_time(entry.fields) is None and schema.text(entry.fields, schema.TS) is not None:
                self.throttled.warning("ts_not_a_number", "entry %s: ts %r is not a number as JSON writes one; give the "
                                       "capture time in Unix seconds (e.g. %.1f); left out of the result",
                                       entry.id, schema.text(entry.fields, schema.TS)[:40], time.time(),
                                       event="bad_ts", entry_id=entry.id)
        for entry_id, (_, outcome) in by_id.items():
            if outcome.kind != "failed":
                self.last_errors.pop(entry_id, None)

    # -- gauges and the summary line ---------------------------------------------------------------
    def _monitor(self) -> None:
        s, m = self.s, self.metrics
        since = time.monotonic()
        next_summary, last, last_dead = since + s.log_interval_s, (0, 0, 0), {}
        # The stream's gauges are withdrawn after STATE_GRACE_READS refreshes in a row that could not read
        # them, not at the first: a scrape without them resets the backlog alerts' `for:` clocks, and a
        # Redis too busy to answer every read (when backlogs happen) kept UstudentsBacklogNearStreamCap
        # from ever firing. Counted in refreshes, not seconds: one read that times out takes longer than
        # three periods.
        unread = 0  # refreshes in a row that read nothing
        while True:
            reached = False
            try:
                info = self.io.group_info()
                if info:
                    m.pending.labels(s.stream, s.group).set(int(info.get("pending", 0)))
                    self._report_lag(info)
                    m.length.labels(s.stream).set(self.io.length())
                    unread = -1
                # else the group is gone (deleted, or Redis lost its data): nothing to report until it is back
                self.redis_state.ok()
                reached = True
            except UNAVAILABLE as err:
                self.redis_state.failed(err)
            except redis.ResponseError:
                reached = True  # the stream does not exist (yet, or any more)
            unread += 1
            if unread >= STATE_GRACE_READS:
                m.forget_stream_state()
            if reached:  # not a second read timeout where Redis hangs
                try:  # a step of Redis's clock is followed within a period
                    self._redis_clock(ask_if_refused=True)
                except UNAVAILABLE:
                    pass  # said by the next read that fails
            self._gpu_memory()
            at = time.monotonic()
            if at >= next_summary:
                self._reap_consumers()
                self._compare_models()
                t = self.totals
                dead = dict(t.dead)  # one snapshot for the total and the split (the publisher adds meanwhile)
                now, span = (t.processed, t.anomalies, sum(dead.values())), at - since
                # the span measured: a summary can come no oftener than this loop (stats_interval_s),
                # however short log_interval_s is, and a rate over the asked interval overstated it
                # by reason: the dead-letter lines are throttled per reason, so a burst shows one of each
                by_reason = {r: n - last_dead.get(r, 0) for r, n in sorted(dead.items()) if n > last_dead.get(r, 0)}
                why = f" ({', '.join(f'{r} {n}' for r, n in by_reason.items())})" if by_reason else ""
                log.info("last %.3g s: %d frames processed (%.1f/s), %d anomalous, %d dead-lettered%s",
                         span, now[0] - last[0], (now[0] - last[0]) / span, now[1] - last[1], now[2] - last[2], why,
                         extra={"event": "summary", "processed": now[0] - last[0], "anomalies": now[1] - last[1],
                                "dead_lettered": now[2] - last[2], "dead_by_reason": by_reason,
                                "span_s": round(span, 3)})
                next_summary, last, last_dead, since = max(next_summary + s.log_interval_s, at), now, dead, at
            if self.stopping.wait(s.stats_interval_s):
                return

    def _keep_inflight_claimed(self) -> None:
        """Every claim_idle_ms / 3, refresh the entries waiting in this worker's pipeline
        (StreamIO.keep_claimed). Without it a busy worker's queued frames (up to 2 * queue_batches + 3
        batches; minutes on a CPU) outwait claim_idle_ms, and other workers, or this one's own
        claim, take and score them again (found in review; a test asserts each is scored once)."""
        period = self.s.claim_idle_ms / 3000
        due, name_due = time.monotonic() + period, time.monotonic() + NAME_RENEW_S
        while not (self.stopping.is_set() and not any(t.is_alive() for t in self.threads)):
            if self.abandon.wait(min(period, 0.5)):  # short waits: ends soon after the stages do
                return
            if self.name_held and time.monotonic() >= name_due:
                name_due = time.monotonic() + (NAME_RENEW_S if self._renew_name() else 1.0)
            if time.monotonic() < due:
                continue
            due = time.monotonic() + period
            with self.inflight_lock:
                ids = list(self.inflight)
            if ids:
                try:
                    self.io.keep_claimed(ids, self.s.claim_idle_ms // 3)
                except (*UNAVAILABLE, redis.ResponseError):
                    pass  # Redis away (the reader reports it): entries may be claimed, as without this

    def _renew_name(self) -> bool:
        """Renew the hold; False when Redis did not take it (tried again at the keeper's next tick)."""
        with self.name_lock:
            if not self.name_held:  # released at exit
                return True
            try:
                held = self._hold_name()
            except (*UNAVAILABLE, redis.ResponseError):
                return False  # Redis away or refusing writes (the stages report it); the hold lasts NAME_HOLD_S
            if held is not True and self.crashed is None:
                # Redis took no renewal for NAME_HOLD_S, the hold lapsed, and another worker took the name:
                # two would share one pending list. Stop; a fresh start takes a name of its own.
                self.name_held = False
                self.crashed = RuntimeError(f"consumer name {self.s.consumer} was taken by another worker while "
                                            "this one could not renew its hold")
                log.error("%s; stopping", self.crashed, extra={"event": "consumer_name_lost"})
                self.stop()
            return True

    def _compare_models(self) -> None:
        """Once per summary: workers of one group must serve the same models. One that does not serve a
        frame's category dead-letters it (unknown_category) when it reads it, though another serves it,
        so the verdict hung on which worker read the frame (an audit: a rolling change of the served
        models, old and new pods side by side), and nothing said so."""
        try:
            others = self.io.models_elsewhere()
        except Exception:  # noqa: BLE001 (Redis away, no group yet, an ACL: a help, never a stop; next summary)
            return
        differ = {name: served for name, served in others.items() if served != self.models}
        if differ:  # once per summary, as the summary line itself
            log.warning("workers of group %s on %s serve other models than this one (%s): %s; one dead-letters a "
                        "frame of a category it does not serve (unknown_category), and each judges with its own "
                        "model, whichever worker reads the frame: serve the same models on every worker of the group "
                        "(README: Adding workers)", self.s.group, self.s.stream, described(self.models),
                        "; ".join(f"{name} serves {described(served)}" for name, served in sorted(differ.items())),
                        extra={"event": "models_differ", "consumers": sorted(differ)})

    def _reap_consumers(self) -> None:
        """Once per summary: remove consumers of workers that died without leaving the group."""
        if not self.s.reap_idle_s:
            return
        try:
            gone = self.io.reap_idle_consumers(self.s.reap_idle_s * 1000)
        except (*UNAVAILABLE, redis.ResponseError):
            return  # Redis away (the gauges report it) or no stream yet: the next summary tries again
        if gone:
            log.info("removed %d consumers idle over %d s with nothing pending (workers gone without leaving "
                     "the group): %s", len(gone), self.s.reap_idle_s, ", ".join(gone),
                     extra={"event": "consumers_reaped", "consumers": gone})

    def _report_lag(self, info: dict) -> None:
        """The group's lag as Redis counts it (XINFO GROUPS). Redis < 7 keeps no such count: no
        gauge, one info line. Redis 7 cannot tell it (None) after replaying its AOF at a restart
        while the group had a backlog: the replay drops the group's read counter
        (redis/redis#10569) until the group catches up with the stream's end. Meanwhile the gauge
        is removed rather than left at a stale value that would hold the lag alert in its state."""
        s, gauge = self.s, self.metrics.lag
        if "lag" not in info:
            if self.lag_known is None:
                log.info("this Redis (before 7) does not count a group's lag: the lag gauge is not exported "
                         "(pending and latency are)", extra={"event": "lag_unsupported"})
                self.lag_known = False
            return
        lag = info["lag"]
        if lag is not None:
            gauge.labels(s.stream, s.group).set(int(lag))
            self.lag_known = True
            return
        if self.lag_known is not False:
            log.warning("Redis cannot tell the group's lag (its read counter was lost on a restart during a "
                        "backlog); not reported until the group catches up (pending and latency still are)",
                        extra={"event": "lag_unknown"})
            self.lag_known = False
            try:
                gauge.remove(s.stream, s.group)
            except KeyError:
                pass  # never reported

    def _gpu_memory(self) -> None:
        devices = {e.device for e in self.engines.values() if e.device.type == "cuda"}
        if not devices:
            return
        import torch

        for dev in devices:
            free, total = torch.cuda.mem_get_info(dev)
            self.metrics.gpu_memory.labels(self.s.stream, str(dev), "used").set(total - free)
            self.metrics.gpu_memory.labels(self.s.stream, str(dev), "reserved").set(torch.cuda.memory_reserved(dev))
