"""Fast Dense Feature Extraction must equal the patch network applied to each pixel's patch."""
import pytest
import torch
import torch.nn.functional as F

from ustudents.engines.patchnet import PatchNet, SCALES, geometry, merge, split


@pytest.mark.parametrize("p", SCALES)
def test_dense_equals_patch_network_at_every_border_pixel_and_random_ones(p):
    torch.manual_seed(p)
    net = PatchNet(p, n=2).eval()
    h, w = 70, 66
    image = torch.randn(1, 3, h, w)
    with torch.no_grad():
        dense = net.dense_image(image)
        assert dense.shape == (1, 2, 128, h, w)
        # Every pixel's full p x p patch, independently of how the dense form pads.
        padded = F.pad(image, (p // 2,) * 4, mode="reflect")
        gen = torch.Generator().manual_seed(0)
        # every pixel of the image's rim, where padding matters, and random ones inside
        pixels = sorted({(r, c) for r in range(h) for c in range(w) if r in (0, h - 1) or c in (0, w - 1)})
        assert len(pixels) == 2 * (h + w) - 4
        pixels += [tuple(int(v) for v in (torch.randint(h, (1,), generator=gen), torch.randint(w, (1,), generator=gen)))
                   for _ in range(10)]
        # The p x p patch centred on (r, c): rows r .. r+p-1 of the padded image.
        patches = torch.cat([padded[:, :, r:r + p, c:c + p] for r, c in pixels])
        assert patches.shape[-2:] == (p, p)
        expected = net(patches)  # (pixels, n, 128)
        got = torch.stack([dense[0, :, :, r, c] for r, c in pixels])
        worst = (got - expected).abs().amax(dim=(1, 2))
        assert worst.max() <= 1e-4, (p, pixels[int(worst.argmax())])


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
