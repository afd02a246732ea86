"""Convolution through the FFT, tile by tile (overlap-save): the numbers of `F.conv2d` (stride 1, no
padding) with several times fewer floating-point operations for the patch networks' large kernels.

Why: a direct k x k convolution costs 2*k*k operations per input channel, output channel and pixel
(50 for the 5x5 layers, 72 for 6x6). In the frequency domain the channel mixing is one complex matrix
product per frequency: 8 real operations per channel pair and frequency, and an FFT tile of side T
has T*(T//2+1) frequencies and yields (T-k+1)^2 outputs. With T=16 and k=5 that is 8*144/144 = 8
operations per output instead of 50. A layer whose (sub-)grid 16 would cut badly takes 20 or 24
(`choose_tile`). On a CPU that already runs direct convolutions near its peak
this is the way to be faster at full fp32 accuracy.

A dilated convolution (the dense layers after a pool) is d*d undilated ones on the interleaved
sub-grids ("space to batch"), so the kernel is compact again and small tiles serve. Each layer makes
one copy of its input (padded; for a dilated layer into sub-grids) and one gather of its tiles, then
runs the forward transform, the channel mixing and the inverse transform as matrix products, each
reading the layout the one before left, and writes the outputs to their place; the bias rides on
the DC bin. The transforms are products rather than FFT calls because on tiles of 16 to 24 pixels
they cost little arithmetic either way, and as products they need no transpose: torch's FFT of the
tiles plus the transpose to frequency-major for the mixing took longer than the products do: the
eight layers of the 3-scale model ran 1.20x faster in all with the products on a 2-core AVX2 EPYC
(0.94-1.54x each; benchmarks/results/fftconv_ab_cpu_avx2.json).

What made this pay on CPU is memory, not arithmetic: the intermediates are hundreds of MB each, and
with 4 KiB pages the kernel's first-touch page faults on every fresh allocation cost as much as the
products. PyTorch's allocator backs large tensors with transparent huge pages when the environment
holds THP_MEM_ALLOC_ENABLE=1, which `ustudents` sets before torch is imported (ustudents/__init__.py).
Even so, fresh huge pages cost kernel time to find and zero, and that varies with the machine's
memory (slow calls were mostly system time; benchmarks/README.md: Engines). So the intermediates live
in a per-thread workspace that every layer and call reuses (`Workspace`): their pages are mapped once.

Cross-correlation (what conv2d computes) is the inverse FFT of X * conj(W); with the kernel padded to
the tile, outputs 0..T-k of a tile involve no circular wrap-around and are exact up to rounding.
The kernels' spectra are computed once per layer and tile side (`SpectralConv`): T*(T//2+1) complex
numbers per weight pair of channels (144 at T=16), which is the price in memory: for the 3-scale
model with M=3 at 256 px, 1.2 GiB with 16-pixel tiles everywhere, 1.7 GiB with the larger tiles three
layers take (`choose_tile`; counted from the layer shapes).
"""
from __future__ import annotations

import functools
import math
import threading

import torch

TILE = 16
# Larger tile sides a layer may take instead (FFT sizes with small prime factors), chosen by
# `choose_tile` where they waste less of the last tile of a (sub-)grid.
TILES = (16, 20, 24)
# A larger tile must save at least this share of the modelled cost: its kernel spectra take
# T*(T//2+1)/144 times the memory of 16's (1.5x at 20, 2.2x at 24).
MIN_TILE_SAVING = 0.1
# Weight of the transforms' operations against the channel mixing's in that model: their products
# are short (16 to 26 terms) and run below the mixing's rate. Fitted to the tile sides timed on a
# 2-core AVX2 EPYC (benchmarks/results/fft_tiles_cpu_avx2_products.json): at 1.5 the model's ratio
# of 24 to 16 was 0.85 and 0.87 where 0.88 and 0.85 were measured, and it takes the same sides
# the timings favour by at least MIN_TILE_SAVING but one (p=65's 2nd layer: 0.85 measured at 20).
TRANSFORM_WEIGHT = 1.5
# Use the FFT only where its channel mixing needs at most this share of the direct convolution's
# operations: the transforms and the shuffling of tiles cost the rest.
MAX_COST_RATIO = 0.5
# Upper bound on each complex intermediate (tiles' and outputs' spectra) of one layer: a memory cap
# that still leaves each matrix product a few hundred columns. With a scratch tensor per step (before
# the two roles of `spectral_conv2d`), 64 MB took 0.6 of the 3-scale model's 5.8 GB peak off, at a
# speed two alternating runs could not tell from 256's (benchmarks/README.md).
CHUNK_BYTES = 256 * 2 ** 20


class Workspace(threading.local):
    """Scratch memory by role, grown to the largest size asked and reused by every layer and call of
    this thread (a worker's inference thread, say): the largest layer's padded input (and its
    sub-grids for a dilated one), and two roles that the steps on the tiles take turns in (each step
    reads what the one before wrote and writes the other), about 2 x CHUNK_BYTES at most."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of `shape` with the dtype and device of `like`, in the role's memory (bytes, so
        that a role serves real and complex steps alike)."""
        nbytes = math.prod(shape) * like.element_size()
        flat = self.buffers.get(role)
        if flat is None or flat.numel() < nbytes or flat.device != like.device:
            flat = self.buffers[role] = torch.empty(nbytes, dtype=torch.uint8, device=like.device)
        return flat[:nbytes].view(like.dtype).view(shape)

    def release(self) -> None:
        """Free this thread's scratch tensors (the next call allocates them again)."""
        self.buffers.clear()


WORKSPACE = Workspace()


def cost_ratio(out_h: int, out_w: int, kernel: int, tile: int = TILE) -> float:
    """Operations of the FFT channel mixing over those of the direct convolution (undilated kernel)."""
    step = tile - kernel + 1
    if kernel == 1 or step < 1:
        return math.inf
    fft = 8 * tile * (tile // 2 + 1) * math.ceil(out_h / step) * math.ceil(out_w / step)
    return fft / (2 * kernel * kernel * out_h * out_w)


def tile_cost(out_h: int, out_w: int, kernel: int, c_in: int, c_in_g: int, c_out: int, tile: int) -> float:
    """Modelled cost of one (sub-)grid's FFT convolution with tiles of side `tile`: per tile, the
    channel mixing (8 operations per frequency and channel pair) plus, weighted by TRANSFORM_WEIGHT,
    the inverse (two complex products: step x tile x half, then step x step x half, per output
    channel) and the forward (two products per input channel: real, 2*half x tile x tile, then
    complex, tile x tile x half)."""
    step, half = tile - kernel + 1, tile // 2 + 1
    if step < 1:
        return math.inf
    mixing = 8 * tile * half * c_in_g * c_out
    inverse = 8 * (step * tile * half + step * step * half) * c_out
    forward = (4 * half * tile * tile + 8 * tile * tile * half) * c_in
    tiles = math.ceil(out_h / step) * math.ceil(out_w / step)
    return tiles * (mixing + TRANSFORM_WEIGHT * (inverse + forward))


def choose_tile(out_h: int, out_w: int, kernel: int, c_in: int, c_in_g: int, c_out: int) -> int:
    """The tile side for a (sub-)grid of out_h x out_w outputs: TILE, unless a larger one of TILES
    saves at least MIN_TILE_SAVING of the modelled cost (`tile_cost`). That happens where TILE leaves
    much of the last tile empty: p=65's last 4x4 layer has 32 outputs per sub-grid, 3 tiles of 13 at
    16 (39) but 2 of 17 at 20 (34), and ran in 0.71x the time at 20 (2-core AVX2 EPYC;
    benchmarks/results/fft_tiles_cpu_avx2.json)."""
    costs = {t: tile_cost(out_h, out_w, kernel, c_in, c_in_g, c_out, t) for t in TILES}
    best = min(costs, key=costs.get)
    return best if costs[best] <= (1 - MIN_TILE_SAVING) * costs[TILE] else TILE


def kernel_spectrum(weight: torch.Tensor, groups: int, tile: int = TILE) -> torch.Tensor:
    """conj(rFFT) of each kernel zero-padded to the tile: (frequencies, groups, c_out/groups, c_in/groups).

    As two products with the first k columns of the conjugated DFT matrices (the padding's zeros add
    nothing), which write this frequency-major layout directly. rfft2 followed by the transpose to it
    (a strided copy of hundreds of MB) took an order of magnitude longer, paid by each layer at every
    engine load: seconds of each command's and worker's start."""
    c_out, c_in_g, k, _ = weight.shape
    half = tile // 2 + 1
    along_x, along_y = forward_dft_matrices(tile)
    conj_x = torch.complex(along_x[:half, :k], -along_x[half:, :k])  # (half, k)
    conj_y = along_y[:, :k].conj()  # (tile, k)
    kernels = weight.detach().permute(2, 3, 0, 1).reshape(k, k, c_out * c_in_g).to(conj_x.dtype)
    rows = torch.matmul(conj_x, kernels)  # along x: (k rows, half, pairs)
    spectrum = torch.mm(conj_y, rows.view(k, half * c_out * c_in_g))  # along y: (tile, half * pairs)
    return spectrum.view(tile * half, groups, c_out // groups, c_in_g)


def spectral_conv2d(x: torch.Tensor, spectrum: torch.Tensor, kernel: int, bias: torch.Tensor | None,
                    dilation: int = 1, tile: int = TILE) -> torch.Tensor:
    """Unpadded, stride-1 grouped conv2d of x (B, C_in, H, W) with a kernel given as `kernel_spectrum`.

    A dilated convolution is d*d undilated ones, one per interleaved sub-grid x[..., i::d, j::d]
    ("space to batch"): the sub-grids are copied out once, so that the tiles' rows are contiguous,
    and the outputs are written straight back to their interleaved places.

    The transforms are matrix products (`forward_dft_matrices`, `inverse_dft_matrices`; why: the
    module's docstring): the tiles are gathered with their rows contiguous, as in the image, and
    every later step reads its input in place, but for one interleaving of real and imaginary
    planes. The mixing stays one complex product per frequency: it ran faster than the same
    arithmetic as real products (four, three by Gauss's trick, or one of a block matrix)."""
    b, c_in, h, w = x.shape
    freqs, groups, co_g, _ = spectrum.shape
    d = dilation
    out_h, out_w = h - d * (kernel - 1), w - d * (kernel - 1)
    step, half = tile - kernel + 1, tile // 2 + 1
    nh, nw = math.ceil(out_h / (step * d)), math.ceil(out_w / (step * d))
    # Pad so that every sub-grid holds nh (nw) whole tiles: tile (i, j) of a sub-grid starts at
    # (i*step, j*step) in sub-grid pixels and spans `tile` of them.
    sub_h, sub_w = nh * step + kernel - 1, nw * step + kernel - 1
    ws = WORKSPACE
    padded = ws.get("padded", (b, c_in, sub_h * d, sub_w * d), x)
    padded[:, :, :h, :w].copy_(x)
    padded[:, :, h:].zero_()
    padded[:, :, :h, w:].zero_()
    x = padded
    if d > 1:
        grids = ws.get("sub_grids", (b, d, d, c_in, sub_h, sub_w), x)
        grids.copy_(x.view(b, c_in, sub_h, d, sub_w, d).permute(0, 3, 5, 1, 2, 4))
        x = grids.view(b * d * d, c_in, sub_h, sub_w)
    tiles = x.unfold(2, tile, step).unfold(3, tile, step)  # (b*d*d, c_in, nh, nw, tile, tile): a view
    c_out = groups * co_g
    forward_x, forward_y = forward_dft_matrices(tile)
    inverse_y, inverse_x = inverse_dft_matrices(tile, step)
    y = x.new_empty(b, c_out, nh, step, d, nw, step, d)
    # Rows of tiles in chunks: bounds the complex intermediates to about CHUNK_BYTES each.
    per_row = b * d * d * nw * freqs * 8 * max(c_in, c_out)
    rows = max(1, min(nh, CHUNK_BYTES // per_row))
    # The steps below take turns in two scratch roles, "even" and "odd": each reads what the step
    # before it wrote and writes the other role, whose last contents nothing reads any more. For the
    # 3-scale model at 256 px the workspace held 2.5 GB with a role per step, 1.2 GB with the two
    # (the padded input and its sub-grids are the rest; benchmarks/README.md).
    for i in range(0, nh, rows):
        r = min(rows, nh - i)
        n = b * d * d * r * nw  # tiles in this chunk
        # (tile_y, c_in, tiles, tile_x): each tile row as contiguous as in the image.
        pixels = ws.get("even", (tile, c_in, b * d * d, r, nw, tile), x)
        pixels.copy_(tiles[:, :, i:i + r].permute(4, 1, 0, 2, 3, 5))
        # Along x, real in, a real and an imaginary plane out: (tile_y, 2, half, c_in*n) ...
        planes = ws.get("odd", (tile, 2 * half, c_in * n), x)
        torch.matmul(forward_x, pixels.view(tile, c_in * n, tile).transpose(1, 2), out=planes)
        # ... interleaved to complex (tile_y, half, c_in*n) for the complex products from here on.
        along_x = ws.get("even", (tile, half, c_in * n), spectrum)
        torch.view_as_real(along_x).copy_(planes.view(tile, 2, half, c_in * n).permute(0, 2, 3, 1))
        # Along y: frequency-major (tile, half, c_in, tiles), what the channel mixing takes.
        xf = ws.get("odd", (tile, half * c_in * n), spectrum)
        torch.mm(forward_y, along_x.view(tile, half * c_in * n), out=xf)
        major = xf.view(freqs, groups, c_in // groups, n)
        yf = torch.matmul(spectrum, major, out=ws.get("even", (freqs, groups, co_g, n), spectrum))
        if bias is not None:  # a constant on every output is the DC bin times tile*tile: no pass over y
            yf[0] += (bias * (tile * tile)).reshape(groups, co_g, 1)
        # Inverse along y, (step_y, half, c_out*n), then along x to (step_y, c_out*n, step_x): each
        # tile's output rows contiguous, as y holds them.
        a = ws.get("odd", (step, half * c_out * n), spectrum)
        torch.mm(inverse_y, yf.view(tile, half * c_out * n), out=a)
        out = ws.get("even", (step, c_out * n, step), spectrum)
        torch.matmul(a.view(step, half, c_out * n).transpose(1, 2), inverse_x, out=out)
        y[:, :, i:i + r] = out.real.view(step, c_out, b, d, d, r, nw, step).permute(2, 1, 5, 0, 3, 6, 7, 4)
    return y.reshape(b, c_out, nh * step * d, nw * step * d)[:, :, :out_h, :out_w]


@functools.lru_cache(maxsize=8)
def forward_dft_matrices(tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real 2-D DFT of a tile (rfft2) as two matrices: along x, real (2*half, tile), rows the real
    and then the imaginary part of each frequency; along y, complex (tile, tile)."""
    t = torch.arange(tile, dtype=torch.float64)
    kx = torch.arange(tile // 2 + 1, dtype=torch.float64)
    along_x = torch.exp(-2j * math.pi * kx[:, None] * t[None] / tile)
    along_y = torch.exp(-2j * math.pi * t[:, None] * t[None] / tile)
    return torch.cat([along_x.real, along_x.imag]).float(), along_y.to(torch.complex64)


@functools.lru_cache(maxsize=8)
def inverse_dft_matrices(tile: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse real 2-D DFT of a tile, keeping only its first `step` x `step` outputs, as two
    complex matrices: inverse along y (step, tile), and the Hermitian (c2r) inverse along x,
    transposed (tile//2+1, step), whose products' real part is the output."""
    n = torch.arange(step, dtype=torch.float64)[:, None]
    ky = torch.arange(tile, dtype=torch.float64)[None]
    kx = torch.arange(tile // 2 + 1, dtype=torch.float64)[None]
    along_y = torch.exp(2j * math.pi * n * ky / tile) / tile
    # A real signal's spectrum holds bins 1..tile/2-1 twice (as conjugate pairs): weight 2, others 1.
    twice = torch.where((kx > 0) & (kx < tile // 2), 2.0, 1.0)
    along_x = torch.exp(2j * math.pi * n * kx / tile) * twice / tile
    return along_y.to(torch.complex64), along_x.t().to(torch.complex64)


class SpectralConv:
    """One convolution layer (weight, bias, groups) run through the FFT: `conv(x, dilation)` equals
    `F.conv2d(x, weight, bias, dilation=dilation, groups=groups)`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: int):
        self.weight, self.groups, self.kernel = weight.detach(), groups, weight.shape[-1]
        self.bias = None if bias is None else bias.detach()
        # Kernel spectra by tile side, each made at the first input that takes that tile: the tile
        # depends on the input's size (`tile_for`), which a deployed engine keeps fixed.
        self.spectra: dict[int, torch.Tensor] = {}
        # Whether this layer takes the FFT without first timing it against the direct convolution
        # (PatchNet.use_fft sets it: after measuring, or at once when measuring is off).
        self.chosen = True

    def shape_on(self, x: torch.Tensor, dilation: int) -> tuple[int, int, int, int, int, int]:
        """(out_h, out_w, kernel, c_in, c_in_g, c_out) on this input, out_* per (sub-)grid: what
        `choose_tile` and `tile_cost` take."""
        c_out, c_in_g = self.weight.shape[:2]
        h, w = (math.ceil(n / dilation) - self.kernel + 1 for n in x.shape[-2:])
        return h, w, self.kernel, x.shape[1], c_in_g, c_out

    def tile_for(self, x: torch.Tensor, dilation: int) -> int:
        return choose_tile(*self.shape_on(x, dilation))

    def worth_it(self, x: torch.Tensor, dilation: int) -> bool:
        """Whether the FFT can beat the direct convolution on this input: it saves enough operations
        (MAX_COST_RATIO). Whether it does on this machine is for PatchNet.use_fft to measure."""
        h, w = self.shape_on(x, dilation)[:2]
        return h > 0 and w > 0 and cost_ratio(h, w, self.kernel, self.tile_for(x, dilation)) <= MAX_COST_RATIO

    def __call__(self, x: torch.Tensor, dilation: int = 1) -> torch.Tensor:
        tile = self.tile_for(x, dilation)
        if tile not in self.spectra:
            self.spectra[tile] = kernel_spectrum(self.weight, self.groups, tile)
        return spectral_conv2d(x, self.spectra[tile], self.kernel, self.bias, dilation, tile)
