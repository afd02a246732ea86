"""Prometheus metrics of the worker and the HTTP server of /metrics, /healthz and /readyz.

Names follow Prometheus conventions (base units, `_total` counters, `_seconds`); METRIC_NAMES is
the list dashboards and alerts may use. Every one carries the `stream` label; the standard process_*
metrics come with them.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)

from . import schema

log = logging.getLogger("ustudents.worker")

METRIC_NAMES = (
    "ustudents_frames_processed_total",  # {stream, category} frames scored and published
    "ustudents_frames_dead_lettered_total",  # {stream, reason} frames sent to <stream>:dead
    "ustudents_frame_failures_total",  # {stream, category} processing attempts that raised (entry retried later)
    "ustudents_frames_trimmed_unread_total",  # {stream} entries that left the input stream before any worker read them
    "ustudents_anomalies_total",  # {stream, category} published results with anomalous=1
    "ustudents_inference_seconds",  # histogram {stream}: Engine.predict per batch
    "ustudents_end_to_end_seconds",  # histogram {stream}: publish time - the entry's arrival (Redis's clock)
    "ustudents_batch_size",  # histogram {stream}: frames per inference batch
    "ustudents_anomaly_score_ratio",  # histogram {stream, category}: image score / the model's threshold (drift)
    "ustudents_consumer_lag_entries",  # gauge {stream, group}: entries not yet delivered to the group
    "ustudents_pending_entries",  # gauge {stream, group}: delivered, not yet acknowledged
    "ustudents_stream_length_entries",  # gauge {stream}: entries the input stream holds (XLEN)
    "ustudents_redis_reconnects_total",  # {stream} Redis came back after being unreachable
    "ustudents_consumer_group_lost_total",  # {stream} the group was gone and made again (Redis lost its data)
    "ustudents_model_info",  # gauge = 1 {stream, model, version, category, backend, precision, device}
    "ustudents_gpu_memory_bytes",  # gauge {stream, device, kind=used|reserved}; only on a GPU
    "ustudents_frames_held_bytes",  # gauge {stream}: decoded frames and unpublished results held (inflight_mb)
    "ustudents_ready",  # gauge {stream}: 1 when the model is loaded and Redis reachable
    "ustudents_serving_for_seconds",  # gauge {stream}: seconds since the worker began reading the stream (model loaded)
)

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# 1 and 5 s, the latency objectives (alerts.yml), are bounds; 120 s, so that a backlog's p99 is not
# read off a bucket from 60 to 300 s (a mean of 107 s showed as a p99 of 297 s)
E2E_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Image scores as multiples of their model's image threshold: drift shows as mass moving towards 1.0
# before frames start being flagged. One set of buckets for every model: absolute scores, bucketed at
# each served model's multiples, gave a worker of two models (or a group mid-recalibration) the union
# of both sets, and their sum in the dashboard's heatmap decreased with `le`.
SCORE_MULTIPLES = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)


class WorkerMetrics:
    def __init__(self, stream: str, group: str, categories: list[str], registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.stream, self.group = stream, group
        r = self.registry
        ProcessCollector(registry=r)  # the standard process_* metrics: memory and CPU of a worker running for months
        self.processed = Counter("ustudents_frames_processed", "Frames scored and published.",
                                 ["stream", "category"], registry=r)
        self.dead_lettered = Counter("ustudents_frames_dead_lettered", "Frames sent to the dead-letter stream.",
                                     ["stream", "reason"], registry=r)
        self.trimmed_unread = Counter("ustudents_frames_trimmed_unread",
                                      "Entries that left the input stream (its MAXLEN, XTRIM) before any worker read "
                                      "them: lost frames, counted by the worker that read next (Redis >= 7).",
                                      ["stream"], registry=r)
        self.failures = Counter("ustudents_frame_failures", "Processing attempts that raised; the entry is retried.",
                                ["stream", "category"], registry=r)
        self.anomalies = Counter("ustudents_anomalies", "Published results with anomalous=1.",
                                 ["stream", "category"], registry=r)
        self.inference = Histogram("ustudents_inference_seconds", "Engine.predict time per batch.",
                                   ["stream"], buckets=SECONDS, registry=r)
        self.end_to_end = Histogram("ustudents_end_to_end_seconds",
                                    "From the frame's arrival in Redis (its entry id) to its result, on Redis's clock.",
                                    ["stream"], buckets=E2E_SECONDS, registry=r)
        self.batch_size = Histogram("ustudents_batch_size", "Frames per inference batch.",
                                    ["stream"], buckets=BATCH_SIZES, registry=r)
        self.score = Histogram("ustudents_anomaly_score_ratio",
                               "Image anomaly score divided by its model's image threshold (1 = the threshold).",
                               ["stream", "category"], buckets=SCORE_MULTIPLES, registry=r)
        self.lag = Gauge("ustudents_consumer_lag_entries", "Entries of the stream not yet delivered to the group.",
                         ["stream", "group"], registry=r)
        self.pending = Gauge("ustudents_pending_entries", "Entries delivered to the group and not yet acknowledged.",
                             ["stream", "group"], registry=r)
        # against the lag: a backlog as long as the stream means the producer's MAXLEN trims unread frames
        self.length = Gauge("ustudents_stream_length_entries", "Entries the input stream holds (XLEN).",
                            ["stream"], registry=r)
        self.reconnects = Counter("ustudents_redis_reconnects", "Times Redis became reachable again after an outage.",
                                  ["stream"], registry=r)
        self.group_lost = Counter("ustudents_consumer_group_lost",
                                  "Times the worker found its consumer group gone (Redis restarted without its data, "
                                  "or the group or stream deleted) and made it again: frames may be lost.",
                                  ["stream"], registry=r)
        self.model_info = Gauge("ustudents_model_info", "The served model (value 1).",
                                ["stream", "model", "version", "category", "backend", "precision", "device"], registry=r)
        self.gpu_memory = Gauge("ustudents_gpu_memory_bytes", "GPU memory: used on the device, reserved by PyTorch.",
                                ["stream", "device", "kind"], registry=r)
        self.held = Gauge("ustudents_frames_held_bytes", "Bytes of decoded frames and of results not yet published; "
                          "the reader waits while inflight_mb of them are held.", ["stream"], registry=r)
        self.ready = Gauge("ustudents_ready", "1 when the model is loaded and Redis reachable.", ["stream"], registry=r)
        # tells a worker that just began serving (whose counters are new) from a Prometheus that just
        # started (to which every counter is new): alerts.yml. Not the process' start: in the GPU image
        # that comes before minutes of plan building. A duration on the worker's monotonic clock, read
        # at each scrape: a time of day compared with Prometheus's time() was off by the two
        # machines' clock difference (10 minutes off: the alert silent, or paging for old losses)
        self.serving_for = Gauge("ustudents_serving_for_seconds",
                                 "Seconds since the worker began reading the stream, its model loaded.", ["stream"],
                                 registry=r)
        # Every counter and histogram series exists from the start at 0: rate() and increase() need a
        # sample before the first event, or a restarted worker's first anomaly, dead letter or
        # latencies (a scrape's worth) go uncounted
        self.ready.labels(stream).set(0)
        self.held.labels(stream).set(0)
        for per_stream in (self.reconnects, self.group_lost, self.trimmed_unread, self.inference, self.end_to_end,
                           self.batch_size):
            per_stream.labels(stream)
        for category in categories:
            for per_model in (self.processed, self.anomalies, self.failures, self.score):
                per_model.labels(stream, category)
        for reason in schema.REASONS:
            self.dead_lettered.labels(stream, reason)

    def observe_score(self, category: str, score: float, threshold: float) -> None:
        """The score in multiples of the threshold. Calibration gives positive thresholds (high quantiles
        of standardized errors); a model whose threshold is not would have its order reversed: left out."""
        if threshold > 0:
            self.score.labels(self.stream, category).observe(score / threshold)

    def forget_stream_state(self) -> None:
        """Withdraw the lag, pending and length gauges (this worker has not read them for a while: Redis
        is unreachable from it, or the group is gone). Kept at their last values, they outlived the outage: the alerts take the
        max over the group's workers, so one cut-off worker's frozen backlog paged UstudentsLineStalled
        and UstudentsBacklogNearStreamCap on a line its other workers had drained."""
        for gauge, labels in ((self.lag, (self.stream, self.group)), (self.pending, (self.stream, self.group)),
                              (self.length, (self.stream,))):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass  # never set

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


Check = Callable[[], tuple[bool, str]]


class _IPv6HTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class HealthServer:
    """GET /metrics (Prometheus text format), /healthz (200 while the worker's threads live),
    /readyz (200 when the model is loaded and Redis reachable, else 503 with the reason).

    Started before the models load (`starting`), then handed to the worker (`serve`), so the port
    answers from the first second: a start that takes minutes (a CPU warm-up, a TensorRT build)
    reads as a worker up and not ready, not as one down, and a port already taken is reported
    before the wait rather than after it."""

    def __init__(self, host: str, port: int, exposition: Callable[[], bytes], alive: Check, ready: Check):
        self.serve(exposition, alive, ready)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                route = server.routes.get(self.path.split("?")[0])
                status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every few seconds: no access log
                pass

        # an IPv6 address (::, ::1: an IPv6-only cluster's probes) was refused as "Address family for
        # hostname not supported": the server class binds IPv4 unless told otherwise
        self.server = (_IPv6HTTPServer if ":" in host else ThreadingHTTPServer)((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)

    def serve(self, exposition: Callable[[], bytes], alive: Check, ready: Check) -> None:
        """Answer from now on with these (one assignment: a request sees the old routes or the new)."""
        self.routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, exposition()),
            "/healthz": lambda: _check(alive),
            "/readyz": lambda: _check(ready),
        }

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def starting(stream: str, host: str, port: int, doing: str) -> HealthServer:
    """Start the endpoints of a worker that is still `doing` something before it can serve:
    /metrics answers with ustudents_ready 0, /healthz and /readyz 503 with the reason. /healthz is
    not 200 yet, so that the orchestrator's start-up allowance (Kubernetes startupProbe, Docker's
    start period), not liveness, bounds a start that hangs. Raises OSError when the port is taken."""
    registry = CollectorRegistry()
    Gauge("ustudents_ready", "1 when the model is loaded and Redis reachable.", ["stream"], registry=registry) \
        .labels(stream).set(0)
    reason = f"starting: {doing}"
    server = HealthServer(host, port, lambda: generate_latest(registry), lambda: (False, reason), lambda: (False, reason))
    server.start()
    return server


def _check(check: Check) -> tuple[int, str, bytes]:
    ok, reason = check()
    body = json.dumps({"ok": ok, "reason": reason}).encode() + b"\n"
    return (200 if ok else 503), "application/json", body
