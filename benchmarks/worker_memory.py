"""A worker's peak memory draining a backlog of large frames, per in-flight budget.

    python benchmarks/worker_memory.py MODEL --side 6000 --frames 48 --batch 8 --budgets 0,512,2048

For each budget (USTUDENTS_INFLIGHT_MB; 0 = none, the bound in frames alone), and with the overlay
on or off (--heatmap both): a worker starts on a fresh stream of a redis-server started here, waits
until ready (its resident memory then is the base), then --frames copies of one --side x --side JPEG
are written to the stream at once. Peak = the worker's VmHWM when every frame has its result; the
drain time is from the first frame written to the last result. The frames are the same bytes, each
decoded on its own, so memory depends on their size, not their content.

Writes benchmarks/results/<name>.json and .md with the machine named.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import click
import ustudents  # noqa: F401  before cv2: importing it caps the pixels OpenCV decodes
import cv2
import numpy as np
import redis
import torch

from common import free_port, judging_frames_of, machine, name_option, one_line_errors, rss_bytes, start_redis, wait_ready, write_result
from ustudents.worker import schema

MB = 1 << 20


def jpeg_frame(side: int) -> bytes:
    """A smooth colour texture, JPEG-encoded as a camera would send it."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (side // 64 + 1, side // 64 + 1, 3), dtype=np.uint8)
    frame = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def run_once(model: Path, url: str, frame: bytes, frames: int, batch: int, queue_batches: int, budget_mb: int,
             heatmap: bool, folder: Path) -> dict:
    r = redis.Redis.from_url(url)
    stream, port = f"mem-{uuid.uuid4().hex[:8]}", free_port()
    env = dict(os.environ, USTUDENTS_QUEUE_BATCHES=str(queue_batches), USTUDENTS_INFLIGHT_MB=str(budget_mb),
               USTUDENTS_HEATMAP="true" if heatmap else "false", USTUDENTS_RESULTS_MAXLEN=str(10 * frames))
    log = folder / f"worker-{stream}.log"
    worker = subprocess.Popen([sys.executable, "-m", "ustudents.worker", "--stream", stream, "--model", str(model),
                               "--redis-url", url, "--batch", str(batch), "--metrics-port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        wait_ready(port, worker, log)
        base = rss_bytes(worker.pid)
        t0 = time.monotonic()
        for i in range(frames):
            r.xadd(stream, {"frame_id": f"f{i}", "image": frame})
        done_keys = (schema.results_stream(stream), schema.dead_stream(stream))
        while sum(r.xlen(k) for k in done_keys) < frames:
            if worker.poll() is not None:
                raise click.ClickException(f"the worker exited: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        drain_s = time.monotonic() - t0
        peak = rss_bytes(worker.pid, "VmHWM")
        dead = r.xlen(schema.dead_stream(stream))
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        r.delete(stream, *(schema.results_stream(stream), schema.dead_stream(stream)),
                 *r.scan_iter(match=f"{stream}:*", count=1000))
    return {"budget_mb": budget_mb, "heatmap": heatmap, "base_mb": base / MB, "peak_mb": peak / MB,
            "above_base_mb": (peak - base) / MB, "drain_s": drain_s, "fps": frames / drain_s, "dead_letters": dead}


def summary(rows: list[dict]) -> dict:
    """Peak memory above the loaded worker, MB, per run: budget_<MB or none>_overlay_<on|off>."""
    return {f"budget_{r['budget_mb'] or 'none'}_overlay_{'on' if r['heatmap'] else 'off'}_above_base_mb":
            round(r["above_base_mb"]) for r in rows}


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--side", default=6000, show_default=True, type=click.IntRange(16, 8192), help="Frame side in pixels.")
@click.option("--frames", default=48, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1))
@click.option("--queue-batches", default=2, show_default=True, type=click.IntRange(1))
@click.option("--budgets", default="0,512,2048", show_default=True,
              help="USTUDENTS_INFLIGHT_MB values, comma-separated; 0 = no budget.")
@click.option("--heatmap", type=click.Choice(["off", "on", "both"]), default="both", show_default=True)
@name_option
@one_line_errors
def main(model, side, frames, batch, queue_batches, budgets, heatmap, name):
    frame = jpeg_frame(side)
    modes = {"off": [False], "on": [True], "both": [False, True]}[heatmap]
    folder = Path(tempfile.mkdtemp(prefix="ustudents-mem-"))
    served = judging_frames_of(model, side, side, folder)
    proc, url = start_redis(folder)
    rows = []
    try:
        for on in modes:
            for b in (int(v) for v in budgets.split(",")):
                rows.append(run_once(served, url, frame, frames, batch, queue_batches, b, on, folder))
                row = rows[-1]
                click.echo(f"budget {b} MB, heatmap {'on' if on else 'off'}: peak {row['peak_mb']:.0f} MB "
                           f"({row['above_base_mb']:.0f} above base), {row['fps']:.2f} frames/s")
    finally:
        proc.terminate()
        shutil.rmtree(folder, ignore_errors=True)
    name = name or f"worker_memory_{side}"
    table = "\n".join(["| budget (MB) | overlay | base (MB) | peak (MB) | above base (MB) | frames/s |",
                       "|---|---|---|---|---|---|"] +
                      [f"| {r['budget_mb'] or 'none'} | {'on' if r['heatmap'] else 'off'} | {r['base_mb']:.0f} | "
                       f"{r['peak_mb']:.0f} | {r['above_base_mb']:.0f} | {r['fps']:.2f} |" for r in rows])
    click.echo(table)
    m = machine(torch.device("cpu"))
    command = " ".join(["python", "benchmarks/worker_memory.py"] + sys.argv[1:])
    record = {"summary": summary(rows), "machine": m,
              "settings": {"model": model.name, "side": side, "megapixels": side * side / 1e6, "frames": frames,
                           "batch": batch, "queue_batches": queue_batches, "jpeg_bytes": len(frame)},
              "runs": rows, "command": command}
    path = write_result(name, record, f"# Worker memory: {name}\n\nMachine: {m['cpu']} ({m['cores']} CPU threads). "
                        f"{frames} frames of {side} x {side} ({side * side / 1e6:.1f} MP) JPEG, batch {batch}, "
                        f"queue_batches {queue_batches}.\n\n{table}\n\nReproduce: `{command}`\n")
    click.echo(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
