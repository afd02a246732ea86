"""Why an fp16 ONNX export is traced on a GPU where there is one (engines/onnx_engine.trace_device):
one 5 x 5 convolution of 128 -> 128 channels, as the patch networks have, timed in float16 and
float32 on this CPU at two sizes and three dilations (the dense form's), best of 3 each.

    python benchmarks/cpu_fp16_conv.py --name cpu_fp16_conv

Writes benchmarks/results/<name>.json (`summary`: the smallest and largest fp16 / fp32 time ratio)
and <name>.md, with the machine named.
"""
from __future__ import annotations

import time

import click
import torch
import torch.nn.functional as F

from common import device_label, machine, write_result


def best_time(x: torch.Tensor, w: torch.Tensor, dilation: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        F.conv2d(x, w, dilation=dilation)
        best = min(best, time.perf_counter() - t)
    return best


@click.command()
@click.option("--name", required=True, help="Result file name under benchmarks/results/.")
def main(name: str) -> None:
    torch.manual_seed(0)
    rows = []
    for side in (48, 96):
        for dilation in (1, 2, 4):
            x, w = torch.rand(1, 128, side, side), torch.rand(128, 128, 5, 5)
            fp32 = best_time(x, w, dilation)
            fp16 = best_time(x.half(), w.half(), dilation)
            rows.append({"side": side, "dilation": dilation, "fp32_s": round(fp32, 5), "fp16_s": round(fp16, 4),
                         "ratio": round(fp16 / fp32, 1)})
            print(f"{side:3d} px  dilation {dilation}  fp32 {fp32:.4f} s  fp16 {fp16:.3f} s  {fp16 / fp32:6.1f}x",
                  flush=True)
    info = machine(torch.device("cpu"))
    ratios = [r["ratio"] for r in rows]
    summary = {"device": device_label(info), "fp16_over_fp32_min": min(ratios), "fp16_over_fp32_max": max(ratios)}
    command = f"python benchmarks/cpu_fp16_conv.py --name {name}"
    table = "\n".join(f"{r['side']:3d} px  dilation {r['dilation']}  fp32 {r['fp32_s']:.4f} s  fp16 {r['fp16_s']:.3f} s  "
                      f"{r['ratio']:6.1f}x" for r in rows)
    write_result(name, {"summary": summary, "machine": info, "rows": rows, "command": command},
                 f"# PyTorch fp16 against fp32 convolutions on this CPU: {name}\n\nMachine: {device_label(info)}, "
                 f"{', '.join(info['cpu_features'])}; torch {info['torch']}. One 5 x 5 conv, 128 -> 128 channels, "
                 f"batch 1, best of 3.\n\n```\n{table}\n```\n\nReproduce: `{command}`\n")


if __name__ == "__main__":
    main()
