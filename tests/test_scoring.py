"""The paper's scores (eqs. 6-8) and the scale fusion, on hand-made arrays."""
import torch

from ustudents.engines.scoring import (ScoreStats, fuse, predictive_variance, regression_error, scale_score,
                                       standardize)


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
