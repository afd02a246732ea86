"""How long a worker takes to start: from `ustudents-worker` launched to its port answering, to
`/healthz` 200 (models loaded and warmed up) and to `/readyz` 200, against what the orchestrators
allow a start (the CPU image's Docker healthcheck: 60 s start period + 3 failed checks 15 s apart;
the k8s startupProbe: 90 x 10 s).

    python benchmarks/worker_start.py models/magnetic_tile --name worker_start_cpu

Redis: --redis-url (default: the local one); the worker reads an empty stream of its own. Writes
benchmarks/results/<name>.json (`summary`: port_s, healthy_s, ready_s, device, backend, precision)
and <name>.md, with the machine named.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import click
import redis
import torch

from common import check_redis, device_label, free_port, machine, name_option, one_line_errors, write_result
from ustudents.engines.bundle import load_bundle

DOCKER_CPU_ALLOWANCE_S = 60 + 3 * 15  # deploy/docker/Dockerfile.cpu HEALTHCHECK
K8S_STARTUP_ALLOWANCE_S = 90 * 10  # deploy/k8s/worker-line1.yaml startupProbe


def status(port: int, path: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode().strip()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode().strip()
    except OSError:
        return None, ""


def one_start(model: Path, redis_url: str, device: str, timeout_s: float) -> dict:
    port, stream = free_port(), f"worker-start-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("USTUDENTS_")}
    cmd = ["ustudents-worker", "--stream", stream, "--model", str(model), "--metrics-port", str(port),
           "--redis-url", redis_url, "--device", device]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict = {}
    try:
        while time.monotonic() - t0 < timeout_s and "ready_s" not in seen:
            if proc.poll() is not None:
                raise SystemExit(f"the worker exited ({proc.returncode}):\n{proc.stdout.read()[-2000:]}")
            code, body = status(port, "/healthz")
            now = round(time.monotonic() - t0, 2)
            if code is not None and "port_s" not in seen:
                seen.update(port_s=now, first_answer=f"{code} {body}")
            if code == 200:
                seen.setdefault("healthy_s", now)
                if status(port, "/readyz")[0] == 200:
                    seen["ready_s"] = round(time.monotonic() - t0, 2)
            time.sleep(0.1)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
        try:
            redis.Redis.from_url(redis_url).delete(stream)
        except redis.RedisError:  # gone meanwhile: the error that ended the run says more than this one
            pass
    engine = re.search(r"engine: (\S+) (\S+) on (\S+)", out)
    if engine:
        seen.update(backend=engine.group(1), precision=engine.group(2), device=engine.group(3))
    return seen


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@name_option
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--runs", default=2, show_default=True, type=click.IntRange(min=1), help="Starts to time (the first also warms the page cache).")
@one_line_errors
def main(model: Path, name: str, redis_url: str, device: str, runs: int) -> None:
    manifest = load_bundle(model).manifest  # a folder that is no bundle: one line, not a traceback
    # the worker waits for an unreachable Redis, healthy and never ready: the run waited its full
    # allowance (15 minutes) in silence, then failed in its cleanup
    check_redis(redis_url)
    starts = [one_start(model, redis_url, device, K8S_STARTUP_ALLOWANCE_S) for _ in range(runs)]
    info = machine(torch.device("cpu"))
    rows = [f"| {i + 1} | {s.get('port_s')} | {s.get('healthy_s')} | {s.get('ready_s')} | {s.get('first_answer')} |"
            for i, s in enumerate(starts)]
    table = "\n".join(["| start | port answers (s) | /healthz 200 (s) | /readyz 200 (s) | first answer |",
                       "|---|---|---|---|---|", *rows])
    last = starts[-1]
    summary = {"port_s": last.get("port_s"), "healthy_s": last.get("healthy_s"), "ready_s": last.get("ready_s"),
               "device": device_label(info) if device == "cpu" else device, "backend": last.get("backend"),
               "precision": last.get("precision"), "docker_cpu_allowance_s": DOCKER_CPU_ALLOWANCE_S,
               "k8s_startup_allowance_s": K8S_STARTUP_ALLOWANCE_S}
    command = f"python benchmarks/worker_start.py {' '.join(sys.argv[1:])}"
    record = {"summary": summary, "starts": starts, "machine": info, "command": command,
              "model": {"image_size": manifest["image_size"], "scales": manifest["scales"],
                        "students": manifest["students"], "id": manifest["id"]}}
    print(table)
    path = write_result(name, record, (
        f"# Worker start\n\nMachine: {device_label(info)}; torch {info['torch']}. Model: {manifest['image_size']} px, "
        f"scales {manifest['scales']}, M={manifest['students']}; {last.get('backend')} {last.get('precision')} on "
        f"{last.get('device')}. Allowances: Docker (CPU image) {DOCKER_CPU_ALLOWANCE_S} s, k8s startupProbe "
        f"{K8S_STARTUP_ALLOWANCE_S} s.\n\n{table}\n\nReproduce: `{command}`\n"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
