"""What the teacher's image pool costs and saves: `ustudents teacher` runs at p = 17, each its own
process, with its wall time and peak memory (the child's maximum resident set).

- memory: a folder of 40 photos of 500 x 375 (random pixels: memory does not depend on them) held
  whole against streamed through a pool of 8;
- replacements: scikit-image's photos through a pool of 8, with no replacement against one every
  10 steps (each runs P on the new photo).

    python benchmarks/teacher_pool.py --name teacher_pool_cpu

Writes benchmarks/results/<name>.json (`summary`: peak GB held whole and pooled, seconds without and
with replacements) and <name>.md, with the machine named.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import cv2
import numpy as np
import torch

from common import device_label, machine, name_option, one_line_errors, write_result

RUNS = (  # (label, photos, steps, teacher options)
    ("40 photos held whole", "random40", 20, ["--pool-images", "40"]),
    ("40 photos, pool of 8", "random40", 20, ["--pool-images", "8", "--pool-refresh", "4"]),
    ("skimage, pool of 8, no replacement", "skimage", 200, ["--pool-images", "8", "--pool-refresh", "0"]),
    ("skimage, pool of 8, one every 10 steps", "skimage", 200, ["--pool-images", "8", "--pool-refresh", "10"]),
)


def run_teacher(images: str, steps: int, options: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, peak resident GB) of one `ustudents teacher --scales 17` process."""
    cmd = [sys.executable, "-c", "from ustudents.cli import main; main()", "teacher", "--scales", "17", "--images",
           images, "--steps", str(steps), "--lr", "5e-4", "--schedule", "cosine", "--amp", "on", "--out", str(out),
           *options]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"`{' '.join(cmd)}` failed:\n{proc.stderr.read()[-3000:]}")
    return wall, usage.ru_maxrss * 1024 / 1e9  # Linux: KiB


@click.command()
@name_option
@one_line_errors
def main(name: str) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="teacher-pool-") as tmp:
        photos = Path(tmp) / "random40"
        photos.mkdir()
        rng = np.random.default_rng(0)
        for i in range(40):
            cv2.imwrite(str(photos / f"{i:03d}.jpg"), rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
        for i, (label, images, steps, options) in enumerate(RUNS):
            wall, peak = run_teacher(str(photos) if images == "random40" else images, steps, options,
                                     Path(tmp) / f"out{i}")
            rows.append({"run": label, "steps": steps, "options": " ".join(options), "wall_s": round(wall, 1),
                         "peak_gb": round(peak, 2)})
            print(f"{label:40s} {steps:4d} steps  {wall:7.1f} s  {peak:5.2f} GB", flush=True)
    info = machine(torch.device("cpu"))
    summary = {"device": device_label(info), "peak_gb_40_held": rows[0]["peak_gb"], "peak_gb_pool_8": rows[1]["peak_gb"],
               "s_200_steps_no_replacement": rows[2]["wall_s"], "s_200_steps_replacing_every_10": rows[3]["wall_s"]}
    command = f"python benchmarks/teacher_pool.py --name {name}"
    table = "\n".join(f"{r['run']:40s} {r['steps']:4d} steps  {r['wall_s']:7.1f} s  {r['peak_gb']:5.2f} GB" for r in rows)
    write_result(name, {"summary": summary, "machine": info, "runs": rows, "p": 17, "command": command},
                 f"# Teacher image pool: {name}\n\nMachine: {device_label(info)}, {', '.join(info['cpu_features'])}; "
                 f"torch {info['torch']}. `ustudents teacher --scales 17`, each run its own process; peak = the "
                 f"process's maximum resident set.\n\n```\n{table}\n```\n\nReproduce: `{command}`\n")


if __name__ == "__main__":
    main()
