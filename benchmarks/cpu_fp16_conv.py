"""How an fp16 ONNX export is traced on a CPU (engines/export.export_onnx): one 5 x 5 convolution of
128 -> 128 channels, as the patch networks have, timed in float32, in float16 (NCHW) and in float16
channels-last on this CPU at two sizes and three dilations (the dense form's), best of 3 each; then
the fp16 export itself of a random two-scale model (p = 17, 33, M = 3 students) at --export-size px,
traced in NCHW and in channels-last, and whether the two ONNX files are the same, byte for byte.

    python benchmarks/cpu_fp16_conv.py --name cpu_fp16_conv

Writes benchmarks/results/<name>.json (`summary`: the smallest and largest fp16 / fp32 time ratio in
each layout, both export times and whether the files agree) and <name>.md, with the machine named.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from common import device_label, machine, name_option, one_line_errors, write_result
from ustudents.engines.export import export_onnx
from ustudents.engines.model import AnomalyModel
from ustudents.engines.onnx_engine import model_for_export

CL = torch.channels_last


def best_time(x: torch.Tensor, w: torch.Tensor, dilation: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        F.conv2d(x, w, dilation=dilation)
        best = min(best, time.perf_counter() - t)
    return best


def timed_export(model: AnomalyModel, size: int, path: Path, channels_last: bool) -> float:
    t = time.perf_counter()
    export_onnx(model, size, path, channels_last=channels_last)
    return time.perf_counter() - t


@click.command()
@name_option
@click.option("--export-size", default=32, show_default=True, help="Image side of the timed fp16 export.")
@one_line_errors
def main(name: str, export_size: int) -> None:
    torch.manual_seed(0)
    rows = []
    for side in (48, 96):
        for dilation in (1, 2, 4):
            x, w = torch.rand(1, 128, side, side), torch.rand(128, 128, 5, 5)
            fp32 = best_time(x, w, dilation)
            fp16 = best_time(x.half(), w.half(), dilation)
            fp16_cl = best_time(x.half().contiguous(memory_format=CL), w.half().contiguous(memory_format=CL), dilation)
            rows.append({"side": side, "dilation": dilation, "fp32_s": round(fp32, 5), "fp16_s": round(fp16, 4),
                         "fp16_channels_last_s": round(fp16_cl, 5), "ratio": round(fp16 / fp32, 1),
                         "ratio_channels_last": round(fp16_cl / fp32, 2)})
            print(f"{side:3d} px  dilation {dilation}  fp32 {fp32:.4f} s  fp16 {fp16:.3f} s ({fp16 / fp32:6.1f}x)  "
                  f"fp16 channels-last {fp16_cl:.4f} s ({fp16_cl / fp32:5.2f}x)", flush=True)
    model = model_for_export(AnomalyModel([17, 33], students=3), "fp16")
    with tempfile.TemporaryDirectory() as tmp:
        nchw_s = timed_export(model, export_size, Path(tmp) / "nchw.onnx", channels_last=False)
        cl_s = timed_export(model, export_size, Path(tmp) / "cl.onnx", channels_last=True)
        same = (Path(tmp) / "nchw.onnx").read_bytes() == (Path(tmp) / "cl.onnx").read_bytes()
    print(f"fp16 export, p = 17 + 33, M = 3, {export_size} px: NCHW {nchw_s:.1f} s, channels-last {cl_s:.1f} s; "
          f"same file: {same}")
    info = machine(torch.device("cpu"))
    summary = {"device": device_label(info),
               "fp16_over_fp32_min": min(r["ratio"] for r in rows), "fp16_over_fp32_max": max(r["ratio"] for r in rows),
               "fp16_channels_last_over_fp32_min": min(r["ratio_channels_last"] for r in rows),
               "fp16_channels_last_over_fp32_max": max(r["ratio_channels_last"] for r in rows),
               "export_size": export_size, "export_nchw_s": round(nchw_s, 1),
               "export_channels_last_s": round(cl_s, 1), "export_files_identical": same}
    command = f"python benchmarks/cpu_fp16_conv.py --name {name} --export-size {export_size}"
    table = "\n".join(f"{r['side']:3d} px  dilation {r['dilation']}  fp32 {r['fp32_s']:.4f} s  fp16 {r['fp16_s']:.3f} s "
                      f"({r['ratio']:6.1f}x)  fp16 channels-last {r['fp16_channels_last_s']:.4f} s "
                      f"({r['ratio_channels_last']:5.2f}x)" for r in rows)
    write_result(name, {"summary": summary, "machine": info, "rows": rows, "command": command},
                 f"# PyTorch fp16 against fp32 convolutions on this CPU, and the fp16 export: {name}\n\n"
                 f"Machine: {device_label(info)}, {', '.join(info['cpu_features'])}; torch {info['torch']}. One "
                 f"5 x 5 conv, 128 -> 128 channels, batch 1, best of 3.\n\n```\n{table}\n```\n\n"
                 f"fp16 ONNX export of a random model (p = 17 + 33, M = 3) at {export_size} px: traced in NCHW "
                 f"{nchw_s:.1f} s, in channels-last {cl_s:.1f} s; the two files {'are' if same else 'are NOT'} "
                 f"the same, byte for byte.\n\nReproduce: `{command}`\n")


if __name__ == "__main__":
    main()
