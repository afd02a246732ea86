"""What one claim call costs Redis with a long pending list: the worker's claim script (StreamIO.autoclaim,
10 x count pending entries looked at a call), XAUTOCLAIM (which it replaced), and an XPENDING filtered by
IDLE over the whole list (what the script's first version did in one call), with none of the entries idle
enough: the common case, every claim_idle_ms / 2, while workers are alive. Scripts block Redis while they
run, so this time is added to every other client's latency meanwhile.

    python benchmarks/claim_scan.py --pending 200000 --name claim_scan_cpu

Uses a stream of its own on --redis-url (deleted afterwards). Writes benchmarks/results/<name>.json
(`summary`: ms per call of each, the Redis version, device) and <name>.md, with the machine named.
"""
from __future__ import annotations

import sys
import time
import uuid

import click
import redis
import torch

from common import device_label, machine, name_option, one_line_errors, write_result
from ustudents.worker.streams import StreamIO

COUNT = 8  # the worker's default batch: its claim asks for that many entries a call


def ms_per_call(fn, calls: int) -> float:
    fn()  # the script loaded, the caches warm
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1000


@click.command()
@click.option("--pending", default=200_000, show_default=True, help="Entries pending on a consumer.")
@click.option("--calls", default=20, show_default=True, help="Calls timed per way.")
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True)
@name_option
@one_line_errors
def main(pending: int, calls: int, redis_url: str, name: str) -> None:
    r = redis.Redis.from_url(redis_url)
    stream, group, hour = f"claim-scan-{uuid.uuid4().hex[:8]}", "ustudents", 3_600_000
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
        pipe = r.pipeline(transaction=False)
        for i in range(pending):
            pipe.xadd(stream, {"frame_id": str(i), "image": b"x"})
            if i % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
        while r.xreadgroup(group, "alive", {stream: ">"}, count=10_000):
            pass
        io = StreamIO(r, stream, group, "claimer", results_maxlen=10, dead_maxlen=10, dedupe_ttl_s=60)
        ways = {
            "claim script (StreamIO.autoclaim)": lambda: io.autoclaim(hour, "0-0", COUNT),
            "XAUTOCLAIM": lambda: r.xautoclaim(stream, group, "claimer", hour, "0-0", count=COUNT),
            "XPENDING IDLE over the whole list": lambda: r.xpending_range(stream, group, "-", "+", COUNT, idle=hour),
        }
        timed = {way: round(ms_per_call(fn, calls), 3) for way, fn in ways.items()}
        version = r.info("server")["redis_version"]
    finally:
        r.delete(stream)
    info = machine(torch.device("cpu"))
    table = "\n".join(["| way | ms per call |", "|---|---|", *(f"| {w} | {t} |" for w, t in timed.items())])
    command = f"python benchmarks/claim_scan.py {' '.join(sys.argv[1:])}"
    summary = {"pending": pending, "count": COUNT, "ms_per_call": timed, "redis": version, "device": device_label(info)}
    print(table)
    path = write_result(name, {"summary": summary, "machine": info, "command": command}, (
        f"# Claim cost with {pending} pending entries, none idle\n\nMachine: {device_label(info)}; Redis {version}; "
        f"count {COUNT}.\n\n{table}\n\nReproduce: `{command}`\n"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
