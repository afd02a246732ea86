"""Patch networks of Uninformed Students (Bergmann et al. 2020, Table 4-6) and their dense form.

A `PatchNet` holds `n` networks of one architecture fused into one module: the first convolution
reads the shared image and writes n*C channels; every later layer is a grouped convolution with
groups=n. n=1 is a single teacher, n=M the students of a scale, n=M+1 teacher and students in one
pass. The parameters of the fused module are the per-network parameters concatenated along the
output-channel axis, so `split`/`merge` convert between the two without touching numbers.

Two forwards share the weights:
- `forward(patches)`: the patch network on p x p inputs, max pooling with stride 2; one descriptor
  per patch (the form used to distil the teacher).
- `dense(image)`: Fast Dense Feature Extraction. Every stride-2 max pool becomes a stride-1 2x2 max
  whose taps are spaced by the stride accumulated so far, and every later convolution is dilated by
  that stride ("a trous"). The output at pixel (r, c) is then exactly the patch network applied to
  the p x p patch of the padded image whose top-left corner is (r, c).
  Why this form: it is built only from plain convolutions (dilated), slices and an elementwise max,
  which ONNX export and TensorRT handle natively. A dilated max pool is written as two elementwise
  maxima of shifted slices because TensorRT's pooling layer has no dilation.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .fftconv import MAX_COST_RATIO, SpectralConv, cost_ratio

log = logging.getLogger(__name__)
MEASURING = threading.Lock()  # PatchNet.dense: one form measurement at a time
# Verdicts of the measured plans (FFT or direct per layer, the dense pass's form) in this process, by
# all that decides them and never by weights: a network of the same shapes measured again (a worker's
# second model, an engine loaded again in one process) takes the verdict.
PLANS: dict[tuple, object] = {}

DESCRIPTOR_DIM = 128  # d in the paper
LEAKY_SLOPE = 5e-3  # LeakyReLU slope from the paper

# (kind, kernel, out_channels); "pool" is a 2x2 max pool with stride 2. No activation after the
# last layer (the descriptor is linear).
ARCHITECTURES: dict[int, list[tuple[str, int, int]]] = {
    65: [("conv", 5, 128), ("pool", 2, 0), ("conv", 5, 128), ("pool", 2, 0), ("conv", 5, 128),
         ("pool", 2, 0), ("conv", 4, 256), ("conv", 1, 128)],
    33: [("conv", 5, 128), ("pool", 2, 0), ("conv", 5, 256), ("pool", 2, 0), ("conv", 2, 256),
         ("conv", 4, 128)],
    17: [("conv", 6, 128), ("conv", 5, 256), ("conv", 5, 256), ("conv", 4, 128)],
}
SCALES = tuple(sorted(ARCHITECTURES))


# Where a dense output pixel's descriptor comes from (Geometry.pad_before). "receptive_field": the
# rf x rf window the network reads is centred on the pixel. "patch": the p x p patch is centred on
# it, and the network reads that patch's top-left rf x rf: p = 65's map answered a defect 2.5 pixels
# down and right of it (an audit; p = 17 and 33 pad alike either way). Bundles record theirs
# (Bundle.alignment); those written before the record are "patch".
ALIGNMENTS = ("receptive_field", "patch")
ALIGNMENT = ALIGNMENTS[0]  # what training writes


@dataclass(frozen=True)
class Geometry:
    """Where the dense output of a scale sits relative to the image.

    `rf` is the extent of input that one output really depends on. It is smaller than p for p=65
    (60) and p=33 (32): the paper's stride-2 pools floor odd sizes and drop the last row. Padding the
    image by `pad_before` above/left and `pad_after` below/right makes the dense output exactly the
    image's size, pixel (r, c) described by the p x p patch whose top-left is (r, c) - pad_before:
    under `alignment` "receptive_field" the rf x rf part the network reads is centred on (r, c) (half
    a pixel up and left where rf is even), under "patch" the whole p x p patch is.
    """

    p: int
    rf: int
    alignment: str = ALIGNMENT

    @property
    def pad_before(self) -> int:
        return self.rf // 2 if self.alignment == "receptive_field" else self.p // 2

    @property
    def pad_after(self) -> int:
        return self.rf - 1 - self.pad_before


def geometry(p: int, alignment: str = ALIGNMENT) -> Geometry:
    if p not in ARCHITECTURES:
        raise ValueError(f"no patch network for p={p}; choose one of {SCALES}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"no alignment {alignment!r}; choose one of {ALIGNMENTS}")
    # Walk back from one output pixel: a conv of kernel k needs k-1 more inputs, a stride-2 pool
    # doubles what it needs.
    need = 1
    for kind, k, _ in reversed(ARCHITECTURES[p]):
        need = need + k - 1 if kind == "conv" else need * 2
    return Geometry(p=p, rf=need, alignment=alignment)


class PatchNet(nn.Module):
    """`n` patch networks with receptive field `p`, fused by grouped convolutions."""

    def __init__(self, p: int, n: int = 1, in_channels: int = 3, alignment: str = ALIGNMENT):
        super().__init__()
        self.p, self.n, self.in_channels = p, n, in_channels
        self.geometry = geometry(p, alignment)
        convs = []
        c_in, first = in_channels, True
        for kind, k, c_out in ARCHITECTURES[p]:
            if kind == "conv":
                # The first layer reads the shared image (no groups); later layers stay in their group.
                convs.append(nn.Conv2d(c_in if first else c_in * n, c_out * n, k, groups=1 if first else n))
                c_in, first = c_out, False
        self.convs = nn.ModuleList(convs)
        # Per conv layer: a SpectralConv (FFT) to use in the dense form instead of F.conv2d, or None.
        # Plain attribute, not state: set by `use_fft`, never saved.
        self.spectral: list[SpectralConv | None] | None = None
        # Equivalent forms of the dense pass by name: (networks to run one after another, memory
        # format), and the one chosen (None: not measured yet). Plain attributes: set by
        # `use_fastest_form`, never saved.
        self.forms: dict[str, tuple[list[PatchNet], torch.memory_format]] | None = None
        self.form: str | None = None

    def use_fft(self, enable: bool = True, measure: bool = True) -> "PatchNet":
        """Run the dense form's large convolutions through the FFT (fftconv.py): same descriptors up to
        float rounding, several times fewer operations. The kernels' spectra are taken from the
        current weights, so call this after loading them (and again after changing them).

        With `measure`, the first dense pass times each such layer both ways on its real input and
        keeps the FFT only where it was faster, freeing the other spectra (a plan by measurement, as
        FFTW's planner or cuDNN's benchmark mode make one). Which way wins depends on the CPU's
        arithmetic against its memory bandwidth and on huge pages: on a 2-core AVX-512 EPYC the FFT
        won all 8 candidate layers with them and lost 4 without (benchmarks/results/fft_layers_cpu.json).
        A layer of the same shapes on an input of the same shape measured before in this process
        takes that verdict (PLANS)."""
        self.spectral = None
        if enable:
            self.spectral = [SpectralConv(c.weight, c.bias, c.groups) if worth_fft(c) else None
                             for c in self.convs]
            for s in self.spectral:
                if s is not None:
                    s.chosen = not measure
        return self

    def use_fastest_form(self) -> "PatchNet":
        """Run the dense form in whichever of four equivalent forms is fastest: the n networks in one
        grouped pass or apart (one after another), each on NCHW or channels-last memory. Same
        descriptors; which is fastest depends on the device's kernels. With bfloat16 weights on a
        2-core Xeon with AMX, channels-last ran p=17 1.33-1.39x faster than NCHW (networks apart:
        benchmarks/results/engines_cpu_amx_forms.json), and the networks apart
        beat the grouped pass at p=17 and p=33; on an AVX512-BF16 EPYC, where channels-last under
        autocast had measured slower, the networks apart on channels-last in bf16 won every scale too;
        on an H200 in half precision the networks apart on channels-last won every
        scale at batch 8 (README: Engines). So the first dense pass times every form on its real
        input and keeps the fastest, freeing the others, as `use_fft` does (and takes the verdict of a
        network of the same shapes measured before in this process, PLANS). The forms copy the
        current weights, dtype included: call this after casting them."""
        state = self.state_dict()
        forms = {}
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
            laid_out = {k: v.contiguous(memory_format=fmt) if v.dim() == 4 else v for k, v in state.items()}
            forms[f"grouped, {layout}"] = ([self._copy(self.n, laid_out)], fmt)
            forms[f"apart, {layout}"] = ([self._copy(1, s) for s in split(laid_out, self.n)], fmt)
        self.forms, self.form = forms, None
        return self

    def _copy(self, n: int, state: dict[str, torch.Tensor]) -> "PatchNet":
        net = PatchNet(self.p, n, self.in_channels, self.geometry.alignment)
        net.load_state_dict(state, assign=True)  # assign: keep the tensors' dtype and memory format
        return net.requires_grad_(False).eval()

    def _dense_in_form(self, form: str, padded: torch.Tensor) -> torch.Tensor:
        nets, fmt = self.forms[form]
        x = padded.contiguous(memory_format=fmt)
        # back to NCHW: the scoring head's sums over channels ran 4x slower on channels-last memory
        return torch.cat([net._run(x, dense=True).contiguous() for net in nets], 1)

    def _conv(self, i: int, x: torch.Tensor, step: int, dense: bool) -> torch.Tensor:
        """Convolution layer i; in the dense form dilated by `step`, through the FFT where planned."""
        conv = self.convs[i]
        if not dense:
            return conv(x)
        spectral = self.spectral[i] if self.spectral is not None else None
        if spectral is None or not spectral.worth_it(x, step):
            return F.conv2d(x, conv.weight, conv.bias, dilation=step, groups=conv.groups)
        if spectral.chosen:
            return spectral(x, step)
        key = plan_key(x, "fft", tuple(conv.weight.shape), conv.groups, step)
        keep = PLANS.get(key)
        if keep is not None:
            y = spectral(x, step) if keep else F.conv2d(x, conv.weight, conv.bias, dilation=step, groups=conv.groups)
        else:
            # Each way twice, alternating, the best of each counting: first calls pay one-off costs (the
            # FFT's transform plans, oneDNN's primitives, fresh pages), and on a shared 2-core machine one
            # timing was seen a third off (benchmarks/results/engines_cpu_avx2_planned.json).
            direct_s = fft_s = float("inf")
            for _ in range(2):
                y, seconds = timed(F.conv2d, x, conv.weight, conv.bias, dilation=step, groups=conv.groups)
                direct_s = min(direct_s, seconds)
                fft_s = min(fft_s, timed(spectral, x, step)[1])
            keep = PLANS[key] = fft_s < direct_s
            log.info("p=%d conv %d on %s: FFT (tiles of %d) %.3f s, direct %.3f s: %s", self.p, i, tuple(x.shape),
                     spectral.tile_for(x, step), fft_s, direct_s, "FFT" if keep else "direct")
        if keep:
            spectral.chosen = True
        else:
            self.spectral[i] = None  # frees the spectrum
        return y

    def _run(self, x: torch.Tensor, dense: bool) -> torch.Tensor:
        step, i = 1, 0  # step: the stride accumulated by the pools so far
        layers = ARCHITECTURES[self.p]
        for j, (kind, _, _) in enumerate(layers):
            if kind == "pool":
                if dense:
                    # 2x2 max with taps `step` apart, stride 1: a dilated max pool, as two maxima.
                    x = torch.maximum(x[:, :, :-step], x[:, :, step:])
                    x = torch.maximum(x[:, :, :, :-step], x[:, :, :, step:])
                else:
                    x = F.max_pool2d(x, 2)
                step *= 2
                continue
            x = self._conv(i, x, step, dense)
            i += 1
            if j < len(layers) - 1:
                # in place: the convolution's output has no other reader (autograd keeps what it needs),
                # and a dense layer's output is hundreds of MB whose fresh pages cost time to map
                x = F.leaky_relu(x, LEAKY_SLOPE, inplace=True)
        return x

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, C, p, p) patches -> (B, n, 128) descriptors."""
        y = self._run(patches, dense=False)
        return y.reshape(y.shape[0], self.n, DESCRIPTOR_DIM)

    def dense(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, C, H + rf - 1, W + rf - 1) padded image -> (B, n, 128, H, W) descriptors."""
        if self.forms is None:
            y = self._run(padded, dense=True)
        elif self.form is not None:
            y = self._dense_in_form(self.form, padded)
        else:
            # one measurement at a time: a second thread's first call would look up a form that
            # the first thread's measurement has just freed
            with MEASURING:
                key = plan_key(padded, "form", self.p, self.n, self.in_channels, self.convs[0].weight.dtype)
                if self.form is None and key not in PLANS:
                    seconds = {}
                    for form in self.forms:
                        if padded.is_cuda:  # a first call pays cuDNN's algorithm search for its shapes
                            self._dense_in_form(form, padded)
                        y, seconds[form] = timed(self._dense_in_form, form, padded)
                    self.form = PLANS[key] = min(seconds, key=seconds.get)
                    log.info("p=%d dense on %s: %s; fastest: %s", self.p, tuple(padded.shape),
                             ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items()), self.form)
                else:
                    self.form = self.form or PLANS[key]
                    y = self._dense_in_form(self.form, padded)
                self.forms = {self.form: self.forms[self.form]}  # frees the other copies
        return y.reshape(y.shape[0], self.n, DESCRIPTOR_DIM, y.shape[-2], y.shape[-1])

    def pad(self, image: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
        """Pad a (B, C, H, W) image so that `dense` returns (B, n, 128, H, W)."""
        g = self.geometry
        return F.pad(image, (g.pad_before, g.pad_after, g.pad_before, g.pad_after), mode=mode)

    def dense_image(self, image: torch.Tensor) -> torch.Tensor:
        """Descriptors of every pixel of an unpadded (B, C, H, W) image: (B, n, 128, H, W)."""
        return self.dense(self.pad(image))


def worth_fft(conv: nn.Conv2d) -> bool:
    """FFT for kernels that save operations even on large images (not 1x1 or 2x2) between wide
    layers: with few input channels (the first layer reads 3) the per-channel transforms cost more
    than the channel mixing saves."""
    return cost_ratio(1024, 1024, conv.kernel_size[0]) <= MAX_COST_RATIO and conv.in_channels // conv.groups >= 32


def plan_key(x: torch.Tensor, *what) -> tuple:
    """The key of a plan measured on input x: what is planned (and its shapes), and x's shape, dtype and
    device, and the threads torch computes with."""
    return (*what, tuple(x.shape), x.dtype, str(x.device), torch.get_num_threads())


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """fn(*args, **kwargs) and its wall time in seconds (on a GPU, until its work has finished)."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def split(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """State dict of a fused PatchNet(n) -> n state dicts of PatchNet(1)."""
    return [{k: v.chunk(n, dim=0)[i].clone() for k, v in state.items()} for i in range(n)]


def merge(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """n state dicts of PatchNet(1) -> the state dict of the fused PatchNet(n)."""
    return {k: torch.cat([s[k] for s in states], dim=0) for k in states[0]}
