"""Anomaly-detection metrics: ROC AUC (image / pixel) and the MVTec AD per-region-overlap AU-PRO.

numpy + OpenCV only. Everything is exact over all distinct score values and sort-based (no loop over
thresholds), so pixel inputs of tens of millions of values cost a few arrays of that length.
"""

from __future__ import annotations

import numpy as np

from ustudents.engines.images import defect_regions

__all__ = ["roc_auc", "image_auroc", "pixel_auroc", "pro_curve", "au_pro"]


def _tie_group_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Index of the last element of every run of equal values in a sorted array."""
    # a threshold t = sorted_scores[i] admits the whole tie group, so the curve only moves at group ends
    change = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    return np.append(change, sorted_scores.size - 1)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; ties count 1/2 (Mann-Whitney U with average ranks)."""
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool, copy=False)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both classes in labels; got only "
                         + ("negatives" if n_pos == 0 else "positives"))
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    neg = np.sort(scores[~labels])
    pos = np.sort(scores[labels])  # sorted keys make searchsorted faster
    # U = sum over positives of #{neg < pos} + 1/2 #{neg == pos}; doubled to stay in exact integers
    twice_u = int(np.searchsorted(neg, pos, side="left").sum(dtype=np.int64))
    twice_u += int(np.searchsorted(neg, pos, side="right").sum(dtype=np.int64))
    return twice_u / (2.0 * n_pos * n_neg)


def image_auroc(image_scores: np.ndarray, image_labels: np.ndarray) -> float:
    """Image-level AUROC: one score and one anomalous/normal label per image."""
    return roc_auc(image_scores, image_labels)


def pixel_auroc(anomaly_maps: np.ndarray, gt_masks: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all images: maps (N,H,W) float, masks (N,H,W) bool."""
    anomaly_maps, gt_masks = _check_maps(anomaly_maps, gt_masks)
    return roc_auc(anomaly_maps, gt_masks)


def _check_maps(anomaly_maps, gt_masks) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(anomaly_maps)
    masks = np.asarray(gt_masks).astype(bool, copy=False)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError("expected anomaly maps and masks of one shape (N,H,W); "
                         f"got {maps.shape} and {masks.shape}")
    return maps, masks


def pro_curve(anomaly_maps: np.ndarray, gt_masks: np.ndarray, numbered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct score threshold, descending, starting at (0, 0).

    Regions are the 8-connected components of each ground-truth mask (Bergmann et al., MVTec AD):
    found here in masks (any nonzero pixel is a defect: bool, 0/1 or 0/255), or, with `numbered`,
    given as integer region numbers per image (dataset.load_regions, which finds them at the masks'
    own size before resizing them to the maps'). Explicit, since a 0/255 mask read as numbers is one
    region per image (AU-PRO 0.19 against 0.57 in a case of two regions).
    """
    maps, masks = _check_maps(anomaly_maps, gt_masks)
    if np.isnan(maps).any():
        raise ValueError("anomaly maps contain NaN")
    given = np.asarray(gt_masks)
    given = given[None] if given.ndim == 2 else given
    if numbered and not np.issubdtype(given.dtype, np.integer):
        raise ValueError(f"numbered regions must be integers; got {given.dtype}")
    # region id per pixel: 0 = ground-truth negative, 1..R = regions numbered across images
    region = np.zeros(masks.shape, dtype=np.int32)
    n_regions = 0
    for i, mask in enumerate(masks):
        if not mask.any():
            continue  # defect-free image: negatives only
        if not numbered:
            lab = defect_regions(mask)
        else:  # numbered consecutively: a region left without a pixel (images.resize_regions: rare) is none here
            numbers, inverse = np.unique(given[i], return_inverse=True)
            lab = (inverse.reshape(mask.shape) + int(numbers[0] != 0)).astype(np.int32)
        region[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += int(lab.max())
    region = region.ravel()
    n_neg = int(np.count_nonzero(region == 0))
    if n_regions == 0:
        raise ValueError("au_pro needs at least one ground-truth region; all masks are empty")
    if n_neg == 0:
        raise ValueError("au_pro needs ground-truth-negative pixels to measure the false-positive rate")
    # PRO(t) = 1/R sum_r |r ∩ {map >= t}| / |r|  =  sum over pixels >= t of weight 1/(R |r|)
    sizes = np.bincount(region, minlength=n_regions + 1)
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (n_regions * sizes[1:])
    order = np.argsort(maps.ravel())[::-1]  # scores descending
    sorted_scores = maps.ravel()[order]
    sorted_region = region[order]
    del order, region
    ends = _tie_group_ends(sorted_scores)
    del sorted_scores
    pro_cum = np.cumsum(weight[sorted_region])
    # FPR(t) = |{negatives with map >= t}| / |negatives| over all images, defect-free ones included
    fp_cum = np.cumsum(sorted_region == 0, dtype=np.int64)
    del sorted_region
    fpr = np.concatenate(([0.0], fp_cum[ends] / n_neg))
    pro = np.concatenate(([0.0], np.minimum(pro_cum[ends], 1.0)))
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max], y interpolated linearly at x_max."""
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.sum(0.5 * (y[1:k] + y[:k - 1]) * np.diff(x[:k])))
    if x[k - 1] < x_max and k < x.size:
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
        area += 0.5 * (y[k - 1] + y_at) * (x_max - x[k - 1])
    return area


def au_pro(anomaly_maps: np.ndarray, gt_masks: np.ndarray, fpr_limit: float = 0.3, numbered: bool = False) -> float:
    """Normalised area under the PRO-vs-FPR curve for FPR in [0, fpr_limit]; 1.0 is perfect.
    `gt_masks` are masks, or with `numbered` region numbers (pro_curve)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    fpr, pro = pro_curve(anomaly_maps, gt_masks, numbered)
    # integrate PRO over FPR up to the limit, then divide by the limit (Bergmann et al.)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit
