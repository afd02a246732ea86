"""How long `ustudents demo` takes on this machine, and what it finds: one run of the real command,
trained afresh (`--retrain`), with its wall time, training time, epochs trained within the time
limit, the share of the teacher's variance the students predict, and the verdicts.

    python benchmarks/demo_run.py --name demo_run_avx2                 # the demo's defaults
    python benchmarks/demo_run.py --name demo_run_e10 -- --epochs 10   # options after -- go to the demo

Writes benchmarks/results/<name>.json (`summary`: wall_s, trained_s, epochs_trained, detected,
false_alarms, auroc, the fp32 peak before and after) and <name>.md, with the machine named.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from common import device_label, machine, name_option, one_line_errors, peak_gflops, write_result


@click.command(context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("demo_args", nargs=-1, type=click.UNPROCESSED)
@one_line_errors
def main(name: str, demo_args: tuple[str, ...]) -> None:
    cpu = torch.device("cpu")
    # The same 2-core machine varies by more than 2x from day to day: the peak, before and after, says how fast it was.
    peak_before = peak_gflops(cpu, torch.float32)
    with tempfile.TemporaryDirectory(prefix="demo-run-") as tmp:
        out = Path(tmp) / "demo"
        cmd = [sys.executable, "-c", "from ustudents.cli import main; main()", "demo", "--retrain", "--out", str(out), *demo_args]
        t0 = time.monotonic()
        run = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.monotonic() - t0
        if run.returncode != 0:
            sys.exit(f"the demo failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        results = json.loads((out / "results.json").read_text())
        manifest = json.loads((out / "model" / "manifest.json").read_text())
    peak = [round(peak_before), round(peak_gflops(cpu, torch.float32))]
    training = manifest["training"]
    scales = training["per_scale"]
    s = results["summary"]
    summary = {"wall_s": round(wall, 1), "trained_s": training["wall_s"],
               "students_s": sum(r["wall_s"] for r in scales.values()),
               "epochs_asked": training["student"]["epochs"], "max_minutes": training["student"]["max_minutes"],
               "epochs_trained": {p: r["epochs_trained"] for p, r in scales.items()},
               "validation_predicted_share": {p: r["validation_predicted_share"] for p, r in scales.items()},
               "defective": s["defective"], "detected": s["detected"], "good": s["good"],
               "false_alarms": s["false_alarms"], "located": s["located"], "auroc": s["auroc"],
               "fp32_peak_gflops_before_after": peak, "device": device_label(machine(cpu))}
    record = {"summary": summary, "command": " ".join(["ustudents demo --retrain", *demo_args]),
              "machine": machine(cpu), "student": training["student"], "demo": results}
    minutes, seconds = divmod(round(wall), 60)
    epochs = ", ".join(f"p={p}: {e} of {summary['epochs_asked']}" for p, e in summary["epochs_trained"].items())
    shares = ", ".join(f"{v:.0%}" for v in summary["validation_predicted_share"].values())
    table = "\n".join([
        "| wall | training | epochs trained | predicted share | detected | false alarms | image AUROC |",
        "|---|---|---|---|---|---|---|",
        f"| {minutes} min {seconds:02d} s | {summary['trained_s']:.0f} s | {epochs} | {shares} | "
        f"{s['detected']}/{s['defective']} | {s['false_alarms']}/{s['good']} | {s['auroc']:.3f} |"])
    print(table)
    path = write_result(name, record, f"# `{record['command']}`\n\nMachine: {summary['device']}, fp32 peak {peak[0]} GFLOP/s before the run, "
                        f"{peak[1]} after.\n\n{table}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
