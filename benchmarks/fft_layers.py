"""Each FFT candidate layer of the 3-scale model, direct against FFT, with and without huge pages.

    python benchmarks/fft_layers.py

The layers are the ones the CPU `torch` engine may run through the FFT (engines/fftconv.py), with
their real shapes at 256 px and M=3 (teacher and students fused: 4 groups), random weights. Per
layer: the best of `--repeats` timings of the direct convolution (what the naive baseline runs) and
of the FFT convolution, once in a process with PyTorch's transparent-huge-page allocation on
(THP_MEM_ALLOC_ENABLE=1, what `ustudents` sets) and once with it off. Each setting runs in its own
process because PyTorch reads the variable once, at its first allocation. Writes
benchmarks/results/fft_layers_<device>.json and a .md table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import click

# First (it imports ustudents, which sets THP_MEM_ALLOC_ENABLE unless the caller did), then torch.
from ustudents.engines.fftconv import SpectralConv  # noqa: E402
from ustudents.engines.patchnet import PatchNet, timed, worth_fft  # noqa: E402
import torch  # noqa: E402

from common import device_label, machine, name_option, one_line_errors, write_result  # noqa: E402

STUDENTS = 3


def candidate_layers(size: int) -> list[dict]:
    """(scale, layer, input shape, dilation, weight shape, groups) of every FFT candidate, found by
    running the dense networks on the meta device (shapes only)."""
    found = []
    for p in (17, 33, 65):
        net = PatchNet(p, n=STUDENTS + 1).to("meta")
        real_conv = net._conv

        def record(i, x, step, dense, net=net, p=p, real_conv=real_conv):
            conv = net.convs[i]
            if worth_fft(conv):
                found.append({"p": p, "layer": i, "input": list(x.shape), "dilation": step,
                              "weight": list(conv.weight.shape), "groups": conv.groups})
            return real_conv(i, x, step, dense)
        net._conv = record
        net.dense_image(torch.empty(1, 3, size, size, device="meta"))
    return found


def best_time(fn, repeats: int) -> float:
    return min(timed(fn)[1] for _ in range(repeats))


def time_layers(layers: list[dict], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    out = []
    with torch.no_grad():
        for layer in layers:
            weight, bias = torch.randn(layer["weight"]) * 0.01, torch.randn(layer["weight"][0])
            x = torch.randn(layer["input"])
            d, g = layer["dilation"], layer["groups"]
            spectral = SpectralConv(weight, bias, g)
            fft = best_time(lambda: spectral(x, d), repeats) if spectral.worth_it(x, d) else None
            direct = best_time(lambda: torch.nn.functional.conv2d(x, weight, bias, dilation=d, groups=g), repeats)
            out.append({**layer, "direct_s": direct, "fft_s": fft})
    return out


@click.command()
@click.option("--image-size", "size", default=256, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Timings per layer and way; the best counts.")
@name_option
@click.option("--child", default=None, hidden=True, is_eager=True)  # before --name: a child writes no result
@one_line_errors
def main(size, repeats, name, child):
    if child:  # one setting, in this process
        print(json.dumps(time_layers(json.loads(child), repeats)))
        return
    layers = candidate_layers(size)
    runs = {}
    for thp in ("1", "0"):
        click.echo(f"timing {len(layers)} layers with THP_MEM_ALLOC_ENABLE={thp} ...")
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
        proc = subprocess.run([sys.executable, __file__, "--repeats", str(repeats), "--child", json.dumps(layers),
                               "--name", "child"],
                              env=env, capture_output=True, text=True, check=True)
        runs[thp] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for on, off in zip(runs["1"], runs["0"]):
        rows.append({k: on[k] for k in ("p", "layer", "input", "dilation", "weight", "groups")} |
                    {"direct_s": on["direct_s"], "fft_s": on["fft_s"],
                     "direct_s_no_thp": off["direct_s"], "fft_s_no_thp": off["fft_s"]})
    head = f"{'scale':<6}{'layer':>6}{'input':>20}{'dil':>4}{'kernel':>7}{'direct s':>10}{'FFT s':>8}{'x':>6}" \
           f"{'| no THP: direct':>17}{'FFT':>7}{'x':>6}"
    lines = [head]
    for r in rows:
        shape = "x".join(map(str, r["input"][1:]))
        ratio = r["direct_s"] / r["fft_s"] if r["fft_s"] else float("nan")
        ratio_off = r["direct_s_no_thp"] / r["fft_s_no_thp"] if r["fft_s_no_thp"] else float("nan")
        lines.append(f"p={r['p']:<4}{r['layer']:>6}{shape:>20}{r['dilation']:>4}{r['weight'][-1]:>7}"
                     f"{r['direct_s']:>10.2f}{r['fft_s'] or float('nan'):>8.2f}{ratio:>6.2f}"
                     f"{r['direct_s_no_thp']:>17.2f}{r['fft_s_no_thp'] or float('nan'):>7.2f}{ratio_off:>6.2f}")
    table = "\n".join(lines)
    info = machine(torch.device("cpu"))
    record = {"machine": info, "image_size": size, "students": STUDENTS, "repeats": repeats,
              "weights": "random (speed does not depend on them)", "results": rows,
              "command": "python benchmarks/fft_layers.py " + " ".join(sys.argv[1:])}
    click.echo(table)
    path = write_result(name, record,
        f"# FFT candidate layers: direct vs FFT, with and without huge pages\n\nMachine: {device_label(info)}, "
        f"{', '.join(info['cpu_features'])}; torch {info['torch']}. {size} px, M={STUDENTS} (4 groups), best of "
        f"{repeats}; x = direct time / FFT time.\n\n```\n{table}\n```\n\nReproduce: `{record['command']}`\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
