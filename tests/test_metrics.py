"""Hand-computed checks of the evaluation metrics (every expected number is worked out in a comment)."""

from __future__ import annotations

import numpy as np
import pytest

from ustudents.train.metrics import au_pro, image_auroc, pixel_auroc, pro_curve, roc_auc


# ----------------------------------------------------------------------------------------------- roc_auc

def test_roc_auc_perfect_and_inverted():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    labels = np.array([0, 0, 1, 1])
    # every positive outranks every negative: U = 2*2 = 4 of 4 pairs -> 1.0
    assert roc_auc(scores, labels) == 1.0
    # every negative outranks every positive: U = 0 -> 0.0
    assert roc_auc(scores, 1 - labels) == 0.0


def test_roc_auc_ties_mann_whitney():
    # negatives: 0.1, 0.4, 0.4; positives: 0.4, 0.6  ->  3*2 = 6 pairs
    # pos 0.4: beats 0.1 (1), ties 0.4, 0.4 (1/2 + 1/2) -> 2;  pos 0.6 beats all three -> 3;  U = 5
    # (rank check: sorted 0.1 r1, 0.4 x3 avg rank 3, 0.6 r5; positive ranks 3 + 5 = 8; U = 8 - 2*3/2 = 5)
    scores = np.array([0.4, 0.1, 0.6, 0.4, 0.4])
    labels = np.array([False, False, True, True, False])
    assert roc_auc(scores, labels) == pytest.approx(5 / 6, abs=1e-15)


def test_roc_auc_all_equal_is_half():
    # every pair is a tie: U = 6 * 1/2 = 3 of 6 pairs -> 0.5
    assert roc_auc(np.full(5, 0.7), np.array([1, 0, 1, 0, 0])) == 0.5


def test_roc_auc_one_class_raises():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.array([0.1, 0.2, 0.3]), np.array([1, 1, 1]))


def test_roc_auc_matches_pairwise_count_on_random_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 7, size=300).astype(np.float32)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size  # U / (n_pos * n_neg)
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_image_and_pixel_auroc_wrappers():
    # image: same numbers as the ties case above -> 5/6
    assert image_auroc([0.4, 0.1, 0.6, 0.4, 0.4], [0, 0, 1, 1, 0]) == pytest.approx(5 / 6)
    # pixel: 1 image 1x4, positives 0.9, 0.3; negatives 0.5, 0.1 -> pairs: 0.9>0.5, 0.9>0.1, 0.3<0.5, 0.3>0.1
    # U = 3 of 4 -> 0.75
    maps = np.array([[[0.9, 0.5, 0.3, 0.1]]])
    masks = np.array([[[True, False, True, False]]])
    assert pixel_auroc(maps, masks) == 0.75


# ------------------------------------------------------------------------------------------------ au_pro

def test_au_pro_perfect_map_is_one():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1:3, 1:4] = True
    masks[0, 5, 5] = True
    masks[1, 4:, :2] = True
    maps = masks.astype(np.float32)
    # t=1: FPR 0, PRO 1 (vertical jump from (0,0)); t=0: FPR 1, PRO 1 -> area to 0.3 = 0.3 -> 0.3/0.3 = 1
    assert au_pro(maps, masks, fpr_limit=0.3) == pytest.approx(1.0, abs=1e-12)


def test_au_pro_constant_map_is_half_the_limit():
    masks = np.zeros((1, 5, 5), bool)
    masks[0, 1:3, 1:3] = True
    maps = np.full((1, 5, 5), 0.4)
    # only threshold t=0.4 admits everything: curve (0,0) -> (1,1), PRO(x) = x
    # area to 0.3 = 0.3^2 / 2 = 0.045 -> /0.3 = 0.15 (chance level = fpr_limit / 2, not 0)
    assert au_pro(maps, masks, fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)
    assert au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


# Two regions in one 4x4 image: A = top-left 2x2 (4 px), B = column 3 (4 px); col 2 separates them,
# so 8 negatives. (Value ties 0.5 and 0.1 straddle positives and negatives on purpose.)
#   map:                     mask:
#   0.9 0.9 0.7 0.8          A A . B
#   0.5 0.2 0.6 0.8          A A . B
#   0.5 0.3 0.3 0.8          . . . B
#   0.1 0.0 0.0 0.1          . . . B
HAND_MAP = np.array([[[0.9, 0.9, 0.7, 0.8],
                      [0.5, 0.2, 0.6, 0.8],
                      [0.5, 0.3, 0.3, 0.8],
                      [0.1, 0.0, 0.0, 0.1]]])
HAND_MASK = np.array([[[1, 1, 0, 1],
                       [1, 1, 0, 1],
                       [0, 0, 0, 1],
                       [0, 0, 0, 1]]], dtype=bool)


def test_pro_curve_by_hand():
    fpr, pro = pro_curve(HAND_MAP, HAND_MASK)
    # t     A hits  B hits  PRO = (A/4 + B/4)/2        FP  FPR = FP/8
    # 0.9   2       0       (0.5 + 0)/2    = 0.25      0   0
    # 0.8   2       3       (0.5 + 0.75)/2 = 0.625     0   0
    # 0.7   2       3       0.625                      1   0.125
    # 0.6   2       3       0.625                      2   0.25
    # 0.5   3       3       (0.75+0.75)/2  = 0.75      3   0.375
    # 0.3   3       3       0.75                       5   0.625
    # 0.2   4       3       (1 + 0.75)/2   = 0.875     5   0.625
    # 0.1   4       4       1                          6   0.75
    # 0.0   4       4       1                          8   1
    # plus the (0, 0) start point
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.125, 0.25, 0.375, 0.625, 0.625, 0.75, 1], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.25, 0.625, 0.625, 0.625, 0.75, 0.75, 0.875, 1, 1], atol=1e-12)


def test_au_pro_by_hand_with_interpolation():
    # to 0.5: [0,.125] 0.625*.125 = 0.078125; [.125,.25] 0.078125; [.25,.375] (.625+.75)/2*.125 = 0.0859375;
    # [.375,.5]: PRO interpolated between (.375,.75) and (.625,.75) = 0.75 -> 0.09375
    # area 0.3359375 -> /0.5 = 0.671875
    assert au_pro(HAND_MAP, HAND_MASK, fpr_limit=0.5) == pytest.approx(0.671875, abs=1e-12)
    # to 0.3: PRO at 0.3 interpolated on the sloped segment (.25,.625)-(.375,.75): .625 + .125*(.05/.125) = .675
    # area 0.078125*2 + (.625 + .675)/2 * 0.05 = 0.15625 + 0.0325 = 0.18875 -> /0.3
    assert au_pro(HAND_MAP, HAND_MASK, fpr_limit=0.3) == pytest.approx(0.18875 / 0.3, abs=1e-12)
    # to 1.0: 0.3359375 + [.5,.625] .75*.125 = 0.09375 -> 0.4296875; vertical at .625 adds 0;
    # [.625,.75] (.875+1)/2*.125 = 0.1171875; [.75,1] 1*.25 = 0.25 -> 0.796875
    assert au_pro(HAND_MAP, HAND_MASK, fpr_limit=1.0) == pytest.approx(0.796875, abs=1e-12)


def test_a_mask_of_0_and_255_counts_its_regions_as_a_bool_mask_does():
    """A uint8 mask as read from MVTec AD's PNGs was taken for region numbers: two regions became one
    (AU-PRO 0.19 where the bool mask gives 0.57). Region numbers are now asked for by name."""
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :] = True
    masks[0, 3, 3] = True
    finds_small = np.zeros((1, 4, 4))
    finds_small[0, 3, 3] = 1.0
    as_png = masks.astype(np.uint8) * 255
    assert au_pro(finds_small, as_png, fpr_limit=0.5) == au_pro(finds_small, masks, fpr_limit=0.5) == \
        pytest.approx(0.625, abs=1e-12)
    assert au_pro(finds_small, as_png, fpr_limit=0.5, numbered=True) < 0.5  # one region, as asked
    with pytest.raises(ValueError, match="numbered regions must be integers"):
        au_pro(finds_small, masks.astype(np.float32), numbered=True)


def test_au_pro_weighs_large_and_small_regions_equally():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :] = True  # large region: 8 px
    masks[0, 3, 3] = True  # small region: 1 px; negatives: 7 px
    finds_small = np.zeros((1, 4, 4))
    finds_small[0, 3, 3] = 1.0
    finds_large = np.zeros((1, 4, 4))
    finds_large[0, :2, :] = 1.0
    # both: t=1 -> FPR 0, PRO (1 + 0)/2 = 0.5; t=0 -> (1, 1). PRO(x) = 0.5 + 0.5x on [0, 1]
    # area to 0.5 = (0.5 + 0.75)/2 * 0.5 = 0.3125 -> /0.5 = 0.625 for both maps
    assert au_pro(finds_small, masks, fpr_limit=0.5) == pytest.approx(0.625, abs=1e-12)
    assert au_pro(finds_large, masks, fpr_limit=0.5) == pytest.approx(0.625, abs=1e-12)
    # pixel AUROC instead counts pixels: 9 positives x 7 negatives = 63 pairs
    # finds_small: one positive beats 7, eight positives tie 7 -> U = 7 + 28 = 35 -> 35/63 = 5/9
    # finds_large: eight positives beat 7, one ties 7 -> U = 56 + 3.5 = 59.5 -> 59.5/63 = 17/18
    assert pixel_auroc(finds_small, masks) == pytest.approx(5 / 9, abs=1e-12)
    assert pixel_auroc(finds_large, masks) == pytest.approx(17 / 18, abs=1e-12)


def test_au_pro_regions_are_8_connected():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True  # diagonal touch: one 8-connected region of 3 px
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    fpr, pro = pro_curve(maps, masks)
    # t=1: one region, 1 of 3 px hit -> PRO 1/3 (4-connectivity would give two regions: (1 + 0)/2 = 0.5)
    assert fpr[1] == 0.0
    assert pro[1] == pytest.approx(1 / 3, abs=1e-12)


def test_au_pro_counts_negatives_of_defect_free_images():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # image 0: one 4 px region, 12 negatives; image 1: defect-free, 16 negatives
    maps = np.zeros((2, 4, 4))
    maps[0, :2, :2] = 0.5
    maps[1, 0, :] = 1.0  # 4 false positives on the good image, scored above the defect
    # t=1: FP 4 of 28 -> FPR 1/7, PRO 0; t=0.5: FPR 1/7, PRO 1; t=0: (1, 1)
    # area to 0.5: 0 on [0, 1/7], then 1 * (0.5 - 1/7) = 5/14 -> /0.5 = 5/7
    assert au_pro(maps, masks, fpr_limit=0.5) == pytest.approx(5 / 7, abs=1e-12)
    # image 0 alone is detected perfectly -> 1.0
    assert au_pro(maps[:1], masks[:1], fpr_limit=0.5) == pytest.approx(1.0, abs=1e-12)


def test_au_pro_errors():
    maps = np.zeros((1, 3, 3))
    with pytest.raises(ValueError, match="region"):
        au_pro(maps, np.zeros((1, 3, 3), bool))
    with pytest.raises(ValueError, match="negative"):
        au_pro(maps, np.ones((1, 3, 3), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro(maps, np.eye(3, dtype=bool)[None], fpr_limit=0.0)
    with pytest.raises(ValueError, match="shape"):
        au_pro(maps, np.zeros((1, 3, 4), bool))


# ------------------------------------------------------------------------------ brute-force reference

def _regions_8(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components by flood fill (independent of OpenCV)."""
    seen = np.zeros_like(mask, bool)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        out.append(comp)
    return out


def _au_pro_brute(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    regions = [(i, r) for i, m in enumerate(masks) for r in _regions_8(m)]
    negatives = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:  # every distinct threshold, high to low
        hit = maps >= t
        xs.append((hit & negatives).sum() / negatives.sum())
        ys.append(np.mean([(hit[i] & r).sum() / r.sum() for i, r in regions]))
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment at the limit, PRO linearly interpolated
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_au_pro_matches_brute_force(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    n = 3
    masks = rng.random((n, 9, 11)) < 0.25
    masks[rng.integers(n)] = False  # one defect-free image
    if not masks.any():
        masks[0, 2, 3] = True
    maps = np.round(rng.random((n, 9, 11)) + 0.6 * masks, 1)  # coarse values: many ties across classes
    assert au_pro(maps, masks, fpr_limit) == pytest.approx(_au_pro_brute(maps, masks, fpr_limit), abs=1e-9)


# ------------------------------------------------------------------------- at the bundle's thresholds

def test_at_threshold_reports_what_the_thresholds_do_on_hand_made_masks():
    from ustudents.train.evaluate import at_threshold

    gt = np.zeros((3, 2, 2), bool)
    gt[0, 0, 0] = gt[1, 1, 1] = True  # images 0 and 1 defective (one pixel each), image 2 good
    predicted = np.zeros_like(gt)
    predicted[0, 0, :] = True  # image 0: its defect pixel and one good pixel
    predicted[1, 0, 0] = True  # image 1: a good pixel only, beside the defect
    labels = np.array([True, True, False])
    scores = np.array([5.0, 4.0, 4.5], np.float32)
    r = at_threshold(predicted, scores, gt, labels, image_threshold=4.5, mask_threshold=2.0)
    assert (r["image_tpr"], r["image_fpr"]) == (0.5, 1.0)  # images 0 (5.0) and 2 (4.5) flagged
    assert r["pixel_fpr"] == 2 / 10  # 2 of the 10 good pixels predicted
    assert r["pixel_tpr"] == 1 / 2  # 1 of the 2 defect pixels
    assert r["defective_images_mask_on_defect"] == 1 / 2  # image 1's mask misses its defect


def test_a_speck_smaller_than_a_pixel_at_the_models_size_is_still_a_region(tmp_path):
    """MVTec AD's PRO weighs every connected region of the ground truth alike. A 2 x 2 px speck at
    512 px falls between the pixels nearest resizing keeps at 64 px: it vanished, and a map that
    misses it scored as if the image held the blob alone (AU-PRO 1.0). It now keeps the pixel it
    covers most, so missing it costs what missing one of two regions does (0.575, as above)."""
    import cv2

    from ustudents.train.dataset import Sample, load_regions

    mask = np.zeros((512, 512), np.uint8)
    mask[300:400, 200:300] = 255
    mask[50:52, 61:63] = 255  # no pixel of it is one nearest resizing keeps (rows and columns 8k + 4)
    cv2.imwrite(str(tmp_path / "img.png"), np.full((512, 512), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    samples = [Sample(tmp_path / "img.png", "spot", tmp_path / "mask.png"), Sample(tmp_path / "img.png", "good")]
    regions = load_regions(samples, 64)
    assert sorted(np.unique(regions[0])) == [0, 1, 2]
    speck = regions[0] == regions[0][50 // 8, 61 // 8]
    assert regions[0][50 // 8, 61 // 8] and speck.sum() == 1
    maps = np.zeros((2, 64, 64), np.float32)
    maps[0][(regions[0] > 0) & ~speck] = 1.0  # the blob, not the speck
    assert au_pro(maps, regions, numbered=True) == pytest.approx(0.575, abs=1e-12)


def test_a_thin_scratch_stays_one_region_when_its_mask_is_shrunk_to_the_models_size(tmp_path):
    """Regions are found at the mask's own size: a 2 px scratch across a 512 px image, shrunk
    (nearest) to 64 px first, fell apart into dozens of pieces, each weighed by PRO as a defect of
    its own; a map that finds the blob and misses the scratch scored far below the 0.575 of two
    regions (PRO 0.5 at FPR 0, rising linearly to 1 at FPR 1)."""
    import cv2

    from ustudents.train.dataset import Sample, load_masks, load_regions

    size = 512
    mask = np.zeros((size, size), np.uint8)
    cv2.line(mask, (5, 100), (505, 140), 255, 2)
    mask[300:400, 200:300] = 255
    cv2.imwrite(str(tmp_path / "img.png"), np.full((size, size), 90, np.uint8))
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    samples = [Sample(tmp_path / "img.png", "scratch", tmp_path / "mask.png"), Sample(tmp_path / "img.png", "good")]
    regions = load_regions(samples, 64)
    assert sorted(np.unique(regions[0])) == [0, 1, 2] and not regions[1].any()
    masks = load_masks(samples, 64)
    assert np.array_equal(masks, regions > 0)
    maps = np.zeros((2, 64, 64), np.float32)
    maps[0][regions[0] == regions[0][45, 35]] = 1.0  # the blob's region, and nothing of the scratch
    assert au_pro(maps, regions, numbered=True) == pytest.approx(0.575, abs=1e-12)
    assert au_pro(maps, masks) < 0.35  # labelled after shrinking: the scratch's pieces outweigh the blob
