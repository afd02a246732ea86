"""The CPU bf16 path: each scale's dense pass runs in whichever equivalent form (networks grouped or
apart, NCHW or channels-last) measures fastest, with the same descriptors, and the bf16 torch engine
gives the maps of the bfloat16-autocast reference it replaced."""
from __future__ import annotations

import pytest
import torch

from ustudents.engines import patchnet
from ustudents.engines.model import AnomalyModel
from ustudents.engines.patchnet import SCALES, PatchNet
from ustudents.engines.runtime import native_bf16, torch_runner

FORMS = ["grouped, NCHW", "apart, NCHW", "grouped, channels-last", "apart, channels-last"]


@pytest.mark.parametrize("p", SCALES)
def test_every_form_gives_the_grouped_descriptors(p):
    torch.manual_seed(p)
    net = PatchNet(p, n=3).eval()
    image = torch.randn(2, 3, 40, 44)
    keys = set(net.state_dict())
    with torch.no_grad():
        want = net.dense_image(image)
        assert list(net.use_fastest_form().forms) == FORMS
        for form in FORMS:
            net.form = form  # as if measured fastest
            got = net.dense_image(image)
            assert got.shape == want.shape == (2, 3, 128, 40, 44)
            assert got.is_contiguous()  # NCHW for the scoring head, whatever the form's memory format
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), form
    assert set(net.state_dict()) == keys  # the copies are not state: bundles and exports are unchanged


def test_forms_copy_the_weights_dtype_and_lay_them_out():
    net = PatchNet(17, n=2).to(torch.bfloat16).use_fastest_form()
    nets, fmt = net.forms["apart, channels-last"]
    w = nets[1].convs[1].weight
    assert len(nets) == 2 and fmt == torch.channels_last
    assert w.dtype == torch.bfloat16 and w.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w, net.convs[1].weight[w.shape[0]:])
    grouped, fmt = net.forms["grouped, NCHW"]
    assert len(grouped) == 1 and grouped[0].n == 2 and grouped[0].convs[1].weight.is_contiguous()


@pytest.mark.parametrize("fastest", FORMS)
def test_the_fastest_form_is_measured_once_and_kept(fastest, monkeypatch):
    torch.manual_seed(0)
    net = PatchNet(17, n=2).eval()
    image = torch.randn(1, 3, 40, 40)
    timed_forms = []

    def fake_timed(fn, form, *args):  # a clock on which one form is always the fastest
        timed_forms.append(form)
        return fn(form, *args), 1.0 if form == fastest else 2.0
    monkeypatch.setattr(patchnet, "timed", fake_timed)
    monkeypatch.setattr(patchnet, "PLANS", {})
    with torch.no_grad():
        want = net.dense_image(image)
        net.use_fastest_form()
        first = net.dense_image(image)
        second = net.dense_image(image)
    assert timed_forms == FORMS  # each form timed once, on the first pass only
    assert net.form == fastest and list(net.forms) == [fastest]  # the other copies are freed
    for got in (first, second):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_network_of_measured_shapes_takes_the_fastest_form_without_timing_again(monkeypatch):
    timed_forms = []

    def fake_timed(fn, form, *args):
        timed_forms.append(form)
        return fn(form, *args), 1.0 if form == FORMS[-1] else 2.0
    monkeypatch.setattr(patchnet, "timed", fake_timed)
    monkeypatch.setattr(patchnet, "PLANS", {})
    image = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.manual_seed(0)
        PatchNet(17, n=2).eval().use_fastest_form().dense_image(image)
        assert timed_forms == FORMS
        torch.manual_seed(1)
        second = PatchNet(17, n=2).eval()
        want = second.dense_image(image)
        got = second.use_fastest_form().dense_image(image)
        assert timed_forms == FORMS  # not timed again
        assert second.form == FORMS[-1] and list(second.forms) == [FORMS[-1]]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        PatchNet(17, n=3).eval().use_fastest_form().dense_image(image)  # other networks: measured
        assert timed_forms == FORMS * 2


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bfloat16 (no bf16 engine)")
def test_the_cpu_bf16_engine_matches_the_autocast_reference():
    torch.manual_seed(0)
    model = AnomalyModel([17, 33], students=2).eval()
    for ens in model.ensembles:
        ens.score_stats.copy_(torch.tensor([2.0, 3.0, 0.5, 0.25]))
    reference = AnomalyModel([17, 33], students=2).eval()
    reference.load_state_dict(model.state_dict())
    images = torch.rand(2, 3, 48, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want_fused, want_scales = reference(images)
    run = torch_runner(model, torch.device("cpu"), "bf16")
    # Within bfloat16's rounding (8 bits: 2**-8 of the largest value), not bit for bit: the forms
    # run other kernels than autocast's, which round otherwise on some CPUs (equal on an AMX Xeon,
    # 0.2% of the maximum on an AVX512-BF16 EPYC). A wrong form or scoring is off by far more.
    bf16_rounding = 2.0 ** -8
    with torch.no_grad():
        for _ in range(2):  # the first call measures the forms, the second runs the fastest
            got_fused, got_scales = run(images)
            assert got_fused.dtype == torch.float32
            assert (got_fused - want_fused).abs().max() <= bf16_rounding * want_fused.abs().max()
            assert (got_scales - want_scales).abs().max() <= bf16_rounding * want_scales.abs().max()
    assert all(ens.net.form in FORMS for ens in model.ensembles)
    assert all(ens.net.convs[0].weight.dtype == torch.bfloat16 for ens in model.ensembles)
    assert model.ensembles[0].desc_mean.dtype == torch.float32  # the scoring head stays float32
