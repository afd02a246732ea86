"""Reading images from disk and turning them into model input.

One convention everywhere: images are uint8 RGB arrays (H, W, 3); gray files are replicated to
three channels, because the teacher was distilled from an RGB ImageNet network.

16-bit files (machine-vision cameras write 10-, 12- or 14-bit data in 16-bit PNG or TIFF) become
8 bits by dropping their lowest bits: `bits` - 8 of them, where `bits` is how many the data uses.
A 12-bit sensor's values (0..4095) kept as the top 8 of 16 bits would be 0..15, nearly black, so a
bundle records the bits its training images use (`uint16_bits`) and every reader of frames for
that bundle converts with it, in training and in production alike.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import ustudents

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _image_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def is_image_file(path: Path) -> bool:
    """An image file by its suffix, not hidden: '._x.png' (macOS metadata on a USB stick or share) and
    other dotfiles are skipped everywhere images are listed, not read as broken images."""
    return path.is_file() and _image_name(path)


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the fix."""


def refuse_broken_links(folder: Path, paths) -> None:
    """Refuse image files among `paths` that are symbolic links to nothing. Left out, they would make
    the set silently smaller: all of it where the images are links into a network share that is not
    mounted. The message names the first few (with where they point) and the count."""
    broken = sorted((p for p in paths if _image_name(p) and p.is_symlink() and not p.exists()), key=str)
    if broken:
        shown = ", ".join(f"{p.relative_to(folder)} -> {os.readlink(p)}" for p in broken[:3])
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise ImageError(f"{folder}: {len(broken)} image file(s) are symbolic links to nothing ({shown}{more}); "
                         "mount the share they point into or fix the links, or remove them")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (is_image_file), sorted by name; [] when it is no folder.
    An image link pointing to nothing is refused (refuse_broken_links), not skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = list(folder.iterdir())
    refuse_broken_links(folder, entries)
    return sorted((p for p in entries if is_image_file(p)), key=lambda p: p.name)


def images_in_subfolders(folder: Path) -> dict[str, int]:
    """How many image files each subfolder of `folder` holds (at any depth), by subfolder name;
    hidden subfolders are left out, as hidden files are."""
    counts = {}
    for sub in sorted(folder.iterdir(), key=lambda p: p.name):
        if sub.is_dir() and not sub.name.startswith("."):
            n = sum(1 for p in sub.rglob("*") if is_image_file(p))
            if n:
                counts[sub.name] = n
    return counts


def subfolder_hint(folder: Path) -> str:
    """' (its images are in subfolders a, b: ...)' for a folder whose images all lie a level down, else ''."""
    nested = images_in_subfolders(Path(folder)) if Path(folder).is_dir() else {}
    if not nested:
        return ""
    return (f" (its images are in subfolders: {', '.join(list(nested)[:3])}; images are read only directly in the "
            "folder given: give a subfolder, or move them up)")


def missing_folder_hint(folder: Path) -> str:
    """' (a symbolic link to X, which does not exist: ...)' for a link to nothing, ' (a file is there,
    not a folder)' for a file, ' (X/Good is there: ...)' for a name in another case, else ''."""
    folder = Path(folder)
    if folder.is_file():
        return " (a file is there, not a folder)"
    if folder.is_symlink() and not folder.exists():
        return f" (a symbolic link to {os.readlink(folder)}, which does not exist: mount the share it points into or fix the link)"
    try:
        case = [p for p in folder.parent.iterdir() if p.name.lower() == folder.name.lower() and p.name != folder.name]
    except OSError:  # no parent folder either
        case = []
    if case:
        return f" ({case[0]} is there: names are case-sensitive, rename it to {folder.name})"
    return ""


log = logging.getLogger(__name__)
UINT16_BITS = 16  # 16-bit data of unknown depth (and bundles from before uint16_bits): its top 8 bits
_told_of_dark_16_bit = False  # dark_16_bit_hint: once per process
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def _usual_suffix(folder: Path) -> str:
    """The commonest image suffix in `folder` (.png if it holds none): the glob to suggest for it."""
    try:
        found = Counter(f.suffix for f in folder.iterdir() if is_image_file(f))
    except OSError:
        found = Counter()
    return found.most_common(1)[0][0] if found else ".png"


def _read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: a folder, not an image; give image files (e.g. {path}/*{_usual_suffix(path)})")
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        return path.read_bytes()
    except PermissionError:
        raise ImageError(f"{path}: cannot be read (permission denied); fix its permissions") from None
    except OSError as err:  # e.g. EIO: a failing disk or a dropped network share
        raise ImageError(f"{path}: cannot be read ({err.strerror or err}); check the disk or share it is on") from None


# An image smaller than this on a side (a 1-pixel file, a 1 x 500 strip) is a fault, not a part:
# resized to the model's size it gets a confident verdict all the same (measured: "ok"), so it is refused.
MIN_IMAGE_SIDE = 16


def check_image_size(img: np.ndarray, source: str, what: str = "an image") -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ImageError(f"{source}: {what} of {w} x {h} pixels, under {MIN_IMAGE_SIDE} on a side: not an inspection "
                         "image (a camera or grabber fault, or a thumbnail?); give the full image or remove it")
    return img


def read_image(path: str | Path, bits: int | None = UINT16_BITS, dark_hint: bool = True,
               inspection: bool = True) -> np.ndarray:
    """Read a PNG/JPEG/... file as uint8 RGB (H, W, 3); 16-bit data holding `bits` bits (module
    docstring; None: the bits this file uses, for pictures). An inspection image under MIN_IMAGE_SIDE on
    a side is refused; `inspection=False` (a teacher's photos, which have their own size rule) reads it.
    `dark_hint`: as decode_image."""
    img = decode_image(_read_bytes(path), str(path), bits, dark_hint)
    return check_image_size(img, str(path)) if inspection else img


def without_colour_profile(data: bytes) -> bytes:
    """A PNG's bytes without its iCCP chunk (the colour profile), else `data` itself. OpenCV ignores
    the profile, but libpng checks it, and on a faulty one ("iCCP: known incorrect sRGB profile", common
    from image editors; "invalid rendering intent") prints a warning straight to stderr: a line outside
    the logs for every such frame a worker decodes. The pixels are the same without it."""
    view = memoryview(data).cast("B")  # a frame's bytes are not copied to look at its chunk headers
    if bytes(view[:8]) != PNG_SIGNATURE:
        return data
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(view):  # chunks: length, type, data, CRC; the profile comes before the pixels
        length = int.from_bytes(view[at:at + 4], "big")
        kind = bytes(view[at + 4:at + 8])
        end = at + 12 + length
        if kind == b"iCCP":
            return bytes(view[:at]) + bytes(view[end:])
        if kind in (b"IDAT", b"IEND"):
            break
        at = end
    return data


# A JPEG, PNG or WebP is turned as its EXIF orientation says, as every viewer and labelling tool shows
# it: read as stored (IMREAD_UNCHANGED ignores the tag), a phone's or camera's rotated picture lay across
# the mask drawn on it, and evaluation scored the misplaced map in silence. These flags keep 16 bits and
# grey and drop alpha, as decode_image does (same pixels); TIFF and BMP are read unchanged, and so are
# PNG and WebP masks, whose alpha may hold the defect (read_mask).
ORIENTED_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def is_webp(head: bytes) -> bool:
    """Whether bytes start as a WebP file: RIFF, a size, then WEBP."""
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _oriented_format(head: bytes, keep_alpha: bool) -> bool:
    if head.startswith(JPEG_MAGIC):  # no alpha to keep
        return True
    return not keep_alpha and (head.startswith(PNG_SIGNATURE) or is_webp(head))


def _imdecode(data, source: str, keep_alpha: bool = False) -> np.ndarray | None:
    """cv2.imdecode of encoded bytes (any buffer): IMREAD_UNCHANGED, but a JPEG, and unless `keep_alpha`
    a PNG or WebP, turned upright by its EXIF orientation (ORIENTED_FLAGS); None where OpenCV cannot
    decode it. OpenCV raises, rather than returning None, where the header claims a size past its
    limits: a damaged file, mostly."""
    head = bytes(memoryview(data).cast("B")[:12])
    flags = ORIENTED_FLAGS if _oriented_format(head, keep_alpha) else cv2.IMREAD_UNCHANGED
    try:
        return cv2.imdecode(np.frombuffer(without_colour_profile(data), np.uint8), flags)
    except cv2.error as err:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(err):
            limit = "the" if ustudents.OPENCV_MAX_PIXELS is None else f"{ustudents.OPENCV_MAX_PIXELS:,}"
            raise ImageError(f"{source}: more than {limit} "
                             "pixels, the most OpenCV is set to decode; a real image this large needs "
                             "OPENCV_IO_MAX_IMAGE_PIXELS raised") from None
        if "CV_IO_MAX_IMAGE_WIDTH" in str(err) or "CV_IO_MAX_IMAGE_HEIGHT" in str(err):
            raise ImageError(f"{source}: its header claims a width or height over OpenCV's limit (1,048,576 "
                             "pixels a side): a damaged file? Replace or remove it") from None
        return None


def tiff_bits_per_sample(data) -> int | None:
    """BitsPerSample (tag 258) of a classic TIFF's first image, None for anything else (BigTIFF too)."""
    head = bytes(memoryview(data).cast("B")[:8])
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(head[:4])
    if order is None or len(data) < 8:
        return None
    raw = bytes(memoryview(data).cast("B"))
    (ifd,) = struct.unpack(order + "I", head[4:8])
    if ifd + 2 > len(raw):
        return None
    (count,) = struct.unpack(order + "H", raw[ifd:ifd + 2])
    for i in range(count):
        entry = raw[ifd + 2 + 12 * i:ifd + 14 + 12 * i]
        if len(entry) < 12:
            return None
        tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        if tag == 258 and kind == 3:  # SHORTs: inline when they fit 4 bytes, else at an offset
            at = ifd + 10 + 12 * i if n <= 2 else struct.unpack(order + "I", entry[8:12])[0]
            return struct.unpack(order + "H", raw[at:at + 2])[0] if at + 2 <= len(raw) else None
    return None


# TIFF in either byte order, then BigTIFF (a camera's files over 4 GiB; OpenCV reads both)
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def tiff_stack_page(data) -> np.ndarray | None:
    """A TIFF's second page (OpenCV reads the first alone, skipping to the second without decoding
    it: about 0.1 ms), None for a one-page TIFF or any other format."""
    if bytes(memoryview(data).cast("B")[:4]) not in TIFF_MAGICS:
        return None
    try:
        found, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED, None, (1, 2))
    except cv2.error:
        return None
    return pages[0] if found and pages else None


def _decode_unchanged(data: bytes, source: str) -> np.ndarray:
    if len(data) == 0:
        raise ImageError(f"{source}: empty (0 bytes); replace it with a valid PNG or JPEG image")
    img = _imdecode(data, source)
    if img is None or img.size == 0:
        raise ImageError(f"{source}: cannot be decoded as an image (PNG, JPEG, BMP, TIFF or WebP); replace or remove it")
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{source}: {img.dtype} pixels; save it as an 8- or 16-bit integer image")
    if img.dtype == np.uint8 and tiff_bits_per_sample(data) == 16:
        # OpenCV reads a 16-bit TIFF it has no 16-bit path for (grey with alpha, two samples a pixel)
        # through an 8-bit fallback: a 12-bit frame came out 16 times darker, judged on that, in silence
        raise ImageError(f"{source}: a 16-bit TIFF OpenCV reads at 8 bits only (grey with an alpha channel, or "
                         "another layout of samples); save it as 16-bit grey or RGB, without alpha, or as PNG")
    # a stack of pages of one size (exposures, colour planes, frames) was judged by its first alone, in
    # silence; a page of another size is a thumbnail or preview, and the first is the image
    if (page := tiff_stack_page(data)) is not None and page.shape[:2] == img.shape[:2]:
        raise ImageError(f"{source}: a TIFF holding more than one page of {img.shape[1]} x {img.shape[0]} pixels (a "
                         "stack of exposures, planes or frames); ustudents judges one image per file: save or send "
                         "each page as an image of its own")
    return img


def _bits_used(img: np.ndarray) -> int:
    """The bits a uint16 image's values use, at least 8."""
    return max(8, int(img.max()).bit_length())


def uint16_bits_of(path: str | Path) -> int | None:
    """How many bits a 16-bit image file's data uses (at least 8), from its largest value; None for
    an 8-bit file. An 8-bit PNG says so in its header: it is not decoded."""
    data = _read_bytes(path)
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 24 and data[24] <= 8:
        return None  # IHDR's bit depth byte
    img = _decode_unchanged(data, str(path))
    return _bits_used(img) if img.dtype == np.uint16 else None


def to_8_bit(img: np.ndarray, bits: int) -> np.ndarray:
    """uint16 pixels holding `bits` bits (8..16; a model's: engine.bundle.uint16_bits) as uint8, by
    dropping the lowest bits - 8; values beyond `bits` saturate at 255. For 16-bit frames a camera SDK
    hands over as arrays; decode_image does the same for encoded ones."""
    check_bits(bits)
    if np.asarray(img).dtype != np.uint16:
        raise ImageError(f"to_8_bit: {np.asarray(img).dtype} pixels; it converts uint16 ones")
    return np.minimum(np.asarray(img) >> (bits - 8), 255).astype(np.uint8)


def check_bits(bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 8 <= bits <= 16:
        raise ValueError(f"bits {bits!r}: the bits a 16-bit image's data holds are a whole number from 8 to 16")


def decode_image(data: bytes, source: str = "<bytes>", bits: int | None = UINT16_BITS,
                 dark_hint: bool = True) -> np.ndarray:
    """Decode encoded image bytes as uint8 RGB (H, W, 3). 16-bit data is taken to hold `bits` bits
    (8..16; None: as many as this image uses, for pictures only, never for a model's input) and
    scaled to 8 by to_8_bit. `dark_hint`: where `bits` is a model's, dark_16_bit_hint on data that
    uses far fewer; off while training, where no model exists yet."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image: {type(data).__name__} given, where the encoded image's bytes go")
    if bits is not None:
        check_bits(bits)
    img = _decode_unchanged(data, source)
    if img.dtype == np.uint16:
        bits = _bits_used(img) if bits is None else bits
        if dark_hint:
            dark_16_bit_hint(img, bits, source)
        img = to_8_bit(img, bits)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def dark_16_bit_hint(img: np.ndarray, bits: int, source: str) -> None:
    """A 12-bit camera's frames given to a model that reads 16 bits (one trained on 8-bit images)
    come out 16 times darker and score as anomalies: say so once, with the fix, in the log."""
    global _told_of_dark_16_bit
    if _told_of_dark_16_bit or bits != UINT16_BITS:
        return
    used = _bits_used(img)
    if used <= bits - 3:
        _told_of_dark_16_bit = True
        log.warning("%s: 16-bit data using %d bits, read with the model's %d, so it looks %dx darker than it is; "
                    "if the camera changed, recalibrate on its frames (ustudents calibrate MODEL --images DIR --out COPY: "
                    "the copy then reads %d bits)", source, used, bits, 1 << (bits - used), used)


def first_copy(images) -> tuple[int, int] | None:
    """(i, j), i < j, where images[j] is the same picture as images[i], pixel for pixel (the first such
    j); None if none is. Blank frames (one flat colour) are alike by nature and left out."""
    seen: dict[bytes, int] = {}
    for j, img in enumerate(images):
        if img.min() == img.max():
            continue
        key = hashlib.sha256(np.ascontiguousarray(img).tobytes()).digest()
        if key in seen:
            return seen[key], j
        seen[key] = j
    return None


# The first bytes of each format in IMAGE_SUFFIXES (WebP: RIFF, a size, then WEBP)
IMAGE_MAGICS = (b"\x89PNG\r\n\x1a\n", JPEG_MAGIC, b"BM") + TIFF_MAGICS


def looks_like_image(data: bytes) -> bool:
    """Whether `data` starts as an image file of a format ustudents reads (not whether it decodes)."""
    return data.startswith(IMAGE_MAGICS) or is_webp(data)
JPEG_MASK_LEVEL = 128  # lossy masks: a defect pixel is one at least this bright (see read_mask)


PHOTO_GREY_SHARE = 0.25  # a mask with more of its pixels at grey levels than this is taken for a photograph
PHOTO_LEVELS = 16       # ... if it has more distinct levels than this (a label mask 0, 1, 2, 3 has few)


def _refuse_photo(value: np.ndarray, path: Path, lossy: bool) -> None:
    """A test image copied as its mask (or a screenshot, a heatmap) would be read as all defect, which
    ruins its type's pixel metrics: refused. A mask is background with defects at one level; other levels
    lie only on its edges (anti-aliasing, resizing): at most 3% of the pixels of any magnetic_tile
    mask, against nearly all of a photograph's. In a JPEG, whose ringing shifts the levels near every
    edge, only values in the middle three quarters between the darkest and brightest count."""
    lo, hi = float(value.min()), float(value.max())
    if hi <= lo:
        return
    margin = (hi - lo) / 8 if lossy else 0.0
    grey = float(((value > lo + margin) & (value < hi - margin)).mean())
    if grey > PHOTO_GREY_SHARE and len(np.unique(value)) > PHOTO_LEVELS:
        raise ImageError(f"{path}: {grey:.0%} of its pixels are grey levels between its darkest and brightest, as in "
                         "a photograph, not a defect mask (0 = background, nonzero = defect): is it a copy of the "
                         "image? Replace it with the defect's mask, e.g. a PNG of 0 and 255")


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W): nonzero = defect; in a JPEG file, >= JPEG_MASK_LEVEL."""
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    # cv2.imdecode raises (rather than returning None) on an empty buffer: a zero-byte file.
    # Unchanged, not gray: OpenCV's gray conversion keeps a 16-bit mask's top 8 bits, so 0/255 in a
    # 16-bit file read as empty. Any nonzero value in a colour channel marks a defect pixel; alpha does only
    # where every colour channel is black.
    img = _imdecode(data, str(path), keep_alpha=True) if data is not None and data.size else None
    if img is None or img.size == 0:
        raise ImageError(f"{path}: cannot be read as a mask image; replace it with a PNG mask")
    # JPEG rings around every edge of a 0/255 mask: "nonzero" grows each defect, while the half level
    # gives back the drawn mask (tests/test_dataset.py). Told by the file's bytes, not its suffix.
    colour = img[:, :, : 3 if img.shape[2] >= 3 else 1] if img.ndim == 3 else img[:, :, None]
    lossy = data[:3].tobytes() == JPEG_MAGIC
    _refuse_photo(colour.max(axis=2), path, lossy)
    # float TIFF masks with soft values in (0, 1) count by the nonzero rule too
    mask = (colour >= JPEG_MASK_LEVEL).any(axis=2) if lossy else (colour > 0).any(axis=2)
    if not mask.any() and img.ndim == 3 and img.shape[2] == 4 and img[:, :, 3].min() < img[:, :, 3].max():
        # black everywhere, the defect drawn in transparency (a painting tool's layer exported as is): the
        # alpha channel is the mask, where it was read as an empty one and the defect scored as good
        mask = img[:, :, 3] > img[:, :, 3].min()
    if mask.all():  # an all-white file: every pixel a defect, and the type's pixel metrics meaningless
        raise ImageError(f"{path}: every pixel is marked defect (an all-white file?); a mask marks the defect's pixels "
                         "only, 0 elsewhere")
    return mask


def checked_frame(frame: np.ndarray, source: str = "frame") -> np.ndarray:
    """`frame` as an array where an engine reads it as it is meant: uint8 (H, W), (H, W, 1) or (H, W, 3)
    RGB, at least MIN_IMAGE_SIDE on a side; else ImageError saying what it is and what to do."""
    arr = np.asarray(frame)
    if arr.dtype == np.uint16:
        raise ImageError(f"{source}: dtype uint16 and shape {arr.shape}: engines take 8-bit frames; convert with "
                         "images.to_8_bit(frame, engine.bundle.uint16_bits), or decode 16-bit files with decode_image "
                         "/ read_image and bits=engine.bundle.uint16_bits, as the worker does")
    if arr.ndim == 3 and arr.shape[2] == 4:  # OpenCV and most camera SDKs give BGRA, others RGBA: not guessed
        raise ImageError(f"{source}: 4 channels, shape {arr.shape}, whose order (BGRA or RGBA) cannot be told; convert "
                         "it to RGB first, e.g. cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB) or cv2.COLOR_RGBA2RGB")
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)) \
            or arr.size == 0:
        raise ImageError(f"{source}: dtype {arr.dtype} and shape {arr.shape}: expected a non-empty uint8 image "
                         "(H, W) gray or (H, W, 3) RGB, as decode_image returns")
    check_image_size(arr, source, "a frame")
    return arr


def frame_tensor(frame: np.ndarray, source: str = "frame") -> torch.Tensor:
    """A decoded camera frame (checked_frame) as uint8 RGB (3, H, W); `source` names it in errors."""
    arr = checked_frame(frame, source)
    # a read-only buffer (np.frombuffer over a camera's memory) is copied: torch warns of undefined
    # behaviour on one it wraps, though nothing here writes the frame
    arr = np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()
    t = torch.from_numpy(arr)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.expand(3, -1, -1) if t.shape[0] == 1 else t


def resize_tensor(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize float (N, C, H, W) to `size` (a square side or (h, w)): bilinear with antialiasing,
    so shrinking averages like area interpolation. The one resize used everywhere (training,
    calibration, every engine, on whatever device holds the tensor), so that scores measured in
    calibration hold in production."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size) uint8 with `resize_tensor`."""
    x = resize_tensor(frame_tensor(image)[None].float(), size)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def defect_regions(mask: np.ndarray) -> np.ndarray:
    """A bool mask (H, W) -> int32 (H, W): 0 where it is False, else the number (1, 2, ...) of the
    pixel's 8-connected region (MVTec AD's regions of PRO)."""
    return cv2.connectedComponents(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=8, ltype=cv2.CV_32S)[1]


def resize_regions(regions: np.ndarray, size: int) -> np.ndarray:
    """Region numbers (H, W) int32 -> (size, size), nearest: each pixel keeps one region's number.
    A region that nearest keeps no pixel of (a speck smaller than a pixel at `size`) gets the pixel
    it covers most, unless that is the last pixel of another: PRO counts every region, as MVTec AD
    defines it, and the map over a speck, upsampled to the mask's size, is about that pixel's value.
    Nearest at pixel centres (INTER_NEAREST_EXACT), as the images are resized (align_corners=False):
    OpenCV's INTER_NEAREST takes each block's first pixel, which put the ground truth (s - 1) / 2
    source pixels off the image (0.375 model pixels at 1024 -> 256)."""
    if regions.shape == (size, size):
        return regions
    out = cv2.resize(regions, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    count = np.bincount(out.ravel(), minlength=int(regions.max()) + 1)
    for r in np.flatnonzero(count[1:] == 0) + 1:
        cover = cv2.resize((regions == r).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        cover[count[out] == 1] = 0  # another region's only pixel
        if cover.max() > 0:  # else every pixel it touches is some other speck's only one
            y, x = np.unravel_index(int(np.argmax(cover)), cover.shape)
            count[out[y, x]] -= 1
            out[y, x], count[r] = r, 1
    return out


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    arr = np.ascontiguousarray(np.stack(images) if isinstance(images, list) else images)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
