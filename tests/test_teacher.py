"""Teacher distillation losses, patch sampling and the backbones."""
import pytest
import torch

from ustudents.train.backbones import BackboneError, ResNet18Features, build_backbone
from ustudents.train.teacher import compactness_loss, knowledge_distillation_loss, sample_patches, triplet_loss


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


def test_sample_patches_shapes_and_shift():
    levels = [torch.rand(3, 50, 60)]
    gen = torch.Generator().manual_seed(0)
    patches, positives = sample_patches(levels, 17, 8, gen, shift=2)
    assert patches.shape == positives.shape == (8, 3, 17, 17)


def test_efficientnet_lite0_loads_packaged_imagenet_weights():
    net = build_backbone("efficientnet-lite0")
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 1280)


def test_resnet18_loads_a_torchvision_format_file(tmp_path):
    state = ResNet18Features().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # as torchvision saves it
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    assert build_backbone("resnet18", str(path))(torch.rand(1, 3, 64, 64)).shape == (1, 512)
    with pytest.raises(BackboneError, match="--backbone-weights"):
        build_backbone("resnet18")
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(BackboneError, match="not torchvision ResNet-18"):
        build_backbone("resnet18", str(path))


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
