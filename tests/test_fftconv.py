"""FFT convolution (the CPU torch backend's fast path) gives the numbers of the direct convolution,
in every layer shape the dense patch networks use, and the engine actually takes it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ustudents.engines import fftconv
from ustudents.engines.fftconv import SpectralConv, cost_ratio
from ustudents.engines.model import AnomalyModel
from ustudents.engines import patchnet
from ustudents.engines.patchnet import SCALES, PatchNet
from ustudents.engines.runtime import torch_runner


@pytest.mark.parametrize("c_in,c_out,groups,k,dilation,h,w", [
    (3, 8, 1, 6, 1, 40, 37),     # first layer of p=17, odd sizes
    (16, 24, 2, 5, 1, 29, 45),   # grouped, more than one tile each way, last tile partial
    (16, 8, 2, 5, 2, 41, 40),    # dilated: size not a multiple of the dilation
    (8, 8, 2, 5, 4, 150, 90),    # dilated, several tiles per sub-grid
    (8, 8, 4, 4, 8, 77, 70),     # p=65's last 4x4 layer after three pools
    (8, 16, 2, 2, 4, 30, 33),    # p=33's 2x2 layer
])
def test_spectral_conv_equals_conv2d(c_in, c_out, groups, k, dilation, h, w):
    torch.manual_seed(0)
    x = torch.randn(2, c_in * groups, h, w)
    weight = torch.randn(c_out * groups, c_in, k, k) / (c_in * k * k) ** 0.5
    bias = torch.randn(c_out * groups)
    want = F.conv2d(x, weight, bias, dilation=dilation, groups=groups)
    got = SpectralConv(weight, bias, groups)(x, dilation)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("dilation", [1, 2])
def test_chunks_of_one_tile_row_each_reusing_two_scratch_roles_give_conv2d(dilation, monkeypatch):
    """At 256 px a layer runs in several chunks of tile rows, its steps taking turns in two scratch
    roles; a step that read memory the step before had reused would go unseen in one chunk."""
    monkeypatch.setattr(fftconv, "CHUNK_BYTES", 1)  # one tile row per chunk
    monkeypatch.setattr(fftconv, "WORKSPACE", fftconv.Workspace())
    torch.manual_seed(dilation)
    x = torch.randn(2, 32, 75, 61)
    weight, bias = torch.randn(48, 16, 5, 5) / (16 * 25) ** 0.5, torch.randn(48)
    want = F.conv2d(x, weight, bias, dilation=dilation, groups=2)
    got = SpectralConv(weight, bias, 2)(x, dilation)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert set(fftconv.WORKSPACE.buffers) == {"padded", "even", "odd"} | ({"sub_grids"} if dilation > 1 else set())


@pytest.mark.parametrize("tile", fftconv.TILES)
@pytest.mark.parametrize("k,dilation,h,w", [(5, 1, 53, 47), (4, 8, 77, 70), (5, 2, 61, 58)])
def test_every_tile_side_gives_conv2d(tile, k, dilation, h, w):
    torch.manual_seed(tile)
    x = torch.randn(1, 16, h, w)
    weight, bias = torch.randn(12, 8, k, k) / (8 * k * k) ** 0.5, torch.randn(12)
    want = F.conv2d(x, weight, bias, dilation=dilation, groups=2)
    got = fftconv.spectral_conv2d(x, fftconv.kernel_spectrum(weight, 2, tile), k, bias, dilation, tile)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("tile", fftconv.TILES)
@pytest.mark.parametrize("k", [2, 4, 5, 6])
def test_kernel_spectrum_is_the_conjugated_rfft_of_the_padded_kernel_frequency_major(tile, k):
    torch.manual_seed(k)
    weight = torch.randn(12, 8, k, k)
    want = torch.fft.rfft2(F.pad(weight, (0, tile - k, 0, tile - k))).conj()  # (c_out, c_in_g, tile, half)
    want = want.reshape(3, 4, 8, -1).permute(3, 0, 1, 2)
    got = fftconv.kernel_spectrum(weight, 3, tile)
    assert got.shape == want.shape == (tile * (tile // 2 + 1), 3, 4, 8)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_larger_tile_is_taken_only_where_it_saves_enough():
    # p=65's last 4x4 layer at 256 px (M=3): 32 outputs per sub-grid fill 2 tiles of 17 at 20 but
    # 3 of 13 at 16; p=17's first 5x5 layer fills 22 tiles of 12 almost exactly and keeps 16.
    assert fftconv.choose_tile(32, 32, 4, 512, 128, 1024) == 20
    assert fftconv.choose_tile(263, 263, 5, 512, 128, 1024) == fftconv.TILE
    # p=65's second layer: 24 saves a little in the model, less than MIN_TILE_SAVING: not worth
    # more than twice the spectrum's memory.
    cost = {t: fftconv.tile_cost(151, 151, 5, 512, 128, 512, t) for t in fftconv.TILES}
    assert cost[24] < cost[16] and cost[24] > (1 - fftconv.MIN_TILE_SAVING) * cost[16]
    assert fftconv.choose_tile(151, 151, 5, 512, 128, 512) == fftconv.TILE


def test_a_layer_makes_the_spectrum_of_the_tile_its_input_takes(monkeypatch):
    monkeypatch.setattr(fftconv, "MIN_TILE_SAVING", -1.0)  # any tile the model ranks first is taken
    monkeypatch.setattr(fftconv, "TILES", (16, 24))
    torch.manual_seed(2)
    weight, bias = torch.randn(8, 4, 5, 5) / 10, torch.randn(8)
    conv = SpectralConv(weight, bias, 2)
    x = torch.randn(1, 8, 24, 24)  # 20 outputs: one tile of 20 at 24, two of 12 at 16
    assert conv.tile_for(x, 1) == 24
    got = conv(x)
    assert list(conv.spectra) == [24] and conv.spectra[24].shape[0] == 24 * 13
    assert (got - F.conv2d(x, weight, bias, groups=2)).abs().max() <= 1e-5 * got.abs().max()


def test_layers_sharing_the_workspace_keep_each_others_outputs_intact():
    """The intermediates are reused by every layer and call; the outputs must not be: a layer's
    output stays what it was while the next layers (other shapes, dilations) run."""
    torch.manual_seed(1)
    layers = [(torch.randn(16, 8, 5, 5) / 14, torch.randn(16), 2, 1, torch.randn(1, 16, 60, 50)),
              (torch.randn(8, 4, 4, 4) / 8, torch.randn(8), 4, 4, torch.randn(1, 16, 90, 70)),
              (torch.randn(16, 8, 5, 5) / 14, torch.randn(16), 2, 2, torch.randn(1, 16, 30, 40))]
    got = [SpectralConv(w, b, g)(x, d) for w, b, g, d, x in layers]
    again = SpectralConv(*layers[0][:3])(layers[0][4], layers[0][3])  # the first shape once more
    for (w, b, g, d, x), y in zip(layers, got):
        want = F.conv2d(x, w, b, dilation=d, groups=g)
        assert (y - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(again, got[0]) and again.data_ptr() != got[0].data_ptr()


def test_cost_ratio_counts_operations():
    # 5x5 kernel, 24x24 output, 16-pixel tiles: 2x2 tiles of 12x12 outputs, 16*9 frequencies each,
    # 8 real operations per frequency against 2*25 per output pixel.
    assert cost_ratio(24, 24, 5) == pytest.approx(8 * 144 * 4 / (50 * 24 * 24))
    assert cost_ratio(24, 24, 1) == float("inf")  # 1x1 layers stay direct


@pytest.mark.parametrize("p", SCALES)
def test_dense_networks_with_fft_equal_the_direct_ones(p, monkeypatch):
    torch.manual_seed(p)
    net = PatchNet(p, n=2, in_channels=3).eval()
    image = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        want = net.dense_image(image)
        calls = []
        real_call = SpectralConv.__call__
        monkeypatch.setattr(SpectralConv, "__call__", lambda self, x, d=1: calls.append(d) or real_call(self, x, d))
        got = net.use_fft(measure=False).dense_image(image)
    assert calls, "no layer took the FFT path, so this test would not test it"
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_the_cpu_fp32_torch_engine_plans_fft_once_and_matches_the_reference_maps(monkeypatch):
    torch.manual_seed(0)
    model = AnomalyModel([17, 33], students=2).eval()
    for ens in model.ensembles:
        ens.score_stats.copy_(torch.tensor([2.0, 3.0, 0.5, 0.25]))
    images = torch.rand(2, 3, 64, 64)
    measured = []
    monkeypatch.setattr(patchnet, "PLANS", {})  # nothing measured before in this process
    real_timed = patchnet.timed
    monkeypatch.setattr(patchnet, "timed", lambda fn, *a, **k: measured.append(fn) or real_timed(fn, *a, **k))
    with torch.no_grad():
        want_fused, want_scales = model(images)
        run = torch_runner(model, torch.device("cpu"), "fp32")
        for i in range(2):  # the first call measures the FFT candidates, the second runs the plan
            got_fused, got_scales = run(images)
            assert (got_fused - want_fused).abs().max() <= 1e-4 * want_fused.abs().max()
            assert (got_scales - want_scales).abs().max() <= 1e-4 * want_scales.abs().max()
            if i == 0:
                first = len(measured)
    assert first > 0 and len(measured) == first


@pytest.mark.parametrize("fft_faster", [True, False])
def test_fft_is_kept_only_where_it_measured_faster(fft_faster, monkeypatch):
    torch.manual_seed(0)
    net = PatchNet(17, n=2).eval()
    image = torch.randn(1, 3, 60, 60)
    with torch.no_grad():
        want = net.dense_image(image)

        def fake_timed(fn, *args, **kwargs):  # a clock on which one way is always the faster
            is_fft = isinstance(fn, SpectralConv)
            return fn(*args, **kwargs), 1.0 if is_fft == fft_faster else 2.0
        monkeypatch.setattr(patchnet, "timed", fake_timed)
        monkeypatch.setattr(patchnet, "PLANS", {})
        net.use_fft()
        candidates = [s is not None for s in net.spectral]
        first = net.dense_image(image)
        calls = []
        real_call = SpectralConv.__call__
        monkeypatch.setattr(SpectralConv, "__call__", lambda self, x, d=1: calls.append(d) or real_call(self, x, d))
        second = net.dense_image(image)
    assert candidates == [False, True, True, True]
    assert [s is not None for s in net.spectral] == (candidates if fft_faster else [False] * 4)
    assert len(calls) == (3 if fft_faster else 0)
    for got in (first, second):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("fft_faster", [True, False])
def test_a_network_of_measured_shapes_takes_the_verdict_and_new_shapes_are_measured(fft_faster, monkeypatch):
    # A worker's second model, or an engine loaded again, paid the whole measurement again (seconds a
    # model on a CPU): the verdict depends on shapes, not weights.
    timings = []

    def fake_timed(fn, *args, **kwargs):
        timings.append(fn)
        return fn(*args, **kwargs), 1.0 if isinstance(fn, SpectralConv) == fft_faster else 2.0
    monkeypatch.setattr(patchnet, "timed", fake_timed)
    monkeypatch.setattr(patchnet, "PLANS", {})
    image = torch.randn(1, 3, 60, 60)
    with torch.no_grad():
        torch.manual_seed(0)
        PatchNet(17, n=2).eval().use_fft().dense_image(image)
        assert timings
        timings.clear()
        torch.manual_seed(1)
        second = PatchNet(17, n=2).eval()
        want = second.dense_image(image)
        got = second.use_fft().dense_image(image)
        assert timings == []
        assert [s is not None for s in second.spectral] == [False, fft_faster, fft_faster, fft_faster]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        PatchNet(17, n=2).eval().use_fft().dense_image(torch.randn(1, 3, 64, 60))  # another frame size
        assert timings


def test_the_plan_times_both_ways_alike_so_a_slow_first_direct_call_does_not_pick_the_fft(monkeypatch):
    # A clock on which each layer's first direct convolution pays a one-off cost (3 s, then 1 s) and
    # the FFT always takes 2 s: the direct way is the faster one and must be kept everywhere.
    torch.manual_seed(0)
    net = PatchNet(17, n=2).eval()
    seen = {}

    def fake_timed(fn, *args, **kwargs):
        if isinstance(fn, SpectralConv):
            return fn(*args, **kwargs), 2.0
        key = id(args[1])  # the layer's weight
        seen[key] = seen.get(key, 0) + 1
        return fn(*args, **kwargs), 3.0 if seen[key] == 1 else 1.0
    monkeypatch.setattr(patchnet, "timed", fake_timed)
    monkeypatch.setattr(patchnet, "PLANS", {})
    with torch.no_grad():
        net.use_fft().dense_image(torch.randn(1, 3, 60, 60))
    assert seen and all(n == 2 for n in seen.values())
    assert net.spectral == [None] * 4


def test_fft_is_only_chosen_where_it_saves_operations():
    torch.manual_seed(0)
    weight = torch.randn(8, 8, 5, 5)
    conv = SpectralConv(weight, None, 1)
    assert conv.worth_it(torch.zeros(1, 8, 100, 100), 1)
    assert not conv.worth_it(torch.zeros(1, 8, 9, 9), 1)   # one 5x5 output: tiles are mostly waste
    assert not conv.worth_it(torch.zeros(1, 8, 20, 20), 8)  # nothing left after the dilated kernel
    assert fftconv.MAX_COST_RATIO < 1
    # No kernel spectra kept where the FFT never pays: the 3-channel first layer, 2x2 and 1x1 layers.
    kinds = [c.kernel_size[0] for c in PatchNet(33, n=2).convs]
    spectral = PatchNet(33, n=2).use_fft().spectral
    assert kinds == [5, 5, 2, 4]
    assert [s is not None for s in spectral] == [False, True, False, True]


@pytest.mark.parametrize("given,want", [(None, "1"), ("0", "0")])
def test_importing_ustudents_turns_on_huge_pages_for_torch_unless_the_user_chose(given, want):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = "import os, ustudents; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want
