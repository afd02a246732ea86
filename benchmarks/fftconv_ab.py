"""The FFT convolution of this working tree against the one of an earlier revision, layer by layer.

    python benchmarks/fftconv_ab.py --baseline ed3b984

Per FFT candidate layer of the 3-scale model at 256 px (real shapes, M=3, random weights): both
versions of `engines/fftconv.py` run the layer at the tile the engine picks, timed in alternating
rounds after a warm-up each (a slow moment of a shared machine falls on both alike), median of the
rounds; their outputs must agree (largest difference relative to the output's largest value). The
kernel spectra, which each version makes once per layer at an engine's first batch, are timed the
same way (`spectra_median_s`). The
baseline is read with `git show REV:engines/fftconv.py` and loaded as a module of its own, with its
own workspace. Writes benchmarks/results/<name>.json and a .md table.
"""
from __future__ import annotations

import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import click

from ustudents.engines import fftconv  # noqa: E402  (first: ustudents sets THP_MEM_ALLOC_ENABLE)
import torch  # noqa: E402

from common import memory_gbps, name_option, one_line_errors, write_layer_result  # noqa: E402
from fft_layers import candidate_layers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_revision(rev: str, folder: Path):
    """engines/fftconv.py as it was at `rev`, as a module (it imports only torch)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:engines/fftconv.py"], check=True,
                            capture_output=True, text=True).stdout
    path = folder / "fftconv_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fftconv_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_layer(layer: dict, versions: dict, rounds: int) -> dict:
    torch.manual_seed(0)
    k, g, d = layer["weight"][-1], layer["groups"], layer["dilation"]
    weight = torch.randn(layer["weight"]) / (layer["weight"][1] * k * k) ** 0.5
    bias, x = torch.randn(layer["weight"][0]), torch.randn(layer["input"])
    convs = {label: module.SpectralConv(weight, bias, g) for label, module in versions.items()}
    outputs = {label: conv(x, d) for label, conv in convs.items()}  # warm-up: spectra, workspace pages
    reference = outputs["baseline"]
    difference = max((y - reference).abs().max().item() for y in outputs.values()) / reference.abs().max().item()
    del outputs, reference
    tile = convs["this tree"].tile_for(x, d)
    runs = {label: [] for label in convs}
    spectra = {label: [] for label in convs}
    for _ in range(rounds):
        for label, conv in convs.items():
            t0 = time.perf_counter()
            conv(x, d)
            runs[label].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            versions[label].kernel_spectrum(weight, g, tile)
            spectra[label].append(time.perf_counter() - t0)
    return {**layer, "tile": tile, "relative_difference": difference,
            "median_s": {label: statistics.median(v) for label, v in runs.items()},
            "runs_s": runs, "spectra_median_s": {label: statistics.median(v) for label, v in spectra.items()}}


@click.command()
@click.option("--baseline", required=True, help="Git revision whose engines/fftconv.py to compare against.")
@click.option("--image-size", "size", default=256, show_default=True)
@click.option("--rounds", default=3, show_default=True, help="Alternating rounds over the two versions.")
@name_option
@one_line_errors
def main(baseline, size, rounds, name):
    torch.set_grad_enabled(False)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", baseline], check=True,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"baseline": load_revision(baseline, Path(tmp)), "this tree": fftconv}
        bandwidth = [memory_gbps(torch.device("cpu"))]
        rows = [time_layer(layer, versions, rounds) for layer in candidate_layers(size)]
        bandwidth.append(memory_gbps(torch.device("cpu")))
    total = {label: sum(r["median_s"][label] for r in rows) for label in versions}
    spectra = {label: sum(r["spectra_median_s"][label] for r in rows) for label in versions}
    lines = [f"{'scale':<6}{'layer':>6}{'input':>16}{'dil':>4}{'k':>3}{'tile':>5}{commit + ' s':>12}"
             f"{'this tree s':>12}{'speed-up':>9}{'rel. diff':>10}{'spectra s (' + commit + ' / this)':>28}"]
    for r in rows:
        med, spec = r["median_s"], r["spectra_median_s"]
        lines.append(f"p={r['p']:<4}{r['layer']:>6}{'x'.join(map(str, r['input'][1:])):>16}{r['dilation']:>4}"
                     f"{r['weight'][-1]:>3}{r['tile']:>5}{med['baseline']:>12.3f}{med['this tree']:>12.3f}"
                     f"{med['baseline'] / med['this tree']:>9.2f}{r['relative_difference']:>10.1e}"
                     f"{spec['baseline']:>19.3f} / {spec['this tree']:.3f}")
    lines.append(f"sum of medians: {commit} {total['baseline']:.2f} s, this tree {total['this tree']:.2f} s "
                 f"({total['baseline'] / total['this tree']:.2f}x); kernel spectra {spectra['baseline']:.2f} s "
                 f"against {spectra['this tree']:.2f} s")
    write_layer_result(name, f"FFT convolution layers: this tree against {commit}", "\n".join(lines),
                       {"baseline": commit, "results": rows, "total_median_s": total,
                        "speedup": total["baseline"] / total["this tree"], "spectra_total_median_s": spectra},
                       bandwidth, size, rounds)


if __name__ == "__main__":
    main()
