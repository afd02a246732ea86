"""The paper's scores (eqs. 6-8), the scale fusion and the image score, on hand-made arrays."""
import numpy as np
import pytest
import torch

from ustudents.engines.bundle import POSITION_TENSORS
from ustudents.engines.scoring import (ScoreStats, fuse, mask, max_score, position_z_max, predictive_variance,
                                       regression_error, scale_score, standardize)
from ustudents.train.calibrate import (MIN_POSITION_IMAGES, STD_FLOOR, CalibrationError, image_score_calibration,
                                       leave_one_out_z_maps, position_mask_threshold, position_statistics)
from ustudents.train.pipeline import image_fpr_warning


def test_regression_error_is_squared_distance_of_the_ensemble_mean():
    # 2 students, 2 channels, one pixel: mu_1 = (1, 0), mu_2 = (3, 2) -> mean (2, 1); y = (0, 1)
    mu = torch.tensor([[1.0, 0.0], [3.0, 2.0]]).reshape(1, 2, 2, 1, 1)
    y = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    # e = (2-0)^2 + (1-1)^2 = 4
    assert regression_error(mu, y).item() == 4.0


def test_predictive_variance_matches_eq7():
    mu = torch.tensor([[1.0, 0.0], [3.0, 2.0]]).reshape(1, 2, 2, 1, 1)
    # eq. 7: 1/M sum ||mu_i||^2 - ||mean||^2 = (1 + 13)/2 - (4 + 1) = 2
    assert predictive_variance(mu).item() == 2.0
    # students that agree have no variance
    same = torch.ones(1, 3, 4, 2, 2)
    assert predictive_variance(same).abs().max().item() == 0.0


def test_standardize_uses_per_channel_statistics():
    t = torch.tensor([3.0, 10.0]).reshape(2, 1, 1)
    y = standardize(t, torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0]))
    assert y.flatten().tolist() == [1.0, 2.0]


def test_scale_score_and_fusion():
    e = torch.tensor([[[5.0]]])
    v = torch.tensor([[[1.0]]])
    s = ScoreStats(e_mu=1.0, e_sigma=2.0, v_mu=0.5, v_sigma=0.25)
    # (5-1)/2 + (1-0.5)/0.25 = 2 + 2 = 4
    assert scale_score(e, v, s).item() == 4.0
    maps = torch.tensor([4.0, 1.0, -2.0]).reshape(1, 3, 1, 1)  # three scales at one pixel
    assert fuse(maps).item() == 1.0


def test_the_model_scores_each_scale_with_its_own_statistics_and_averages_the_scales():
    """What every engine exports and runs (AnomalyModel.forward) is the paper's map: per scale, the
    teacher standardized by that scale's descriptor statistics, e and v (eqs. 6-7) normalized by that
    scale's e_mu, e_sigma, v_mu, v_sigma (eq. 8), then the mean over scales. Recomputed here in
    float64 numpy from the networks' raw output; every statistic differs, so a swapped or shared one
    shows."""
    from ustudents.engines.model import INPUT_MEAN, INPUT_STD, AnomalyModel

    torch.manual_seed(0)
    model = AnomalyModel([17, 33], students=3).eval()
    for k, ens in enumerate(model.ensembles):
        ens.desc_mean.copy_(torch.randn(128) * 0.05)
        ens.desc_std.copy_(torch.rand(128) * 0.5 + 0.2)
        ens.score_stats.copy_(torch.tensor([0.5 + k, 2.0 + 3 * k, 0.2 + 2 * k, 0.4 + 5 * k]))
    images = torch.rand(2, 3, 20, 20)
    with torch.no_grad():
        fused, maps = model(images)
        x = (images - torch.tensor(INPUT_MEAN)[:, None, None]) / torch.tensor(INPUT_STD)[:, None, None]
        outs = [ens.net.dense_image(x).double().numpy() for ens in model.ensembles]  # (B, M+1, 128, H, W)
    expected = []
    for ens, out in zip(model.ensembles, outs):
        mean, std = (t.double().numpy()[:, None, None] for t in (ens.desc_mean, ens.desc_std))
        y, mu = (out[:, 0] - mean) / std, out[:, 1:]
        e = ((mu.mean(1) - y) ** 2).sum(1)  # eq. 6
        v = (mu ** 2).sum(2).mean(1) - (mu.mean(1) ** 2).sum(1)  # eq. 7
        e_mu, e_sigma, v_mu, v_sigma = ens.score_stats.double().tolist()
        expected.append((e - e_mu) / e_sigma + (v - v_mu) / v_sigma)  # eq. 8
    expected = np.stack(expected, axis=1)
    assert maps.shape == (2, 2, 20, 20) and fused.shape == (2, 20, 20)
    assert np.abs(expected[:, 0] - expected[:, 1]).max() > 1.0  # the scales' maps differ: their mean is a test
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused.numpy(), expected.mean(axis=1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ image score

def test_position_z_max_scores_each_pixel_against_its_own_position():
    # 1x3 maps. Good images are high at the border pixel (0) and low in the centre (1).
    mean = torch.tensor([[10.0, 1.0, 1.0]])
    std = torch.tensor([[4.0, 0.5, 0.5]])
    good_like = torch.tensor([[[12.0, 1.5, 1.0]]])  # z = (0.5, 1, 0): unremarkable everywhere
    defect = torch.tensor([[[9.0, 4.0, 1.0]]])  # z = (-0.25, 6, 0): low map maximum, far off in the centre
    assert position_z_max(good_like, mean, std).tolist() == [1.0]
    assert position_z_max(defect, mean, std).tolist() == [6.0]
    # the maximum ranks them the other way round: the border decides it
    assert max_score(torch.cat([good_like, defect])).tolist() == [12.0, 9.0]


def test_leave_one_out_z_maps_use_the_other_images_statistics():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(7, 3, 4)) * rng.uniform(0.5, 3, size=(3, 4)) + rng.normal(size=(3, 4))
    maps[:, 0, 0] = 2.0  # a position that never varies: its std is floored, not zero
    loo = leave_one_out_z_maps(maps.astype(np.float32))
    for i in range(len(maps)):
        others = np.delete(maps, i, axis=0)
        # the std floor is a share of all the images' std: one constant, not re-estimated per image
        std = np.maximum(others.std(0), STD_FLOOR * maps.std())
        assert np.allclose(loo[i], (maps[i] - others.mean(0)) / std, rtol=1e-5, atol=1e-5)
    mean, std = position_statistics(maps)
    assert np.allclose(mean, maps.mean(0)) and std[0, 0] == pytest.approx(STD_FLOOR * maps.std())


def test_image_threshold_flags_the_asked_share_of_good_images():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(MIN_POSITION_IMAGES + 10, 8, 8)).astype(np.float32)
    maps[:, 0, :] += 5 * rng.random((len(maps), 8))  # a noisy border row
    record, tensors = image_score_calibration(maps, pixel_threshold=3.0, image_fpr=0.1)
    assert record["method"] == "position_z_max" and record["images"] == len(maps)
    # 10% of the validation images, each scored against the others, are at or above the threshold
    loo = leave_one_out_z_maps(maps).reshape(len(maps), -1).max(1)
    assert (loo >= record["threshold"]).mean() == pytest.approx(0.1, abs=1 / len(maps))
    assert record["validation_image_fpr"] == pytest.approx((loo >= record["threshold"]).mean())
    mean, std = tensors[POSITION_TENSORS[0]], tensors[POSITION_TENSORS[1]]
    assert mean.shape == std.shape == (8, 8)
    assert float(std[0].mean()) > float(std[1:].mean())  # the border's spread is measured where it is


def test_image_threshold_flags_the_asked_share_of_new_good_images_on_average():
    # What a plant sees: good parts made after calibration, scored against all the validation images'
    # statistics. Over many calibrations on MIN_POSITION_IMAGES images, the share of new good images at
    # or above the threshold averages --image-fpr (numpy's default quantile gave 7.9% for 5% here).
    rng = np.random.default_rng(2)
    shape = (6, 6)
    centre, spread = rng.normal(size=shape), rng.uniform(0.5, 2.0, size=shape)
    flagged = []
    for _ in range(400):
        maps = (centre + spread * rng.normal(size=(MIN_POSITION_IMAGES, *shape))).astype(np.float32)
        new = centre + spread * rng.normal(size=(100, *shape))
        record, tensors = image_score_calibration(maps, pixel_threshold=3.0, image_fpr=0.05)
        mean, std = (t.double().numpy() for t in (tensors[POSITION_TENSORS[0]], tensors[POSITION_TENSORS[1]]))
        flagged.append((((new - mean) / std).reshape(100, -1).max(1) >= record["threshold"]).mean())
    assert record["expected_image_fpr"] == 0.05
    assert np.mean(flagged) == pytest.approx(0.05, abs=0.01)


def test_an_image_rate_too_small_for_the_images_is_met_as_closely_as_they_allow_and_warned():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(40, 4, 4)).astype(np.float32)
    record, _ = image_score_calibration(maps, pixel_threshold=3.0, image_fpr=0.01)
    loo = leave_one_out_z_maps(maps).reshape(len(maps), -1).max(1)
    # 1% needs 99 images: from 40 the threshold is the highest score, topped by 1 new good image in 41
    assert record["threshold"] == pytest.approx(float(loo.max()))
    assert record["expected_image_fpr"] == pytest.approx(1 / 41)
    warning = image_fpr_warning(record, 0.01, "add images")
    assert warning.startswith("WARNING: --image-fpr 0.01 needs at least 99 good images") and "(1 in 41)" in warning
    assert image_fpr_warning(image_score_calibration(maps, 3.0, image_fpr=0.05)[0], 0.05, "add images") is None


def test_too_few_images_keep_the_maximum_against_the_mask_threshold():
    maps = np.zeros((MIN_POSITION_IMAGES - 1, 4, 4), np.float32)
    maps[0, 1, 1] = 5.0
    record, tensors = image_score_calibration(maps, pixel_threshold=3.0, image_fpr=0.01)
    assert record["method"] == "max" and record["threshold"] == 3.0 and tensors == {}
    # kept though unused here: a later `calibrate` on 30+ images takes it, not the default 0.05
    assert record["target_image_fpr"] == 0.01
    assert record["validation_image_fpr"] == pytest.approx(1 / len(maps))  # one image has a mask
    with pytest.raises(CalibrationError, match="image false-positive rate"):
        image_score_calibration(maps, 3.0, image_fpr=1.5)


def test_validation_images_that_score_the_same_are_refused_not_given_a_threshold_every_one_reaches():
    """40 copies of one image: every leave-one-out score was 0, the threshold 0, and every new good part
    was flagged, while the record said it would flag 5% of them."""
    rng = np.random.default_rng(0)
    one = rng.normal(size=(8, 8)).astype(np.float32)
    with pytest.raises(CalibrationError, match="100% of the 40 good images calibrated on score the same"):
        image_score_calibration(np.repeat(one[None], 40, axis=0), pixel_threshold=3.0, image_fpr=0.05)
    varied = np.repeat(one[None], 40, axis=0) + rng.normal(scale=0.1, size=(40, 8, 8)).astype(np.float32)
    assert image_score_calibration(varied, 3.0, image_fpr=0.05)[0]["validation_image_fpr"] <= 0.1


# ------------------------------------------------------------------------------------------ masks

def test_position_mask_threshold_is_the_pixel_quantile_capped_at_the_image_threshold():
    z = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)  # 1000 distinct leave-one-out z values
    record = position_mask_threshold(z, target_fpr=0.01, image_threshold=1e6)
    # 1% of the pixels (10 of 1000) lie above the threshold
    assert (z > record["value"]).sum() == 10 and record["value"] == record["quantile"]
    assert record["method"] == "position_z_pixel_fpr"
    capped = position_mask_threshold(z, target_fpr=0.01, image_threshold=500.0)
    # above the image threshold a flagged image (z max >= 500) could show an empty mask: capped
    assert capped["value"] == 500.0 and capped["quantile"] == record["quantile"]


def test_the_position_mask_marks_pixels_of_flagged_images_only():
    level = torch.tensor([[[0.0, 5.0, 2.0]], [[5.0, 0.0, 0.0]]])  # two 1x3 maps
    anomalous = torch.tensor([True, False])
    assert mask(level, 2.0, "position_z", anomalous).tolist() == [[[False, True, True]], [[False, False, False]]]
    # the map rule (bundles of format 1 and 2, and the maximum's image score) ignores the verdict
    assert mask(level, 2.0, "map", anomalous).tolist() == [[[False, True, True]], [[True, False, False]]]
