"""Worker throughput and latency through Redis on loopback against the bare inference throughput of
the same backend and batch, in one run; optionally a soak at a steady frame rate (resident memory
growth and lost frames).

    python benchmarks/worker_throughput.py models/magnetic_tile --batch 8 --frames 400
    python benchmarks/worker_throughput.py models/magnetic_tile --batch 8 --soak-minutes 10

1. bare: `Engine.predict` on decoded frames, batches of --batch (after warm-up);
2. worker: `python -m ustudents.worker` with the same backend, precision and batch; --frames PNG
   frames are written to a stream as fast as Redis takes them while the worker runs; throughput is
   counted from its first published batch to its last, as the bare one is from its first batch to
   its last;
3. latency: frames at half the worker's throughput for --paced-seconds: end-to-end latency from
   the frame's `ts` to its result's stream entry;
4. soak (--soak-minutes > 0): frames at --soak-fps (default half the worker's throughput); the
   worker's resident memory is sampled every 5 s; growth = last sample vs the sample a tenth into
   the soak (after warm-up); lost = frames written without a result or dead letter.

Redis: --redis-url, else a redis-server started here on a free port (no persistence). Writes
benchmarks/results/<name>.json (top-level `summary` with overhead_pct, rss_growth_pct,
lost_frames) and <name>.md, with the machine named.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import click
import ustudents  # noqa: F401  before cv2: importing it caps the pixels OpenCV decodes
import cv2
import numpy as np
import redis
import torch

from common import check_redis, free_port, judging_frames_of, machine, name_option, one_line_errors, percentiles, rss_bytes, start_redis, wait_ready, write_result
from ustudents.engines.runtime import load_engine
from ustudents.worker import schema
from ustudents.worker.streams import replies



def synthetic_frames(n: int, size: int, seed: int = 0) -> list[bytes]:
    """PNG frames of a smooth texture, each different (as a camera would encode them)."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.normal(128, 40, (size, size, 3)).astype(np.float32), (0, 0), 3)
    out = []
    for _ in range(n):
        frame = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
        out.append(cv2.imencode(".png", frame)[1].tobytes())
    return out


def bare_throughput(engine, decoded: list[np.ndarray], batch: int) -> dict:
    sync = (lambda: torch.cuda.synchronize(engine.device)) if engine.device.type == "cuda" else (lambda: None)
    for i in range(2):  # warm-up
        engine.predict(decoded[:batch])
    sync()
    ends, lat = [], []
    for i in range(0, len(decoded), batch):
        t0 = time.perf_counter()
        engine.predict(decoded[i:i + batch])
        sync()
        ends.append(time.perf_counter())
        lat.append(ends[-1] - t0)
    first = min(batch, len(decoded))
    return {"fps": (len(decoded) - first) / (ends[-1] - ends[0]), "batch_latency_s": percentiles(lat),
            "frames": len(decoded)}


class Follower(threading.Thread):
    """Records every result and dead letter of a stream: entry ids, publish times, latencies."""

    def __init__(self, url: str, stream: str):
        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(url)
        self.keys = {schema.results_stream(stream): "0-0", schema.dead_stream(stream): "0-0"}
        self.results: dict[str, list[float]] = {}  # entry id -> [publish time s, ts, worker latency ms]
        self.dead: set[str] = set()
        self.duplicates = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                reply = self.r.xread(self.keys, count=500, block=200)
            except redis.RedisError:
                if self.halt.is_set():
                    return
                raise
            for key, entries in replies(reply):
                key = key.decode()
                for eid, fields in entries:
                    self.keys[key] = eid.decode()
                    entry_id = fields[b"entry_id"].decode()
                    if key.endswith(":dead"):
                        self.dead.add(entry_id)
                        continue
                    if entry_id in self.results:
                        self.duplicates += 1
                    published = int(eid.split(b"-")[0]) / 1000
                    ts = float(fields.get(b"ts", b"nan"))
                    self.results[entry_id] = [published, ts, float(fields[b"latency_ms"])]

    def wait_for(self, ids: list[str], timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(i not in self.results and i not in self.dead for i in ids):
            time.sleep(0.1)


def send_paced(r: redis.Redis, stream: str, frames: list[bytes], fps: float, seconds: float,
               sample=None) -> list[str]:
    """Frames at `fps` for `seconds` (cycling through `frames`); `sample()` every 5 s. Returns ids."""
    ids, start, next_sample = [], time.monotonic(), 0.0
    n = 0
    while (now := time.monotonic()) - start < seconds:
        if sample and now - start >= next_sample:
            sample(now - start)
            next_sample += 5.0
        delay = start + n / fps - now
        if delay > 0:
            time.sleep(delay)
        ids.append(r.xadd(stream, {"frame_id": f"f{n}", "ts": repr(time.time()), "image": frames[n % len(frames)]},
                          maxlen=100_000, approximate=True).decode())
        n += 1
    return ids


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backend", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default=None)
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--frames", "n_frames", default=400, show_default=True, type=click.IntRange(min=1),
              help="Frames of the throughput runs; at least 3 batches (the first batch starts the clock).")
@click.option("--frame-size", default=None, type=int, help="Side of the square frames.  [default: the model's]")
@click.option("--paced-seconds", default=15.0, show_default=True, help="Duration of the latency run.")
@click.option("--soak-minutes", default=0.0, show_default=True, help="Soak duration; 0 = no soak.")
@click.option("--soak-fps", default=None, type=float, help="Soak frame rate.  [default: half the worker's throughput]")
@click.option("--redis-url", default=None, help="[default: a redis-server started here]")
@name_option
@one_line_errors
def main(model, backend, device, precision, batch, n_frames, frame_size, paced_seconds, soak_minutes, soak_fps,
         redis_url, name):
    if n_frames < 3 * batch:  # throughput is timed from the first batch's end: a rate needs batches after it
        raise click.BadParameter(f"{n_frames} frames at batch {batch}: give at least {3 * batch}", param_hint="--frames")
    if redis_url is not None:
        check_redis(redis_url)  # before the bare run: it was timed, then the worker waited 300 s for Redis
    engine = load_engine(model, backend=backend, device=device, precision=precision, max_batch=batch)
    info = engine.info
    size = frame_size or engine.image_size
    encoded = synthetic_frames(max(n_frames, batch), size)
    decoded = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].copy() for b in encoded]
    click.echo(f"engine: {engine.describe()}; {len(encoded)} frames {size}x{size}, batch {batch}")
    bare = bare_throughput(engine, decoded, batch)
    click.echo(f"bare: {bare['fps']:.1f} frames/s")
    dev, image_size = engine.device, engine.image_size
    del engine
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    tmp = Path(tempfile.mkdtemp(prefix="ustudents-bench-"))
    served = judging_frames_of(model, size, size, tmp)
    redis_proc = None
    if redis_url is None:
        redis_proc, redis_url = start_redis(tmp)
    r = redis.Redis.from_url(redis_url)
    stream, port = f"bench-{uuid.uuid4().hex[:8]}", free_port()
    cmd = [sys.executable, "-m", "ustudents.worker", "--stream", stream, "--model", str(served), "--redis-url", redis_url,
           "--backend", info["backend"], "--device", str(dev), "--precision", info["precision"], "--batch", str(batch),
           "--metrics-port", str(port)]
    worker = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "wb"))
    follower = Follower(redis_url, stream)
    out: dict = {}
    try:
        wait_ready(port, worker, tmp / "worker.log")
        follower.start()
        rss_start = rss_bytes(worker.pid)

        # throughput: a burst the worker works through
        pipe = r.pipeline(transaction=False)
        for i, data in enumerate(encoded):
            pipe.xadd(stream, {"frame_id": f"b{i}", "ts": repr(time.time()), "image": data})
        ids = [x.decode() for x in pipe.execute()]
        follower.wait_for(ids, timeout=600)
        if dead := sum(1 for i in ids if i in follower.dead):  # a rate of dead-lettering is no throughput
            raise click.ClickException(f"{dead} of the {len(ids)} frames were dead-lettered, not scored: the "
                                       f"worker's log, {tmp / 'worker.log'}, says why")
        times = sorted(follower.results[i][0] for i in ids if i in follower.results)
        first_batch = sum(1 for t in times if t <= times[0])
        worker_fps = (len(times) - first_batch) / max(times[-1] - times[0], 1e-9)
        burst_lost = sum(1 for i in ids if i not in follower.results and i not in follower.dead)
        overhead = (bare["fps"] / worker_fps - 1) * 100
        click.echo(f"worker: {worker_fps:.1f} frames/s (overhead {overhead:.1f} %)")

        # latency at a steady rate
        rate = worker_fps / 2
        paced = send_paced(r, stream, encoded, rate, paced_seconds)
        follower.wait_for(paced, timeout=120)
        e2e = [(follower.results[i][0] - follower.results[i][1]) * 1000 for i in paced if i in follower.results]
        internal = [follower.results[i][2] for i in paced if i in follower.results]
        paced_lost = sum(1 for i in paced if i not in follower.results and i not in follower.dead)

        soak = None
        if soak_minutes > 0:
            fps = soak_fps or rate
            samples: list[tuple[float, int]] = []
            soak_ids = send_paced(r, stream, encoded, fps, soak_minutes * 60,
                                  sample=lambda t: samples.append((t, rss_bytes(worker.pid))))
            follower.wait_for(soak_ids, timeout=300)
            samples.append((soak_minutes * 60, rss_bytes(worker.pid)))
            base = next(m for t, m in samples if t >= soak_minutes * 6)  # a tenth in, after warm-up
            lost = sum(1 for i in soak_ids if i not in follower.results and i not in follower.dead)
            soak = {"minutes": soak_minutes, "fps": fps, "frames": len(soak_ids), "lost_frames": lost,
                    "dead_lettered": sum(1 for i in soak_ids if i in follower.dead),
                    "rss_base_bytes": base, "rss_end_bytes": samples[-1][1],
                    "rss_growth_pct": (samples[-1][1] - base) / base * 100,
                    "rss_samples": [{"t_s": round(t, 1), "rss_bytes": m} for t, m in samples]}
            click.echo(f"soak: {len(soak_ids)} frames at {fps:.1f}/s, RSS {base / 2**20:.0f} -> "
                       f"{samples[-1][1] / 2**20:.0f} MiB ({soak['rss_growth_pct']:+.1f} %), lost {lost}")
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(120)
        lost_total = burst_lost + paced_lost + (soak["lost_frames"] if soak else 0)
        out = {
            "summary": {"overhead_pct": round(overhead, 2), "rss_growth_pct": round(soak["rss_growth_pct"], 2) if soak else None,
                        "lost_frames": lost_total, "duplicate_results": follower.duplicates,
                        "bare_fps": round(bare["fps"], 2), "worker_fps": round(worker_fps, 2),
                        "e2e_latency_ms_p50": round(percentiles(e2e).get("p50", float("nan")), 2),
                        "e2e_latency_ms_p95": round(percentiles(e2e).get("p95", float("nan")), 2),
                        "batch": batch, "backend": info["backend"], "precision": info["precision"],
                        "device": info["device"], "frame_size": size, "image_size": image_size,
                        "target_overhead_pct": 5.0, "overhead_within_target": overhead <= 5.0,
                        "worker_exit_code": code},
            "machine": machine(dev),
            "settings": {"model": str(model), "model_id": info["model"], "frames": len(encoded),
                         "paced_seconds": paced_seconds, "paced_fps": rate, "soak_minutes": soak_minutes,
                         "redis": r.info("server")["redis_version"]},
            "bare": bare,
            "worker": {"fps": worker_fps, "frames": len(ids), "lost_frames": burst_lost, "rss_start_bytes": rss_start},
            "latency": {"fps": rate, "frames": len(paced), "lost_frames": paced_lost,
                        "end_to_end_ms": percentiles(e2e), "worker_internal_ms": percentiles(internal)},
            "soak": soak,
            "command": " ".join(["python", "benchmarks/worker_throughput.py"] + sys.argv[1:]),
        }
    finally:
        follower.halt.set()
        if follower.is_alive():
            follower.join(5)
        if worker.poll() is None:
            worker.kill()
        if redis_proc is not None:
            redis_proc.terminate()
        else:
            r.delete(stream, schema.results_stream(stream), schema.dead_stream(stream),
                     *r.scan_iter(match=f"{stream}:done:*", count=1000))
    name = name or f"worker_{dev.type}"
    sm = out["summary"]
    table = "\n".join(f"{k:28s} {v}" for k, v in sm.items())
    click.echo(table)
    m = out["machine"]
    path = write_result(name, out,
        f"# Worker throughput: {name}\n\nMachine: {m.get('gpu') or m['cpu']} ({m['cores']} CPU threads), "
        f"device {m['device']}, torch {m['torch']}, Redis {out['settings']['redis']} on loopback.\n"
        f"Model {out['settings']['model_id']} ({info['backend']} {info['precision']}), batch {batch}, "
        f"frames {size}x{size} PNG.\n\n```\n{table}\n```\n\nReproduce: `{out['command']}`\n")
    click.echo(f"wrote {path} and .md")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
