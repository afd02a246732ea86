"""Each FFT candidate layer of the 3-scale model at every tile side the FFT may take, against the one
`fftconv.choose_tile` picks.

    python benchmarks/fft_tiles.py

Per layer (real shapes at 256 px, M=3, random weights): the FFT convolution with each side of
`fftconv.TILES`, timed in alternating rounds after a warm-up each (so that a slow moment of a shared
machine falls on every side alike), median and best of the rounds, next to the modelled cost
(`fftconv.tile_cost`) relative to the default tile and the tile the engine picks. Writes
benchmarks/results/fft_tiles_<device>.json and a .md table.
"""
from __future__ import annotations

import statistics
import time

import click

from ustudents.engines import fftconv  # noqa: E402  (first: ustudents sets THP_MEM_ALLOC_ENABLE)
import torch  # noqa: E402

from common import memory_gbps, name_option, one_line_errors, write_layer_result  # noqa: E402
from fft_layers import candidate_layers  # noqa: E402


def time_tiles(layer: dict, rounds: int) -> dict:
    torch.manual_seed(0)
    weight, bias = torch.randn(layer["weight"]) * 0.01, torch.randn(layer["weight"][0])
    x = torch.randn(layer["input"])
    d, g, k = layer["dilation"], layer["groups"], layer["weight"][-1]
    shape = fftconv.SpectralConv(weight, bias, g).shape_on(x, d)  # what the engine's choice sees
    spectra = {t: fftconv.kernel_spectrum(weight, g, t) for t in fftconv.TILES}
    runs = {t: [] for t in fftconv.TILES}
    with torch.no_grad():
        for t in fftconv.TILES:  # warm-up: the FFT's plans, the workspace's pages
            fftconv.spectral_conv2d(x, spectra[t], k, bias, d, t)
        for _ in range(rounds):
            for t in fftconv.TILES:
                t0 = time.perf_counter()
                fftconv.spectral_conv2d(x, spectra[t], k, bias, d, t)
                runs[t].append(time.perf_counter() - t0)
    cost = {t: fftconv.tile_cost(*shape, t) for t in fftconv.TILES}
    return {**layer, "outputs_per_grid": list(shape[:2]), "chosen_tile": fftconv.choose_tile(*shape),
            "median_s": {t: statistics.median(v) for t, v in runs.items()},
            "best_s": {t: min(v) for t, v in runs.items()},
            "modelled_cost_vs_default": {t: cost[t] / cost[fftconv.TILE] for t in fftconv.TILES}}


@click.command()
@click.option("--image-size", "size", default=256, show_default=True)
@click.option("--rounds", default=5, show_default=True, help="Alternating rounds over the tile sides.")
@name_option
@one_line_errors
def main(size, rounds, name):
    torch.set_grad_enabled(False)
    bandwidth = [memory_gbps(torch.device("cpu"))]
    rows = [time_tiles(layer, rounds) for layer in candidate_layers(size)]
    bandwidth.append(memory_gbps(torch.device("cpu")))
    tiles = fftconv.TILES
    head = f"{'scale':<6}{'layer':>6}{'input':>16}{'dil':>4}{'k':>3}" + "".join(f"{'T=' + str(t) + ' s':>9}" for t in tiles) \
        + "".join(f"{'model ' + str(t):>9}" for t in tiles) + f"{'chosen':>8}{'vs T=16':>9}"
    lines = [head]
    total = {"default": 0.0, "chosen": 0.0}
    for r in rows:
        med = r["median_s"]
        total["default"] += med[fftconv.TILE]
        total["chosen"] += med[r["chosen_tile"]]
        lines.append(f"p={r['p']:<4}{r['layer']:>6}{'x'.join(map(str, r['input'][1:])):>16}{r['dilation']:>4}"
                     f"{r['weight'][-1]:>3}" + "".join(f"{med[t]:>9.3f}" for t in tiles)
                     + "".join(f"{r['modelled_cost_vs_default'][t]:>9.2f}" for t in tiles)
                     + f"{r['chosen_tile']:>8}{med[r['chosen_tile']] / med[fftconv.TILE]:>9.2f}")
    lines.append(f"sum of medians: every layer at T={fftconv.TILE} {total['default']:.2f} s, "
                 f"at the chosen tiles {total['chosen']:.2f} s ({total['chosen'] / total['default']:.2f}x)")
    write_layer_result(name, "FFT candidate layers at every tile side", "\n".join(lines),
                       {"tiles": list(tiles), "results": rows, "total_median_s": total}, bandwidth, size, rounds,
                       f"; model = `fftconv.tile_cost` relative to T={fftconv.TILE}")


if __name__ == "__main__":
    main()
