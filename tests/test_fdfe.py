"""Fast Dense Feature Extraction must equal the patch network applied to each pixel's patch."""
import pytest
import torch
import torch.nn.functional as F

from ustudents.engines.patchnet import ALIGNMENTS, PatchNet, SCALES, geometry, merge, split


@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("p", SCALES)
def test_dense_equals_patch_network_at_every_border_pixel_and_random_ones(p, alignment):
    torch.manual_seed(p)
    net = PatchNet(p, n=2, alignment=alignment).eval()
    h, w = 70, 66
    image = torch.randn(1, 3, h, w)
    # the p x p patch of pixel (r, c) starts `above` rows above it (and as many columns left): so that
    # the rf x rf part the network reads is centred on the pixel, or (bundles before format 4) the patch
    rf = geometry(p).rf
    above = rf // 2 if alignment == "receptive_field" else p // 2
    with torch.no_grad():
        dense = net.dense_image(image)
        assert dense.shape == (1, 2, 128, h, w)
        # Every pixel's full p x p patch, independently of how the dense form pads.
        padded = F.pad(image, (above, p - 1 - above) * 2, mode="reflect")
        gen = torch.Generator().manual_seed(0)
        # every pixel of the image's rim, where padding matters, and random ones inside
        pixels = sorted({(r, c) for r in range(h) for c in range(w) if r in (0, h - 1) or c in (0, w - 1)})
        assert len(pixels) == 2 * (h + w) - 4
        pixels += [tuple(int(v) for v in (torch.randint(h, (1,), generator=gen), torch.randint(w, (1,), generator=gen)))
                   for _ in range(10)]
        # The p x p patch of (r, c): rows r .. r+p-1 of the padded image.
        patches = torch.cat([padded[:, :, r:r + p, c:c + p] for r, c in pixels])
        assert patches.shape[-2:] == (p, p)
        expected = net(patches)  # (pixels, n, 128)
        got = torch.stack([dense[0, :, :, r, c] for r, c in pixels])
        worst = (got - expected).abs().amax(dim=(1, 2))
        assert worst.max() <= 1e-4, (p, pixels[int(worst.argmax())])


@pytest.mark.parametrize("p", SCALES)
def test_a_change_of_one_pixel_is_answered_around_that_pixel(p):
    """Where a defect shows in the map: the descriptors a one-pixel change reaches are centred on that
    pixel, within half a pixel (rf even). With the p x p patch centred instead (alignment "patch"),
    p = 65's network, which reads only the top-left 60 x 60 of it, answered 2.5 pixels down and right
    of the change: a mask 24 px off on a 2448 px frame at 256 px (an audit)."""
    torch.manual_seed(0)
    net = PatchNet(p).eval()
    image = torch.randn(1, 3, 2 * p + 20, 2 * p + 20)
    x = image.shape[-1] // 2
    changed = image.clone()
    changed[..., x, x] += 10
    with torch.no_grad():
        moved = (net.dense_image(changed) - net.dense_image(image)).abs().amax(dim=(0, 1, 2)) > 0
    rows, cols = torch.nonzero(moved, as_tuple=True)
    assert len(rows) == geometry(p).rf ** 2  # every descriptor that reads the pixel, and no other
    for reach in (rows, cols):
        assert abs((reach.min() + reach.max()).item() / 2 - x) <= 0.5, (p, reach.min().item(), reach.max().item(), x)


def test_receptive_fields_match_the_paper_architectures():
    # p=17 sees exactly 17 pixels; the stride-2 pools of p=33 and p=65 floor odd sizes, so their
    # outputs depend on 32 and 60 pixels of the p x p patch.
    assert [geometry(p).rf for p in (17, 33, 65)] == [17, 32, 60]
    for p in SCALES:
        with torch.no_grad():
            assert PatchNet(p)(torch.zeros(2, 3, p, p)).shape == (2, 1, 128)


@pytest.mark.parametrize("p", SCALES)
def test_fused_networks_equal_their_parts(p):
    torch.manual_seed(0)
    parts = [PatchNet(p).state_dict() for _ in range(3)]
    fused = PatchNet(p, n=3)
    fused.load_state_dict(merge(parts))
    image = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out = fused.dense_image(image)
        for i, state in enumerate(split(fused.state_dict(), 3)):
            single = PatchNet(p)
            single.load_state_dict(state)
            assert torch.allclose(single.dense_image(image)[:, 0], out[:, i], atol=1e-5)


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="p=20"):
        PatchNet(20)


@pytest.mark.parametrize("p", SCALES)
def test_training_crop_targets_are_an_exact_slice_of_the_dense_output(p):
    # Student training runs the dense network on a window of the padded image and regresses the
    # matching slice of the cached full-image teacher descriptors; the two must line up exactly.
    torch.manual_seed(1)
    net = PatchNet(p).eval()
    image = torch.randn(1, 3, 72, 72)
    padded = net.pad(image)
    rf, crop, r, c = net.geometry.rf, 16, 30, 5
    with torch.no_grad():
        full = net.dense(padded)
        window = net.dense(padded[:, :, r:r + crop + rf - 1, c:c + crop + rf - 1])
    assert (window - full[..., r:r + crop, c:c + crop]).abs().max() <= 1e-4
