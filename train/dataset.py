"""The MVTec AD folder layout: finding, splitting, loading and fingerprinting its images.

    ROOT/CATEGORY/train/good/*                       defect-free training images
    ROOT/CATEGORY/test/<type>/*                      test images; type "good" = defect-free
    ROOT/CATEGORY/ground_truth/<type>/<stem>_mask.png  defect masks (not needed for "good")

Images may be any of IMAGE_SUFFIXES (any letter case), gray or colour. Files whose names start
with "." (e.g. macOS "._000.png" resource forks) and files of other types are ignored. Images in
subfolders of these folders are not read: refused where a folder has no others ("move them up"), a
warning where it has. An image file that is a symbolic link to nothing is refused.
Every problem raises DatasetError with one line naming the file or folder and what to do.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ustudents.engines.bundle import sha256_file
from ustudents.engines.files import real_path
from ustudents.engines.images import (
    IMAGE_SUFFIXES,
    UINT16_BITS,
    ImageError,
    first_copy,
    image_files,
    images_in_subfolders,
    missing_folder_hint,
    read_image,
    read_mask,
    defect_regions,
    resize,
    resize_regions,
    uint16_bits_of,
)

from .progress import progress

GOOD = "good"
_SUFFIX_LIST = "/".join(IMAGE_SUFFIXES)
# Image formats a camera or a viewer may write that the data layout does not read (_listed names them)
OTHER_IMAGE_SUFFIXES = {".pgm", ".ppm", ".pbm", ".pnm", ".jfif", ".jpe", ".jp2", ".j2k", ".heic", ".heif", ".avif",
                        ".gif", ".dng", ".raw"}
log = logging.getLogger(__name__)
SQUASH_WARN = 2.0  # images longer than this many times their width (or the reverse) are warned about
_checked_for_nested: set[Path] = set()  # warn once per folder: test_samples runs before training and after it
_checked_for_unused: set[Path] = set()  # ground_truth folders checked for masks no test image uses: once each


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file or folder and the fix."""


@dataclass
class Sample:
    path: Path
    defect: str  # "good" for defect-free
    mask_path: Path | None = None


DATASET_PARTS = ("train", "test", "ground_truth")


def dataset_part(path: str | Path) -> Path | None:
    """The train/, test/ or ground_truth/ folder of an MVTec AD category that `path` is in or under
    (a category: a folder holding at least two of them), else None. Outputs written there are read
    as the dataset's own images: a folder under test/ becomes a defect type with no masks."""
    for folder in [real_path(path), *real_path(path).parents]:
        if folder.name in DATASET_PARTS and sum((folder.parent / part).is_dir() for part in DATASET_PARTS) >= 2:
            return folder
    return None


def refuse_inside(path: str | Path, option: str, give: str) -> None:
    """ValueError where `path` lies in a dataset's train/, test/ or ground_truth/ (dataset_part): masks
    and overlays written there are read as its images. `give`: the folder to ask for instead."""
    if (part := dataset_part(path)) is not None:
        raise ValueError(f"{option} {path}: inside the dataset folder {part}, where masks and overlays would be read "
                         "as the category's own images (under test/, a defect type without masks; under train/, good "
                         f"parts); give {give} outside the dataset")


def _require_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found{missing_folder_hint(folder)}; {what}")


def _listed(folder: Path) -> list[Path]:
    """image_files(folder) as DatasetError, with a warning (once per folder) about images in its
    subfolders, which the layout does not read: the images directly in it are a valid set."""
    try:
        images = image_files(folder)
    except ImageError as e:
        raise DatasetError(str(e)) from None
    if not images or real_path(folder) in _checked_for_nested:
        return images
    _checked_for_nested.add(real_path(folder))
    other = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in OTHER_IMAGE_SUFFIXES and f.is_file())
    if other:  # left out in silence beside the images read (4 of 16 in an audit's train/good)
        log.warning("%s: %d file(s) of an image format not read here (e.g. %s) are not used; convert them to PNG to "
                    "use them (read: %s)", folder, len(other), other[0], _SUFFIX_LIST)
    nested = images_in_subfolders(folder)
    if nested:
        names = ", ".join(f"{name} ({n})" for name, n in list(nested.items())[:3])
        more = f" and {len(nested) - 3} more" if len(nested) > 3 else ""
        log.warning("%s: %d image(s) in its subfolders %s%s are not used: the MVTec AD layout reads only the images "
                    "directly in this folder (%d here); move them up to use them", folder, sum(nested.values()),
                    names, more, len(images))
    return images


def _refuse_only_nested(folder: Path) -> None:
    """For a folder with no images of its own: an error if its subfolders hold some."""
    nested = images_in_subfolders(folder) if folder.is_dir() else {}
    if nested:  # sorted into subfolders (by day, by camera): the layout wants them directly here
        raise DatasetError(f"{folder}: its images are in subfolders ({', '.join(list(nested)[:3])}); the "
                           "MVTec AD layout wants them directly in this folder: move them up")


def _images_in(folder: Path, fix: str = "add some or remove the folder") -> list[Path]:
    """The image files directly in `folder`, sorted by name; an error if there are none (`fix`: what to do)."""
    images = _listed(folder)
    if not images:
        _refuse_only_nested(folder)
        raise DatasetError(f"{folder}: no images ({_SUFFIX_LIST}) in this folder; {fix}")
    return images


def _category_dir(root: str | Path, category: str) -> Path:
    root = Path(root)
    if not category or Path(category).name != category or category in (".", ".."):
        # "../x" or "/abs" would read outside --data-root, and the default --out would follow it out
        raise DatasetError(f"CATEGORY {category!r}: give the name of one folder under --data-root, not a path")
    _require_dir(root, "--data-root must be an MVTec AD root containing CATEGORY/train/good")
    cat = root / category
    if not cat.is_dir():
        if category != category.strip():
            raise DatasetError(f"CATEGORY {category!r}: no such folder under {root}; the name has spaces at its ends "
                               "(a quoting slip?): give it without them")
        case = [d.name for d in root.iterdir() if d.is_dir() and d.name.lower() == category.lower()]
        if case:  # not "rename it", as for a folder the layout names: CATEGORY is the user's to change
            raise DatasetError(f"{cat}: category folder not found; {root / case[0]} is there, and names are "
                               f"case-sensitive: give CATEGORY as {case[0]!r}")
        if (root / "train" / "good").is_dir():  # --data-root given the category folder itself
            raise DatasetError(f"{cat}: category folder not found; {root} holds train/good itself, so it is a "
                               f"category's folder: give its parent, --data-root {root.parent}")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DatasetError(
            f"{cat}: category folder not found{missing_folder_hint(cat)}; categories under {root}: "
            f"{', '.join(found) or 'none'}: give one of them, or the --data-root that holds {category}/"
        )
    return cat


def train_samples(root: str | Path, category: str) -> list[Sample]:
    """The defect-free training images of one category, sorted by file name."""
    folder = _category_dir(root, category) / "train" / GOOD
    _require_dir(folder, "--data-root must be an MVTec AD root containing CATEGORY/train/good")
    return [Sample(p, GOOD, None) for p in _images_in(folder, "put images of good parts there")]


def _masks_in(gt_dir: Path) -> dict[str, Path]:
    """The mask files directly in `gt_dir` by stem (two of one stem are refused)."""
    masks: dict[str, Path] = {}
    for p in _listed(gt_dir):
        if p.stem in masks:  # e.g. 000_mask.png and 000_mask.bmp: which one counts would be a guess
            raise DatasetError(f"{masks[p.stem]} and {p.name}: two masks of one name; keep one of them")
        masks[p.stem] = p
    if not masks:
        _refuse_only_nested(gt_dir)  # rather than "missing mask" for masks that are there, a level down
    return masks


def _find_mask(masks: dict[str, Path], gt_dir: Path, image: Path) -> Path:
    """The mask of a defect test image; else an error that names what is there under another name
    (a folder or file in another case, from Windows or macOS; a mask named as its image), where
    "missing mask ...; add it" sent users to add masks they had."""
    wanted = f"{image.stem}_mask"
    if wanted in masks:
        return masks[wanted]
    if not gt_dir.is_dir():
        hint = missing_folder_hint(gt_dir) or ("" if gt_dir.parent.is_dir() else missing_folder_hint(gt_dir.parent))
    else:
        near = [p for stem, p in masks.items() if stem.lower() == wanted.lower() or stem == image.stem]
        hint = f" ({near[0]} is there: a mask is named <image name>_mask, case-sensitive; rename it to " \
               f"{wanted}{near[0].suffix})" if near else ""
    raise DatasetError(f"{gt_dir / (wanted + '.png')}: missing mask for test image {image}{hint or '; add it'}")


def test_samples(root: str | Path, category: str) -> list[Sample]:
    """All test images of one category: type "good" first, then the defect types sorted by name;
    within a type sorted by file name. Every non-good image must have a mask."""
    cat = _category_dir(root, category)
    test_dir = cat / "test"
    _require_dir(test_dir, "an MVTec AD category needs CATEGORY/test/<type>/ folders (type 'good' = defect-free)")
    for p in sorted(test_dir.iterdir()):  # else that type was left out of the metrics without a word
        if p.is_symlink() and not p.exists() and not p.name.startswith("."):  # .#x: an editor's lock
            raise DatasetError(f"{p}: a test type folder{missing_folder_hint(p)}")
    types = sorted((p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda t: (t != GOOD, t))
    if not types:
        raise DatasetError(f"{test_dir}: no test type folders; add e.g. test/good/ and test/<defect>/")
    for t in types:  # else read as a defect type, and its good images asked for masks
        if t.lower() == GOOD and t != GOOD:
            raise DatasetError(f"{test_dir / t}: the defect-free test images' folder is named '{GOOD}', in lower case "
                               "(names are case-sensitive); rename it")
    samples = []
    for defect in types:
        images = _images_in(test_dir / defect)
        stems: dict[str, Path] = {}
        for image in images:  # 000.png and 000.bmp would share 000_mask.png (and a frame id in the demo)
            if image.stem in stems:
                raise DatasetError(f"{stems[image.stem]} and {image.name}: two test images of one name; masks are "
                                   "found by name (<name>_mask.png), so rename or remove one")
            stems[image.stem] = image
        gt_dir = cat / "ground_truth" / defect
        if defect != GOOD and gt_dir.is_symlink() and not gt_dir.exists():  # not "missing mask ...; add it"
            raise DatasetError(f"{gt_dir}: the masks' folder{missing_folder_hint(gt_dir)}")
        masks = {} if defect == GOOD else _masks_in(gt_dir)
        for image in images:
            mask = None if defect == GOOD else _find_mask(masks, gt_dir, image)
            samples.append(Sample(image, defect, mask))
    _warn_of_unused_masks(cat, types, samples)
    return samples


test_samples.__test__ = False  # not a pytest test, though its name starts with "test_"


def _warn_of_unused_masks(cat: Path, types: list[str], samples: list[Sample]) -> None:
    """A warning for each ground_truth folder holding masks that no test image uses: a defect type with
    no test/<type> folder (the type left out of the metrics), masks of no test image (renamed or deleted
    images), masks in ground_truth/good (good images are defect-free by definition, so a defective one
    there is scored as good). Each was left out without a word."""
    gt = cat / "ground_truth"
    if not gt.is_dir() or real_path(gt) in _checked_for_unused:
        return
    _checked_for_unused.add(real_path(gt))
    used = {s.mask_path for s in samples}
    for folder in sorted(p for p in gt.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            unused = [m for m in image_files(folder) if m not in used]
        except ImageError:  # a link to nothing among them: not read, so not this warning's to report
            continue
        if not unused:
            continue
        test = cat / "test" / folder.name
        if folder.name == GOOD:
            log.warning("%s: %d mask(s) of good test images, which are defect-free by definition and scored as such; "
                        "move a defective image to test/<type> and its mask to ground_truth/<type>", folder, len(unused))
        elif folder.name not in types:
            log.warning("%s: %d mask(s) of defect type '%s', but %s does not exist, so that type is not evaluated; "
                        "put its images there", folder, len(unused), folder.name, test)
        else:
            log.warning("%s: %d mask(s) match no image in %s (e.g. %s), so those images are not evaluated; put them "
                        "back, or remove the masks", folder, len(unused), test, unused[0].name)


def _unit_hash(seed: int, name: str) -> float:
    """A number in [0, 1) that depends only on (seed, file name)."""
    # surrogateescape: a file name that is not UTF-8 (os.listdir gives it surrogates) hashes as its bytes
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_train_val(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split training samples into (train, val) by a hash of each file name, so adding images
    never moves the others. With val_fraction > 0 each side gets at least one sample.
    Both lists keep the input order."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction}: must be in [0, 1)")
    folder = samples[0].path.parent if samples else "training set"
    if len(samples) < 2:
        raise DatasetError(f"{folder}: {len(samples)} training image(s); at least 2 are needed, add more images")
    u = [_unit_hash(seed, s.path.name) for s in samples]
    val_idx = {i for i, x in enumerate(u) if x < val_fraction}
    if val_fraction > 0 and not val_idx:  # tiny sets: the lowest-hash sample goes to val
        val_idx = {min(range(len(u)), key=u.__getitem__)}
    if len(val_idx) == len(samples):  # the highest-hash sample stays in train
        val_idx.discard(max(range(len(u)), key=u.__getitem__))
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def _read(path: Path, read):
    """read(path), with a file's problems as DatasetError."""
    try:
        return read(path)
    except ImageError as e:
        raise DatasetError(str(e)) from None
    except OSError as e:  # e.g. no read permission
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e}); fix its permissions") from None


@dataclass(frozen=True)
class BitDepths:
    """The bits each 16-bit image among a set of images uses (uint16_bits_of); 8-bit ones are counted."""
    used: dict[Path, int]  # 16-bit images only
    eight_bit: int

    @property
    def bits(self) -> int | None:
        """The bits to read them with: the most any uses (a camera's depth shows in its brightest
        frame); None if none is 16-bit."""
        return max(self.used.values(), default=None)

    def mixed_warning(self, what: str) -> str | None:
        """A warning where 16-bit images use 3 or more bits fewer than the most any uses: read with
        that, they come out 8x darker or more (one 8-bit image saved as 16-bit, which fills all 16,
        darkens a 12-bit camera's 16 times), naming examples of both."""
        top = self.bits
        darker = sorted(p for p, b in self.used.items() if top is not None and b <= top - 3)
        if not darker:
            return None
        widest = sorted(p for p, b in self.used.items() if b == top)
        most = max(self.used[p] for p in darker)
        return (f"WARNING: {what}: the 16-bit images use different bit depths: {top} bits in {len(widest)} (e.g. "
                f"{widest[0].name}), at most {most} in {len(darker)} (e.g. {darker[0].name}); all are read with {top} "
                f"bits, so those {len(darker)} come out {1 << (top - most)}x darker or more. If they come from different "
                "cameras, or some were converted from 8 bits (which fills all 16), use images of one kind")


def bit_depths(samples: list[Sample]) -> BitDepths:
    used = {s.path: b for s in samples if (b := _read(s.path, uint16_bits_of)) is not None}
    return BitDepths(used=used, eight_bit=len(samples) - len(used))


def load_images(samples: list[Sample], size: int, desc: str = "images", bits: int = UINT16_BITS,
                dark_hint: bool = True, shapes: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Read and resize images to uint8 (N, size, size, 3) RGB; gray files become 3 channels, 16-bit
    data holding `bits` bits is scaled to 8 (images module). `dark_hint`: images.dark_16_bit_hint's
    advice to recalibrate a model, off where the images make one (BitDepths.mixed_warning says it).
    `shapes`, when given, gains each image's (height, width) as read (the model's frame_shapes)."""
    out = np.empty((len(samples), size, size, 3), np.uint8)
    longest = (1.0, None)  # the most elongated image: (long side / short side, its path)
    for i, s in enumerate(progress(samples, desc=desc, unit="img", disable=None)):
        img = _read(s.path, lambda path: read_image(path, bits, dark_hint=dark_hint))
        if shapes is not None:
            shapes.append(img.shape[:2])
        ratio = max(img.shape[:2]) / min(img.shape[:2])
        if ratio > longest[0]:
            longest = (ratio, s.path)
        out[i] = resize(img, size)
    if longest[0] > SQUASH_WARN:
        # every image becomes a size x size square (the paper's, on MVTec AD's square images): a
        # line-scan frame's defects are squashed along its long side by this much, in training as in
        # the worker, and shrink below what the smallest patch (17 px) sees
        log.warning("%s: images up to %.1f times longer than wide (e.g. %s) are squashed into %d x %d squares, which "
                    "shrinks their defects %.1f times more along the long side; cut such frames into near-square "
                    "tiles (each an image of its own, here and on the stream) to keep the detail", desc,
                    longest[0], longest[1], size, size, longest[0])
    return out


def refuse_copies(folder: str, samples: list[Sample], images) -> None:
    """DatasetError naming a pair where two images are the same picture as loaded (a copy, or the same
    frame saved twice): a camera's frames differ at least by its noise. Copies make the good images'
    statistics narrower than the line's, so good parts get flagged; 40 copies of one image calibrated
    a threshold of 0 that flagged every part. Blank frames are left to check_not_blank's warning."""
    pair = first_copy(images)
    if pair is not None:
        a, b = sorted(samples[i].path.name for i in pair)
        raise DatasetError(f"{folder}: {a} and {b} are the same picture: copies narrow the good images' "
                           "statistics, so good parts would be flagged; remove them")


def load_masks(samples: list[Sample], size: int) -> np.ndarray:
    """Ground-truth masks as bool (N, size, size); all False for good samples (load_regions > 0)."""
    return load_regions(samples, size) > 0


def load_regions(samples: list[Sample], size: int) -> np.ndarray:
    """Ground-truth defect regions as int32 (N, size, size): 0 where defect-free (all of a good
    sample), else the number of the pixel's 8-connected defect region in its image, 1, 2, ...
    Regions are found at the mask's own size, then resized (nearest) with their numbers: a scratch a
    few pixels wide, shrunk to the model's size first, falls apart into pieces that PRO would weigh
    as defects of their own (a 2 px line at 1024 px became 51 regions at 256). Each mask must have
    its image's original size."""
    out = np.zeros((len(samples), size, size), np.int32)
    for i, s in enumerate(samples):
        if s.defect == GOOD or s.mask_path is None:
            if s.defect != GOOD:
                raise DatasetError(f"{s.path}: defect test image '{s.defect}' has no mask; add it")
            continue
        try:
            mask = read_mask(s.mask_path)
            ih, iw = read_image(s.path, None).shape[:2]  # its size only: no hint about the model's bits
        except ImageError as e:
            raise DatasetError(str(e)) from None
        except OSError as e:
            raise DatasetError(f"{e.filename}: cannot be read ({e.strerror or e}); fix its permissions") from None
        mh, mw = mask.shape
        if (mh, mw) != (ih, iw):
            raise DatasetError(
                f"mask {s.mask_path} is {mw}x{mh} but its image {s.path} is {iw}x{ih}; "
                "masks must have the image's size"
            )
        out[i] = resize_regions(defect_regions(mask), size)
    return out


def checked_test_set(root: str | Path, category: str, size: int, samples: list[Sample] | None = None,
                     every_image: bool = False) -> tuple[list[Sample], np.ndarray, np.ndarray]:
    """The test set (or `samples` of it) with what evaluation needs of it checked: both good and
    defective images, each mask of its image's size, and a defect pixel at `size` in some mask of each
    type. Returns (samples, labels: defective, defect regions at `size`: load_regions). `every_image` also reads the good
    images (the masked ones are read for their size anyway): `ustudents-train` checks all this before
    training, not after hours of it with the bundle already written."""
    samples = test_samples(root, category) if samples is None else samples
    labels = np.array([s.defect != GOOD for s in samples])
    if labels.all() or not labels.any():
        raise DatasetError(f"{Path(root) / category / 'test'}: needs both good and defective images to compute "
                           "AUROC")
    regions = load_regions(samples, size)
    for defect in sorted({s.defect for s in samples} - {GOOD}):
        if not regions[[s.defect == defect for s in samples]].any():
            raise DatasetError(
                f"{Path(root) / category / 'ground_truth' / defect}: no mask of defect type {defect!r} has a defect "
                f"pixel (at the model's {size} px), so its pixel metrics cannot be computed; fix those masks or leave "
                f"test/{defect} out")
    _warn_of_odd_masks(Path(root) / category / "ground_truth", samples, regions, size)
    if every_image:
        for s in samples:
            if s.defect == GOOD:  # readable, whatever its bits (the bundle's are not known here)
                _read(s.path, lambda path: read_image(path, None))
    return samples, labels, regions


_checked_masks: set[tuple[Path, int]] = set()  # (ground_truth folder, size) warned about once each


def _warn_of_odd_masks(gt: Path, samples: list[Sample], regions: np.ndarray, size: int) -> None:
    """Masks that are no error but likely a mistake, each a warning naming one: a defect image whose
    mask holds no defect pixel (empty: a defect smaller than a pixel at the model's size keeps one,
    images.resize_regions), whose pixels are then all scored as defect-free; and a mask
    marking most of its image (inverted: background 255, defect 0), which lowered the pixel AUROC
    in silence. Only a type without any defect pixel, or an all-white mask, is refused."""
    if (real_path(gt), size) in _checked_masks:
        return  # ustudents-train checks the test set before training and evaluates it after
    _checked_masks.add((real_path(gt), size))
    defective = [(s, r) for s, r in zip(samples, regions) if s.defect != GOOD]
    empty = [s.mask_path for s, r in defective if not r.any()]
    most = [s.mask_path for s, r in defective if np.count_nonzero(r) > r.size / 2]
    if empty:
        log.warning("%s: %d mask(s) of defect images mark no defect pixel (e.g. %s), so all their pixels are scored "
                    "as defect-free; fix those masks, or move the images to test/good if they are good", gt,
                    len(empty), empty[0])
    if most:
        log.warning("%s: %d mask(s) mark more than half of their image as defect (e.g. %s): inverted (background 255, "
                    "defect 0)? a mask marks the defect's pixels, 0 elsewhere", gt, len(most), most[0])


def fingerprint(samples: list[Sample], root: Path | None = None) -> str:
    """sha256 hex over (name, size in bytes, sha256 of content) of every image and mask file of
    `samples`. Names are relative to `root`, by default to the category folder (e.g.
    "test/crack/001.png"), so identical files give the same fingerprint on any machine and under any
    root. Training records its training images' (data.fingerprint), evaluation its test images' and
    masks' (evaluation.data.fingerprint), calibrate its images' (threshold.fingerprint)."""
    h = hashlib.sha256()
    files = [s.path for s in samples] + [s.mask_path for s in samples if s.mask_path is not None]
    named = (Path(p).relative_to(root).as_posix() if root is not None else "/".join(Path(p).parts[-3:]) for p in files)
    for name, path in sorted(zip(named, map(Path, files))):
        size, digest = path.stat().st_size, sha256_file(path)
        h.update(f"{name}\t{size}\t{digest}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
