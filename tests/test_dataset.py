"""The MVTec AD dataset layer: discovery, loading, splitting, fingerprinting, and clear errors."""
from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TINY_CATEGORY, as_12_bit, write_image

from ustudents.engines.images import ImageError, decode_image, image_files, read_image, read_mask, uint16_bits_of

from ustudents.train.dataset import (
    DatasetError,
    checked_test_set,
    Sample,
    fingerprint,
    load_images,
    load_masks,
    split_train_val,
    bit_depths,
    test_samples,
    train_samples,
)

CAT = TINY_CATEGORY


@pytest.fixture
def mvtec(tiny_mvtec, tmp_path) -> Path:
    """A private, writable copy of the tiny dataset, for tests that break it."""
    root = tmp_path / "data"
    shutil.copytree(tiny_mvtec, root)
    return root


def _raises_naming(path: Path, fn, *args):
    with pytest.raises(DatasetError) as info:
        fn(*args)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    return msg


# --- discovery -------------------------------------------------------------------------------

def test_train_samples_are_sorted_good_images(tiny_mvtec):
    samples = train_samples(tiny_mvtec, CAT)
    assert [s.path.name for s in samples] == [f"{i:03d}{'.jpg' if i % 2 else '.png'}" for i in range(16)]
    assert all(s.defect == "good" and s.mask_path is None for s in samples)


def test_test_samples_good_first_then_types_sorted_with_masks(tiny_mvtec):
    samples = test_samples(tiny_mvtec, CAT)
    assert [s.defect for s in samples] == ["good"] * 4 + ["scratch"] * 4 + ["spot"] * 4
    for s in samples:
        if s.defect == "good":
            assert s.mask_path is None
        else:
            assert s.mask_path == tiny_mvtec / CAT / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
    names = [s.path.name for s in samples if s.defect == "spot"]
    assert names == sorted(names)


def test_discovery_ignores_hidden_and_non_image_files_and_any_suffix_case(mvtec):
    good = mvtec / CAT / "train" / "good"
    (good / "._000.png").write_bytes(b"macOS resource fork")
    (good / "notes.txt").write_text("not an image")
    shutil.copy(good / "000.png", good / "100.PNG")
    names = [s.path.name for s in train_samples(mvtec, CAT)]
    assert "._000.png" not in names and "notes.txt" not in names
    assert "100.PNG" in names and len(names) == 17


# --- loading ---------------------------------------------------------------------------------

def test_gray_and_colour_images_load_as_rgb_uint8(tiny_mvtec):
    samples = train_samples(tiny_mvtec, CAT)
    images = load_images(samples, 32, desc="train")
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    gray, colour = images[0], images[1]  # 000.png is gray, 001.jpg colour
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert not (colour[..., 0] == colour[..., 2]).all()
    assert images.std() > 5  # a texture, not a constant


def test_12_bit_images_in_16_bit_files_load_as_the_8_bit_image_they_hold(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    deep = as_12_bit(image, rng)
    for suffix in (".png", ".tif"):
        path = write_image(tmp_path / f"deep{suffix}", deep)
        assert uint16_bits_of(path) == 12
        assert (read_image(path, bits=12) == image).all()
        # the top 8 of 16 bits, as before bundles recorded the bits: a 12-bit image turned nearly black
        assert read_image(path).max() <= 15
    assert uint16_bits_of(write_image(tmp_path / "flat.png", image)) is None  # 8-bit: from the PNG header alone
    bright = write_image(tmp_path / "bright.png", np.full((16, 16), 5000, np.uint16))  # 13 bits in a 12-bit model
    assert (read_image(bright, bits=12) == 255).all()  # saturates, never wraps around to dark
    assert (decode_image(bright.read_bytes(), bits=None) == 5000 >> 5).all()  # a picture: its own 13 bits


def test_a_12_bit_frame_read_as_16_bits_is_told_once_with_the_fix(tmp_path, caplog, monkeypatch):
    """A model trained on 8-bit images reads 16-bit data as 16 bits: a 12-bit camera's frames come out
    16 times darker and score as anomalies, which predict and the worker did without a word."""
    import ustudents.engines.images as images

    monkeypatch.setattr(images, "_told_of_dark_16_bit", False)
    rng = np.random.default_rng(0)
    deep = write_image(tmp_path / "deep.png", as_12_bit(rng.integers(0, 256, (16, 16), dtype=np.uint8), rng))
    with caplog.at_level("WARNING", logger="ustudents.engines.images"):
        read_image(deep, bits=12)  # read as the model's 12 bits: nothing to say
        assert caplog.records == []
        read_image(deep)
        read_image(deep)
    assert len(caplog.records) == 1  # once per process, not per frame
    assert "16-bit data using 12 bits, read with the model's 16, so it looks 16x darker" in caplog.text
    assert "ustudents calibrate MODEL --images DIR" in caplog.text


def test_checking_a_12_bit_test_set_says_nothing_of_16_bits(tmp_path, caplog, monkeypatch):
    """The test-set check reads images for their size and readability, not for a model: it read them
    as 16 bits and told a 12-bit dataset's user to recalibrate a model that reads 12 (and used up the
    once-per-process warning a real mismatch later would need)."""
    import ustudents.engines.images as images

    monkeypatch.setattr(images, "_told_of_dark_16_bit", False)
    rng = np.random.default_rng(0)
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (tmp_path / CAT / folder).mkdir(parents=True)
    for i in range(2):
        for folder in ("test/good", "test/spot"):
            write_image(tmp_path / CAT / folder / f"{i}.png", as_12_bit(rng.integers(0, 256, (32, 32), np.uint8), rng))
        mask = np.zeros((32, 32), np.uint8)
        mask[4:12, 4:12] = 255
        write_image(tmp_path / CAT / "ground_truth" / "spot" / f"{i}_mask.png", mask)
    with caplog.at_level("WARNING", logger="ustudents.engines.images"):
        checked_test_set(tmp_path, CAT, 32, every_image=True)
    assert caplog.records == []


def test_a_16_bit_mask_is_read_as_the_mask_it_holds(tmp_path):
    """OpenCV's gray conversion keeps a 16-bit image's top 8 bits: a 0/255 mask in a 16-bit file read
    as empty, and its defect scored as false positives."""
    from ustudents.engines.images import read_mask

    mask = np.zeros((8, 8), np.uint16)
    mask[2:4, 3:6] = 255
    cv2.imwrite(str(tmp_path / "m16.png"), mask)
    assert (read_mask(tmp_path / "m16.png") == (mask > 0)).all()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha is not a defect
    rgba[1, 1, :3] = 255
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert read_mask(tmp_path / "rgba.png").sum() == 1
    # black everywhere, the defect drawn in transparency (a painting tool's layer): read from its alpha,
    # where it was read as empty and its defect scored as good pixels
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[2:4, 3:6, 3] = 255
    cv2.imwrite(str(tmp_path / "layer.png"), layer)
    assert (read_mask(tmp_path / "layer.png") == (layer[..., 3] > 0)).all()
    layer[..., 3] = 255  # opaque black all over: an empty mask, not an all-defect one
    cv2.imwrite(str(tmp_path / "black.png"), layer)
    assert not read_mask(tmp_path / "black.png").any()


def test_a_jpeg_mask_is_the_mask_drawn_not_its_compression_ringing(tmp_path):
    """JPEG rings around a mask's edges: counting every nonzero pixel grew the defect region, and with
    it each region's overlap in AU-PRO. A PNG mask keeps the nonzero rule (anti-aliased masks)."""
    from ustudents.engines.images import read_mask

    mask = np.zeros((64, 80), np.uint8)
    mask[20:41, 30:57] = 255
    for quality in (50, 75, 95):
        cv2.imwrite(str(tmp_path / "m.jpg"), mask, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert (cv2.imread(str(tmp_path / "m.jpg"), cv2.IMREAD_UNCHANGED) > 0).sum() > (mask > 0).sum()  # it rings
        assert (read_mask(tmp_path / "m.jpg") == (mask > 0)).all()
    (tmp_path / "jpeg_named.png").write_bytes((tmp_path / "m.jpg").read_bytes())  # the bytes decide, not the name
    assert (read_mask(tmp_path / "jpeg_named.png") == (mask > 0)).all()
    faint = mask // 255 * 20  # a PNG's faint (anti-aliased) defect pixel still counts
    cv2.imwrite(str(tmp_path / "faint.png"), faint)
    assert (read_mask(tmp_path / "faint.png") == (mask > 0)).all()
    soft = (mask > 0).astype(np.float32) * 0.5  # so does a float TIFF's soft value in (0, 1)
    cv2.imwrite(str(tmp_path / "soft.tiff"), soft)
    assert (read_mask(tmp_path / "soft.tiff") == (mask > 0)).all()


def test_a_photograph_given_as_a_mask_is_refused_and_real_masks_are_not(tmp_path):
    """A test image copied as its mask was read as all defect (every pixel nonzero), and scored. Real
    masks with grey edges (resized, anti-aliased, JPEG), label masks and binary pictures stay masks."""
    from ustudents.engines.images import read_mask

    rng = np.random.default_rng(0)
    photo = cv2.GaussianBlur(rng.integers(40, 220, (96, 128)).astype(np.uint8), (0, 0), 3)
    dark = rng.integers(0, 40, (96, 128)).astype(np.uint8)  # an underexposed frame: dark, nearly all nonzero
    dark[0, 0] = 255
    for name, image in (("photo.png", photo), ("photo.jpg", photo), ("dark.png", dark),
                        ("colour.png", np.dstack([photo, photo[::-1], photo[:, ::-1]]))):
        write_image(tmp_path / name, image)
        with pytest.raises(ImageError, match="as in a photograph, not a defect mask") as info:
            read_mask(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    mask = np.zeros((256, 256), np.uint8)
    for _ in range(60):
        y, x = rng.integers(0, 256, 2)
        cv2.circle(mask, (int(x), int(y)), int(rng.integers(2, 8)), 255, -1)
    shrunk = cv2.resize(mask, (64, 64), interpolation=cv2.INTER_AREA)  # grey on every edge: 9% of its pixels
    labels = (mask > 0).astype(np.uint8) * rng.integers(1, 4, mask.shape).astype(np.uint8)  # classes 1, 2, 3
    white = tmp_path / "white.png"  # every pixel a defect: accepted, and its type's pixel metrics meaningless
    write_image(white, np.full((40, 40), 255, np.uint8))
    with pytest.raises(ImageError, match="every pixel is marked defect"):
        read_mask(white)
    for name, good_mask in (("shrunk.png", shrunk), ("labels.png", labels), ("blobs.jpg", mask)):
        write_image(tmp_path / name, good_mask)
        assert (read_mask(tmp_path / name) == (good_mask > 0 if name != "blobs.jpg" else mask > 0)).mean() > 0.99


def test_every_image_format_read_is_told_by_its_first_bytes():
    from ustudents.engines.images import IMAGE_SUFFIXES, looks_like_image

    image = np.full((20, 24, 3), 100, np.uint8)
    for suffix in IMAGE_SUFFIXES:
        ok, buf = cv2.imencode(suffix, image)
        assert ok and looks_like_image(buf.tobytes()), suffix
    for data in (b"", b"notapng", b"RIFF\x00\x00\x00\x00WAVE", b"\x89PN"):
        assert not looks_like_image(data), data
    # a BigTIFF, which OpenCV reads: `publish` called it "not an image file" that the worker dead-letters
    import io

    import tifffile  # scikit-image's, a test dependency: OpenCV writes no BigTIFF
    for byteorder in "<>":
        buf = io.BytesIO()
        tifffile.imwrite(buf, image, bigtiff=True, byteorder=byteorder)
        data = buf.getvalue()
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape == image.shape
        assert looks_like_image(data), byteorder


def _move_files_into(folder: Path, sub: str) -> None:
    (folder / sub).mkdir()
    for f in list(folder.iterdir()):
        if f.is_file():
            f.rename(folder / sub / f.name)


def test_a_folder_named_in_another_case_is_named_with_the_fix(mvtec):
    """train/Good gave "train/good: folder not found"; test/Good was read as a defect type and its
    good images asked for masks ("missing mask ...; add it")."""
    cat = mvtec / TINY_CATEGORY
    (cat / "train" / "good").rename(cat / "train" / "Good")
    msg = _raises_naming(cat / "train" / "good", train_samples, mvtec, TINY_CATEGORY)
    assert f"({cat / 'train' / 'Good'} is there: names are case-sensitive, rename it to good)" in msg
    (cat / "test" / "good").rename(cat / "test" / "Good")
    msg = _raises_naming(cat / "test" / "Good", test_samples, mvtec, TINY_CATEGORY)
    assert "the defect-free test images' folder is named 'good', in lower case" in msg and "mask" not in msg


def test_images_sorted_into_subfolders_are_named_as_such(mvtec):
    """train/good/day1/*.png: the error said to remove the folder, which would delete the images."""
    _move_files_into(mvtec / TINY_CATEGORY / "train" / "good", "day1")
    with pytest.raises(DatasetError, match=r"its images are in subfolders \(day1\).*move them up"):
        train_samples(mvtec, TINY_CATEGORY)
    masks = mvtec / TINY_CATEGORY / "ground_truth" / "spot"  # masks too, not "missing mask ...; add it"
    _move_files_into(masks, "day1")
    with pytest.raises(DatasetError, match=rf"{masks}: its images are in subfolders \(day1\).*move them up"):
        test_samples(mvtec, TINY_CATEGORY)


def test_images_in_subfolders_beside_top_level_ones_are_named_once_as_not_used(mvtec, caplog, monkeypatch):
    """train/good/a.png plus train/good/day2/b.png: day2's images were silently left out of training
    (and test/<type>/ and ground_truth/<type>/ subfolders out of the test set)."""
    import ustudents.train.dataset as dataset

    monkeypatch.setattr(dataset, "_checked_for_nested", set(), raising=False)  # warned of once per process
    cat = mvtec / CAT
    good = cat / "train" / "good"
    for day, n in (("day2", 3), ("day3", 1)):
        (good / day / "cam1").mkdir(parents=True)
        for i in range(n):
            shutil.copy(good / "000.png", good / day / "cam1" / f"{i}.png")
    (good / "day3" / "._x.png").write_bytes(b"macOS metadata")  # hidden: not counted
    (cat / "test" / "scratch" / "old").mkdir()
    shutil.copy(good / "000.png", cat / "test" / "scratch" / "old" / "900.png")
    (cat / "ground_truth" / "spot" / "old").mkdir()
    shutil.copy(cat / "ground_truth" / "spot" / "000_mask.png", cat / "ground_truth" / "spot" / "old")
    with caplog.at_level("WARNING", logger="ustudents.train.dataset"):
        assert len(train_samples(mvtec, CAT)) == 16  # the top-level images: a valid set, not refused
        train_samples(mvtec, CAT)
        assert len(test_samples(mvtec, CAT)) == 12
        test_samples(mvtec, CAT)  # `ustudents-train` lists the test set before training and after it
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages  # once per folder
    assert messages[0] == (f"{good}: 4 image(s) in its subfolders day2 (3), day3 (1) are not used: the MVTec AD layout "
                           "reads only the images directly in this folder (16 here); move them up to use them")
    assert messages[1].startswith(f"{cat / 'test' / 'scratch'}: 1 image(s) in its subfolders old (1) are not used")
    assert messages[2].startswith(f"{cat / 'ground_truth' / 'spot'}: 1 image(s) in its subfolders old (1) are not used")


def test_masks_no_test_image_uses_are_named_once(mvtec, caplog):
    """A defect type whose test images were not copied, a mask whose image was renamed or deleted, masks
    put in ground_truth/good: each was left out of the metrics without a word."""
    cat = mvtec / CAT
    gt = cat / "ground_truth"
    shutil.copytree(gt / "spot", gt / "dent")  # no test/dent
    (cat / "test" / "scratch" / "001.jpg").rename(cat / "test" / "scratch" / "001.jpg.bak")  # set aside
    (cat / "test" / "scratch" / "003.jpg").unlink()  # deleted: their masks stay
    (gt / "good").mkdir()
    shutil.copy(gt / "spot" / "000_mask.png", gt / "good" / "000_mask.png")
    with caplog.at_level("WARNING", logger="ustudents.train.dataset"):
        samples = test_samples(mvtec, CAT)
        test_samples(mvtec, CAT)  # `ustudents-train` lists the test set before training and after it
    assert {s.defect for s in samples} == {"good", "scratch", "spot"}
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"{gt / 'dent'}: 4 mask(s) of defect type 'dent', but {cat / 'test' / 'dent'} does not exist, so that type is "
        "not evaluated; put its images there",
        f"{gt / 'good'}: 1 mask(s) of good test images, which are defect-free by definition and scored as such; move a "
        "defective image to test/<type> and its mask to ground_truth/<type>",
        f"{gt / 'scratch'}: 2 mask(s) match no image in {cat / 'test' / 'scratch'} (e.g. 001_mask.png), so those images "
        "are not evaluated; put them back, or remove the masks"]


def test_image_links_to_nothing_are_refused_naming_them_not_skipped(mvtec, tmp_path):
    """Images that are links into a network share that is not mounted were skipped without a word: a
    training set silently smaller, or 'no images' for a folder full of them."""
    cat = mvtec / CAT
    good = cat / "train" / "good"
    for i in range(5):
        (good / f"nas_{i}.png").symlink_to(tmp_path / "nas" / f"{i}.png")
    (good / "notes.txt").symlink_to(tmp_path / "nas" / "notes.txt")  # not an image: not named
    msg = _raises_naming(good, train_samples, mvtec, CAT)
    assert f"5 image file(s) are symbolic links to nothing (nas_0.png -> {tmp_path / 'nas' / '0.png'}, nas_1.png" in msg
    assert "and 2 more); mount the share they point into or fix the links, or remove them" in msg
    assert "notes.txt" not in msg
    with pytest.raises(ImageError, match="symbolic links to nothing"):
        image_files(good)  # the listing calibrate, --check-images and publish use too

    mask = cat / "ground_truth" / "spot" / "000_mask.png"
    mask.unlink()
    mask.symlink_to(tmp_path / "nas" / "000_mask.png")
    msg = _raises_naming(mask.parent, test_samples, mvtec, CAT)  # not "missing mask ...; add it"
    assert "1 image file(s) are symbolic links to nothing (000_mask.png -> " in msg

    # a defect type's folder, or its masks' folder, a link into the share: that type was left out of
    # the metrics without a word, or its masks called missing
    spot = cat / "test" / "spot"
    shutil.move(spot, tmp_path / "spot")
    spot.symlink_to(tmp_path / "nas" / "spot")
    (cat / "test" / ".#notes.txt").symlink_to("user@host.1234")  # an editor's lock, hidden: not a type
    msg = _raises_naming(spot, test_samples, mvtec, CAT)
    assert f"a test type folder (a symbolic link to {tmp_path / 'nas' / 'spot'}, which does not exist" in msg
    spot.unlink()
    shutil.move(tmp_path / "spot", spot)
    truth = cat / "ground_truth" / "spot"
    shutil.rmtree(truth)
    truth.symlink_to(tmp_path / "nas" / "truth")
    msg = _raises_naming(truth, test_samples, mvtec, CAT)
    assert f"the masks' folder (a symbolic link to {tmp_path / 'nas' / 'truth'}, which does not exist" in msg

    shutil.rmtree(good)
    good.symlink_to(tmp_path / "nas" / "good")  # the whole folder a link into the share
    msg = _raises_naming(good, train_samples, mvtec, CAT)
    assert f"folder not found (a symbolic link to {tmp_path / 'nas' / 'good'}, which does not exist" in msg


def test_the_bits_of_a_training_set_are_the_most_any_image_uses(tmp_path):
    rng = np.random.default_rng(1)
    paths = [write_image(tmp_path / "a.png", rng.integers(0, 256, (16, 16), dtype=np.uint8)),
             write_image(tmp_path / "b.png", np.full((16, 16), 1000, np.uint16)),
             write_image(tmp_path / "c.png", np.full((16, 16), 3000, np.uint16))]
    depths = bit_depths([Sample(p, "good") for p in paths])
    assert (depths.bits, depths.eight_bit) == (12, 1)
    assert depths.mixed_warning("train/good") is None  # 10 and 12 bits: one camera's dark and bright frames
    assert bit_depths([Sample(paths[0], "good")]).bits is None


def test_a_faulty_colour_profile_decodes_the_same_pixels_without_libpngs_stderr_line(tmp_path, capfd):
    """libpng printed "libpng warning: iCCP: too short" (or "known incorrect sRGB profile", common from
    image editors; scikit-image's page.png, a default teacher photo, has one) straight to the process's
    stderr, outside the logs, for every such frame or image."""
    def png_with_faulty_profile(array: np.ndarray) -> tuple[bytes, bytes]:
        png = cv2.imencode(".png", array)[1].tobytes()
        body = b"ICC Profile\x00\x00" + zlib.compress(b"\x00" * 200)  # a profile too short to be one
        chunk = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
        return png, png[:33] + chunk + png[33:]  # after IHDR (8 + 25 bytes), as image editors write it

    png, with_profile = png_with_faulty_profile(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 5:9] = 255
    (tmp_path / "mask.png").write_bytes(png_with_faulty_profile(mask)[1])
    capfd.readouterr()
    assert np.array_equal(decode_image(with_profile), decode_image(png))
    assert np.array_equal(decode_image(memoryview(with_profile)), decode_image(png))
    assert np.array_equal(read_mask(tmp_path / "mask.png"), mask > 0)  # masks too
    assert capfd.readouterr().err == ""


def test_float_images_are_refused_with_what_to_do(tmp_path):
    path = tmp_path / "float.tif"
    ok, buf = cv2.imencode(".tif", np.ones((4, 4), np.float32))
    assert ok
    buf.tofile(path)
    with pytest.raises(ImageError, match="float32 pixels; save it as an 8- or 16-bit integer image"):
        read_image(path)


def test_masks_load_aligned_with_their_images(tiny_mvtec):
    samples = test_samples(tiny_mvtec, CAT)
    size = 64
    images = load_images(samples, size, desc="test").astype(int).mean(axis=3)
    masks = load_masks(samples, size)
    assert masks.shape == (12, size, size) and masks.dtype == bool
    for s, img, m in zip(samples, images, masks):
        if s.defect == "good":
            assert not m.any()
            continue
        assert 0 < m.mean() < 0.25
        inside, outside = img[m].mean(), img[~m].mean()
        if s.defect == "scratch":  # bright line
            assert inside > outside + 40, s.path
        else:  # dark spot
            assert inside < outside - 40, s.path


def test_load_empty_list():
    assert load_images([], 16, desc="x").shape == (0, 16, 16, 3)
    assert load_masks([], 16).shape == (0, 16, 16)


# --- split -----------------------------------------------------------------------------------

def test_split_is_deterministic_and_disjoint(tiny_mvtec):
    samples = train_samples(tiny_mvtec, CAT)
    train, val = split_train_val(samples, 0.25, seed=0)
    again = split_train_val(samples, 0.25, seed=0)
    assert (train, val) == again
    assert train and val and len(train) + len(val) == 16
    assert {s.path for s in train}.isdisjoint(s.path for s in val)
    other = split_train_val(samples, 0.25, seed=1)
    assert [s.path for s in other[1]] != [s.path for s in val]


def test_split_is_stable_when_an_image_is_added(mvtec):
    before = split_train_val(train_samples(mvtec, CAT), 0.25, seed=7)
    good = mvtec / CAT / "train" / "good"
    shutil.copy(good / "003.jpg", good / "016.jpg")
    after_train, after_val = split_train_val(train_samples(mvtec, CAT), 0.25, seed=7)
    old_val = {s.path.name for s in before[1]}
    new_val = {s.path.name for s in after_val}
    assert new_val - {"016.jpg"} == old_val
    assert {s.path.name for s in after_train} - {"016.jpg"} == {s.path.name for s in before[0]}


def test_split_keeps_one_on_each_side_for_tiny_sets(tiny_mvtec):
    two = train_samples(tiny_mvtec, CAT)[:2]
    for frac in (0.01, 0.5, 0.99):
        train, val = split_train_val(two, frac, seed=0)
        assert len(train) == 1 and len(val) == 1
    train, val = split_train_val(two, 0.0, seed=0)
    assert len(train) == 2 and val == []


def test_split_needs_two_images(tiny_mvtec):
    one = train_samples(tiny_mvtec, CAT)[:1]
    _raises_naming(one[0].path.parent, split_train_val, one, 0.2, 0)
    with pytest.raises(DatasetError):
        split_train_val(train_samples(tiny_mvtec, CAT), 1.0, 0)


# --- fingerprint -----------------------------------------------------------------------------

def test_fingerprint_depends_on_content_only(tiny_mvtec, mvtec):
    ref = fingerprint(test_samples(tiny_mvtec, CAT))
    assert len(ref) == 64 and int(ref, 16) >= 0
    # same files under another root, with new timestamps: same fingerprint
    assert fingerprint(test_samples(mvtec, CAT)) == ref
    assert fingerprint(list(reversed(test_samples(mvtec, CAT)))) == ref
    assert fingerprint(train_samples(mvtec, CAT)) != ref

    # one byte of one image changed: different
    target = mvtec / CAT / "test" / "spot" / "002.png"
    data = bytearray(target.read_bytes())
    data[-20] ^= 0x01
    target.write_bytes(bytes(data))
    changed = fingerprint(test_samples(mvtec, CAT))
    assert changed != ref
    data[-20] ^= 0x01
    target.write_bytes(bytes(data))
    assert fingerprint(test_samples(mvtec, CAT)) == ref


def test_fingerprint_covers_masks(mvtec):
    ref = fingerprint(test_samples(mvtec, CAT))
    mask = mvtec / CAT / "ground_truth" / "scratch" / "001_mask.png"
    mask.write_bytes(mask.read_bytes() + b"\0")
    assert fingerprint(test_samples(mvtec, CAT)) != ref


# --- bad input -------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    root = tmp_path / "nope"
    msg = _raises_naming(root, train_samples, root, CAT)
    assert "--data-root" in msg
    _raises_naming(root, test_samples, root, CAT)


def test_missing_category_lists_the_ones_found(tiny_mvtec, mvtec):
    msg = _raises_naming(tiny_mvtec / "bottle", train_samples, tiny_mvtec, "bottle")
    assert CAT in msg
    (mvtec / "bottle.zip").write_bytes(b"PK")  # a category not unpacked: a file of its name is there
    msg = _raises_naming(mvtec / "bottle.zip", train_samples, mvtec, "bottle.zip")
    assert "(a file is there, not a folder)" in msg and CAT in msg
    msg = _raises_naming(mvtec, train_samples, mvtec, " tiles")  # a quoting slip in a script
    assert "CATEGORY ' tiles': no such folder" in msg and "spaces at its ends" in msg
    msg = _raises_naming(mvtec / CAT.upper(), train_samples, mvtec, CAT.upper())
    assert f"names are case-sensitive: give CATEGORY as {CAT!r}" in msg and "rename" not in msg
    # the category's own folder given as the data root: its train/test/ground_truth are no categories
    msg = _raises_naming(mvtec / CAT / CAT, train_samples, mvtec / CAT, CAT)
    assert f"{mvtec / CAT} holds train/good itself, so it is a category's folder: give its parent, --data-root " \
           f"{mvtec}" in msg


def test_missing_train_folder(mvtec):
    shutil.rmtree(mvtec / CAT / "train")
    _raises_naming(mvtec / CAT / "train" / "good", train_samples, mvtec, CAT)


def test_empty_train_good(mvtec):
    good = mvtec / CAT / "train" / "good"
    shutil.rmtree(good)
    good.mkdir()
    (good / "readme.txt").write_text("no images here")
    msg = _raises_naming(good, train_samples, mvtec, CAT)
    assert "no images" in msg and ".png" in msg
    assert msg.endswith("put images of good parts there")  # not "or remove the folder", which training needs


def test_empty_test_type_folder(mvtec):
    empty = mvtec / CAT / "test" / "crack"
    empty.mkdir()
    _raises_naming(empty, test_samples, mvtec, CAT)


def test_missing_test_folder(mvtec):
    shutil.rmtree(mvtec / CAT / "test")
    _raises_naming(mvtec / CAT / "test", test_samples, mvtec, CAT)


def test_corrupt_image(mvtec):
    bad = mvtec / CAT / "train" / "good" / "004.png"
    bad.write_bytes(b"this is not a png" * 10)
    samples = train_samples(mvtec, CAT)
    _raises_naming(bad, load_images, samples, 32, "train")


def test_zero_byte_image(mvtec):
    bad = mvtec / CAT / "train" / "good" / "005.jpg"
    bad.write_bytes(b"")
    msg = _raises_naming(bad, load_images, train_samples(mvtec, CAT), 32, "train")
    assert "empty" in msg


def test_missing_mask(mvtec):
    mask = mvtec / CAT / "ground_truth" / "scratch" / "001_mask.png"
    mask.unlink()
    msg = _raises_naming(mask, test_samples, mvtec, CAT)
    assert str(mvtec / CAT / "test" / "scratch" / "001.jpg") in msg


def test_missing_ground_truth_folder(mvtec):
    shutil.rmtree(mvtec / CAT / "ground_truth" / "spot")
    _raises_naming(mvtec / CAT / "ground_truth" / "spot" / "000_mask.png", test_samples, mvtec, CAT)


def test_mask_of_wrong_size(mvtec):
    mask = mvtec / CAT / "ground_truth" / "spot" / "003_mask.png"
    image = mvtec / CAT / "test" / "spot" / "003.jpg"
    write_image(mask, np.zeros((10, 12), np.uint8))
    msg = _raises_naming(mask, load_masks, test_samples(mvtec, CAT), 32)
    assert str(image) in msg and "12x10" in msg


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a png"])
def test_unreadable_mask(mvtec, content):
    mask = mvtec / CAT / "ground_truth" / "scratch" / "000_mask.png"
    mask.write_bytes(content)
    _raises_naming(mask, load_masks, test_samples(mvtec, CAT), 32)


def test_sample_is_a_plain_dataclass(tmp_path):
    s = Sample(tmp_path / "a.png", "good", None)
    assert s == Sample(tmp_path / "a.png", "good", None)


def test_two_masks_of_one_name_are_refused_not_one_picked(mvtec):
    """000_mask.png and 000_mask.bmp: the first by name was used, silently (an empty .bmp halved a
    type's localisation)."""
    gt = mvtec / CAT / "ground_truth" / "spot"
    shutil.copy(gt / "000_mask.png", gt / "000_mask.bmp")
    with pytest.raises(DatasetError, match="000_mask.bmp and 000_mask.png: two masks of one name; keep one"):
        test_samples(mvtec, CAT)


def test_a_file_name_that_is_not_utf8_is_split_and_fingerprinted_like_any_other(mvtec):
    """Such a name (a camera's Latin-1 file) stopped training with "'utf-8' codec can't encode", naming no
    file; it is a valid image that every other command reads."""
    import os

    folder = mvtec / CAT / "train" / "good"
    first = sorted(folder.iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(folder), b"caf\xe9.png"))
    samples = train_samples(mvtec, CAT)
    assert any("\udce9" in s.path.name for s in samples)  # how Python holds the byte that is not UTF-8
    fit, val = split_train_val(samples, 0.2, 0)
    assert len(fit) + len(val) == len(samples)
    assert len(fingerprint(samples)) == 64


def test_an_image_that_the_disk_cannot_read_is_named_with_what_to_check(mvtec, monkeypatch):
    """An I/O error (a failing disk, a dropped share) came out as "[Errno 5] Input/output error" with no
    file named, or was blamed on permissions."""
    import errno

    image = sorted((mvtec / CAT / "train" / "good").iterdir())[0]
    real = Path.read_bytes

    def failing(path):
        if path == image:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", failing)
    with pytest.raises(ImageError, match="Input/output error\\); check the disk or share it is on") as err:
        read_image(image)
    assert str(image) in str(err.value)
    with pytest.raises(DatasetError, match="check the disk or share"):
        load_images(train_samples(mvtec, CAT), 32)


def test_decode_image_refuses_bits_it_cannot_use_and_what_is_not_bytes():
    """bits=7 raised OverflowError deep in numpy, bits=20 gave a black frame without a word."""
    png16 = cv2.imencode(".png", np.full((32, 32), 4095, np.uint16))[1].tobytes()
    assert decode_image(png16, bits=12).max() == 255
    for bad in (7, 20, "12", 12.0, True):
        with pytest.raises(ValueError, match=f"bits {bad!r}: .* a whole number from 8 to 16"):
            decode_image(png16, bits=bad)
    with pytest.raises(TypeError, match="decode_image: NoneType given, where the encoded image's bytes go"):
        decode_image(None)


def test_an_image_claiming_more_pixels_than_the_cap_is_refused_before_decoding(tmp_path):
    """A PNG of a few hundred KB can claim gigapixels: OpenCV's cap (set by importing ustudents, 2^26)
    refuses it with the limit in force, named."""
    bomb = cv2.imencode(".png", np.zeros((9000, 8000), np.uint8))[1].tobytes()  # 72 megapixels, ~70 KB
    assert len(bomb) < 1 << 20
    with pytest.raises(ImageError, match="<bytes>: more than 67,108,864 pixels, the most OpenCV is set to decode"):
        decode_image(bomb)



def test_an_image_or_mask_whose_header_claims_an_absurd_size_is_refused_in_one_line(tmp_path):
    """OpenCV raises, not returns None, past its limits: a BMP claiming 2,000,000 pixels of width, or a
    mask PNG claiming 10,000 x 10,000, ended every command in a cv2.error traceback."""
    import struct
    import zlib

    from ustudents.engines.images import read_mask

    bmp = bytearray(cv2.imencode(".bmp", np.zeros((40, 48, 3), np.uint8))[1].tobytes())
    struct.pack_into("<i", bmp, 18, 2_000_000)  # BITMAPINFOHEADER width
    with pytest.raises(ImageError, match="cam.bmp: its header claims a width or height over OpenCV's limit"):
        decode_image(bytes(bmp), "cam.bmp")
    png = bytearray(cv2.imencode(".png", np.zeros((40, 48), np.uint8))[1].tobytes())
    struct.pack_into(">II", png, 16, 10_000, 10_000)  # IHDR width, height, and its CRC made right
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    mask = tmp_path / "000_mask.png"
    mask.write_bytes(bytes(png))
    with pytest.raises(ImageError, match="000_mask.png: more than 67,108,864 pixels"):
        read_mask(mask)


def test_importing_cv2_before_ustudents_is_warned_of_and_the_cap_reported_as_opencvs_own():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    code = "import cv2, ustudents; print(ustudents.OPENCV_MAX_PIXELS)"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert first.stdout.strip() == str(1 << 30) and "cv2 was imported before ustudents" in first.stderr
    code = "import ustudents, cv2; print(ustudents.OPENCV_MAX_PIXELS)"
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert after.stdout.strip() == str(1 << 26) and "imported before" not in after.stderr


def test_a_pixel_cap_opencv_cannot_read_is_refused_naming_it_not_aborted_in_opencv():
    """OpenCV parses OPENCV_IO_MAX_IMAGE_PIXELS when cv2 is imported and kills the process on a value
    it cannot read ("terminate called ... stoull"), whatever was run, --help included."""
    import subprocess
    import sys

    code = "import ustudents, cv2; print(ustudents.OPENCV_MAX_PIXELS)"
    for bad in ("abc", "-1", "0", "5 ", "100GB", "5kB", "9" * 20):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": bad})
        assert run.returncode == 2 and run.stderr.strip() == (
            f"Error: OPENCV_IO_MAX_IMAGE_PIXELS={bad!r} is not a pixel count: set a whole number above 0 "
            "(ustudents' default is 67108864) or unset it"), run.stderr
    for good, cap in (("1000", "1000"), ("100MB", "None")):  # OpenCV's own suffixes pass to it
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": good})
        assert run.returncode == 0 and run.stdout.strip() == cap, run.stderr


def test_elongated_images_are_named_as_squashed_with_what_to_do(tmp_path, caplog):
    """A line-scan camera's 4:1 frames became 256 x 256 squares without a word: their defects shrank
    4 times more along the long side, below what the 17 px patches see."""
    from ustudents.train.dataset import Sample, load_images

    rng = np.random.default_rng(0)
    square, strip = tmp_path / "square.png", tmp_path / "strip.png"
    write_image(square, rng.integers(0, 256, (60, 50, 3), dtype=np.uint8))
    write_image(strip, rng.integers(0, 256, (40, 160, 3), dtype=np.uint8))
    with caplog.at_level("WARNING", logger="ustudents.train.dataset"):
        assert load_images([Sample(square, "good")], 32, desc="training images").shape == (1, 32, 32, 3)
        assert caplog.records == []  # 1.2 : 1 is not worth a word
        load_images([Sample(square, "good"), Sample(strip, "good")], 32, desc="training images")
    assert len(caplog.records) == 1
    assert (f"training images: images up to 4.0 times longer than wide (e.g. {strip}) are squashed into 32 x 32 "
            "squares") in caplog.text and "cut such frames into near-square tiles" in caplog.text


def test_an_empty_or_inverted_mask_of_a_defect_image_is_named_once(mvtec, caplog):
    """A defect image whose mask marks nothing had all its pixels scored as defect-free, and an inverted mask (background 255) lowered the pixel AUROC, both
    in silence; only a type without any defect pixel, or an all-white mask, was refused."""
    gt = mvtec / CAT / "ground_truth"
    empty, inverted = gt / "scratch" / "000_mask.png", gt / "spot" / "001_mask.png"
    drawn = cv2.imread(str(empty), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(empty), np.zeros_like(drawn))
    spot = cv2.imread(str(inverted), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(inverted), np.where(spot > 0, 0, 255).astype(np.uint8))
    with caplog.at_level("WARNING", logger="ustudents.train.dataset"):
        checked_test_set(mvtec, CAT, 32)
        checked_test_set(mvtec, CAT, 32)  # `ustudents-train` checks the test set before training and after it
    messages = [r.getMessage() for r in caplog.records if "no defect pixel" in r.getMessage() or "inverted" in
                r.getMessage()]
    assert messages == [
        f"{gt}: 1 mask(s) of defect images mark no defect pixel (e.g. {empty}), so all their pixels are scored "
        "as defect-free; fix those masks, or move the images to test/good if they are good",
        f"{gt}: 1 mask(s) mark more than half of their image as defect (e.g. {inverted}): inverted (background 255, "
        "defect 0)? a mask marks the defect's pixels, 0 elsewhere"]


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_a_picture_is_read_turned_as_its_exif_orientation_says(tmp_path, suffix):
    """A phone's or camera's JPEG stored rotated, with an EXIF orientation tag that every viewer and
    labelling tool follows: read as stored, its mask, drawn on the upright picture, was refused ("mask
    is 60x40 but its image is 40x60"), or on a square image lay across it and evaluation scored the
    misplaced map in silence (pixel AUROC 0.99 -> 0.61 in an audit). PNG and WebP carry the tag too,
    and were read as stored."""
    from PIL import Image

    from ustudents.train.dataset import load_regions

    y, x = np.mgrid[0:40, 0:60]
    upright = np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8)  # RGB, 60 wide, 40 high
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # as the sensor lay: 40 wide
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    stored.save(tmp_path / f"img{suffix}", exif=exif.tobytes(), **({"quality": 95} if suffix == ".jpg" else
                                                                    {"lossless": True} if suffix == ".webp" else {}))
    img = read_image(tmp_path / f"img{suffix}", None)
    assert img.shape == (40, 60, 3) and np.abs(img.astype(int) - upright).mean() < (2 if suffix == ".jpg" else 1e-9)
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 10:30] = 255  # drawn on the picture as shown
    cv2.imwrite(str(tmp_path / "img_mask.png"), mask)
    regions = load_regions([Sample(tmp_path / f"img{suffix}", "spot", tmp_path / "img_mask.png")], 30)
    assert np.array_equal(regions[0] > 0, cv2.resize(mask, (30, 30), interpolation=cv2.INTER_NEAREST_EXACT) > 0)


def test_pictures_read_for_their_orientation_keep_every_pixel_as_read_before(tmp_path):
    """PNG and WebP are now decoded with the flags that apply the EXIF orientation: 16-bit, grey, alpha
    and palette pictures must give the pixels they gave read unchanged (alpha dropped, as before)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    cases = {"rgba.png": rng.integers(0, 256, (20, 30, 4), dtype=np.uint8),
             "rgb16.png": rng.integers(0, 4096, (20, 30, 3), dtype=np.uint16),
             "grey16.png": rng.integers(0, 65536, (20, 30), dtype=np.uint16),
             "rgba.webp": rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)}
    for name, pixels in cases.items():
        params = [cv2.IMWRITE_WEBP_QUALITY, 101] if name.endswith(".webp") else []
        assert cv2.imwrite(str(tmp_path / name), pixels, params)
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("P").save(tmp_path / "palette.png")
    for path in sorted(tmp_path.iterdir()):
        unchanged = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        bits = 12 if "16" in path.name else 8
        if unchanged.dtype == np.uint16:
            unchanged = np.minimum(unchanged >> (bits - 8), 255).astype(np.uint8)
        expected = (cv2.cvtColor(unchanged, cv2.COLOR_GRAY2RGB) if unchanged.ndim == 2 else
                    cv2.cvtColor(unchanged, cv2.COLOR_BGRA2RGB if unchanged.shape[2] == 4 else cv2.COLOR_BGR2RGB))
        assert np.array_equal(decode_image(path.read_bytes(), path.name, bits=bits, dark_hint=False), expected), path.name


def test_images_of_a_format_not_read_beside_ones_that_are_are_named(mvtec, caplog):
    """Four of sixteen train/good images saved as .pgm (a machine-vision camera's format) were left
    out in silence: training said '11 training and 1 validation images' and nothing more."""
    good = mvtec / CAT / "train" / "good"
    for f in sorted(good.iterdir())[:2]:
        cv2.imwrite(str(f.with_suffix(".pgm")), cv2.imread(str(f), cv2.IMREAD_GRAYSCALE))
        f.unlink()
    with caplog.at_level("WARNING", logger="ustudents.train.dataset"):
        samples = train_samples(mvtec, CAT)
    names = sorted(f.name for f in good.iterdir() if f.suffix == ".pgm")
    assert all(s.path.suffix != ".pgm" for s in samples)
    assert f"{good}: 2 file(s) of an image format not read here (e.g. {names[0]}) are not used; convert them to PNG " \
           "to use them" in caplog.text


def test_masks_there_under_another_name_are_named_not_asked_for(mvtec):
    """Masks copied from Windows or macOS, or from another dataset, with their folder or name in
    another case, or named as their image: each was "missing mask ...; add it"."""
    gt = mvtec / CAT / "ground_truth"
    image = mvtec / CAT / "test" / "scratch" / "000.png"
    mask = gt / "scratch" / "000_mask.png"
    for moved, shown in ((gt / "scratch" / "000_MASK.png", gt / "scratch" / "000_MASK.png"),
                         (gt / "scratch" / "000.png", gt / "scratch" / "000.png")):
        mask.rename(moved)
        with pytest.raises(DatasetError) as info:
            test_samples(mvtec, CAT)
        assert str(info.value) == (f"{mask}: missing mask for test image {image} ({shown} is there: a mask is named "
                                   "<image name>_mask, case-sensitive; rename it to 000_mask.png)")
        moved.rename(mask)
    for folder, renamed in ((gt / "scratch", gt / "Scratch"), (gt, mvtec / CAT / "Ground_Truth")):
        folder.rename(renamed)
        with pytest.raises(DatasetError) as info:
            test_samples(mvtec, CAT)
        assert str(info.value).startswith(f"{mask}: missing mask for test image {image} ({renamed} is there: names are "
                                          f"case-sensitive, rename it to {folder.name})"), str(info.value)
        renamed.rename(folder)


def test_resized_regions_sit_where_the_resized_image_shows_the_defect():
    """Ground truth resized with OpenCV's INTER_NEAREST took each block's first pixel: at 1024 -> 256
    the masks sat 0.375 model pixels down-right of the images' defects (resized at pixel centres). Over
    defects at every phase of the 4-pixel blocks, the mask's centre is now within the 0.125 px that
    rounding at a block's middle gives (nearest picks one of its two middle pixels)."""
    from ustudents.engines.images import resize, resize_regions

    offsets = []
    for start in range(100, 108):
        regions = np.zeros((1024, 1024), np.int32)
        regions[start:start + 21, start:start + 21] = 1
        picture = np.where(regions[..., None] > 0, 255, 0).astype(np.uint8).repeat(3, axis=2)
        shown = resize(picture, 256)[..., 0].astype(np.float64)
        mask = resize_regions(regions, 256) > 0
        rows = np.arange(256, dtype=np.float64)
        shown_centre = (shown.sum(1) * rows).sum() / shown.sum()
        mask_centre = (mask.sum(1) * rows).sum() / mask.sum()
        offsets.append(mask_centre - shown_centre)
    assert abs(np.mean(offsets)) <= 0.13, offsets


def grey_alpha_tiff_16(grey: np.ndarray) -> bytes:
    """A classic little-endian TIFF of 16-bit grey and an unassociated alpha: 2 samples a pixel."""
    h, w = grey.shape
    pixels = np.dstack([grey, np.full_like(grey, 65535)]).astype("<u2").tobytes()
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 2, None), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, None),
               (277, 3, 1, 2), (278, 3, 1, h), (279, 4, 1, len(pixels)), (284, 3, 1, 1), (338, 3, 1, 2)]
    data_at = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, kind, n, value in entries:
        if tag == 258:  # BitsPerSample 16, 16: two SHORTs, inline
            out += struct.pack("<HHIHH", tag, kind, n, 16, 16)
        else:
            value = data_at if tag == 273 else value
            out += struct.pack("<HHI", tag, kind, n) + (struct.pack("<HH", value, 0) if kind == 3 else
                                                         struct.pack("<I", value))
    return bytes(out + struct.pack("<I", 0) + pixels)


def test_a_16_bit_tiff_opencv_reads_at_8_bits_is_refused_not_judged_dark():
    """OpenCV has no 16-bit path for grey with alpha in a TIFF: it read the file at 8 bits, so a
    12-bit frame came out about 16 times darker and was judged on that, the model's uint16_bits and
    the dark-frame warning passed by. Refused in one line; the same data as 16-bit grey still reads."""
    grey = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)  # 12-bit data
    with pytest.raises(ImageError, match="a 16-bit TIFF OpenCV reads at 8 bits only .*save it as 16-bit grey"):
        decode_image(grey_alpha_tiff_16(grey), "frame.tif", bits=12)
    ok, plain = cv2.imencode(".tiff", grey)
    assert ok and decode_image(plain.tobytes(), "frame.tif", bits=12).max() == 255


def test_a_tiff_stack_is_refused_and_a_tiff_with_a_thumbnail_reads_its_image(tmp_path):
    """A TIFF of several pages of one size (exposures, colour planes, frames of a stack) was judged by its
    first page alone, in silence. A second page of another size is a thumbnail: the first is read."""
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, (40, 48), dtype=np.uint8) for _ in range(2))
    assert cv2.imwritemulti(str(tmp_path / "stack.tif"), [first, second])
    with pytest.raises(ImageError, match=r"stack.tif: a TIFF holding more than one page of 48 x 40 pixels .*save or "
                                         "send each page as an image of its own"):
        read_image(tmp_path / "stack.tif")
    assert cv2.imwritemulti(str(tmp_path / "thumb.tif"), [first, first[::4, ::4]])
    assert np.array_equal(read_image(tmp_path / "thumb.tif")[:, :, 0], first)
    assert cv2.imwrite(str(tmp_path / "one.tif"), first) and np.array_equal(read_image(tmp_path / "one.tif")[:, :, 0],
                                                                            first)
    import tifffile  # scikit-image's, a test dependency: OpenCV writes no BigTIFF

    tifffile.imwrite(tmp_path / "big.tif", np.stack([first, second]), bigtiff=True)
    assert (tmp_path / "big.tif").read_bytes()[:4] == b"II+\x00"
    with pytest.raises(ImageError, match="big.tif: a TIFF holding more than one page of 48 x 40 pixels"):
        read_image(tmp_path / "big.tif")
