"""`ustudents results`: follow `<stream>:results` and `<stream>:dead`, one line per frame, and
optionally save each frame's mask and an overlay picture."""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import redis

from ustudents.engines.files import write_atomically
from ustudents.engines.images import decode_image, is_image_file

from . import codec, schema
from .connection import Backoff, through_outages
from .streams import id_key, replies


def last_id(client: redis.Redis, key: str) -> str:
    """The id of the newest entry of `key`, '0-0' if it has none: start here to see only new ones."""
    try:
        return client.xinfo_stream(key)["last-generated-id"].decode()
    except redis.ResponseError:  # no such key yet
        return "0-0"


class SaveFailed(Exception):
    """A picture `--save` could not write: the disk's fault, not Redis' nor the entry's."""


ENTRY_ID = re.compile(r"\d+-\d+")


def is_entry_id(text: str) -> bool:
    """Whether Redis reads `text` as a stream entry id: two numbers below 2^64 (a longer one it refuses)."""
    return bool(ENTRY_ID.fullmatch(text)) and all(int(part) < 2 ** 64 for part in text.split("-"))


class BadResult(ValueError):
    """A result entry missing a field, or holding one that is not what a worker writes (a hand-written
    or foreign entry): said on its line and passed over, so that it does not stop the follower, nor
    stop it again at every --from-start."""


def describe(fields: dict[str, bytes], dead: bool, own_id: str) -> str:
    """The line printed for one result or dead letter (`own_id`: its id in its stream, which names it
    where it has neither frame_id nor entry_id); BadResult if a result's numbers are not finite numbers."""
    get = lambda k: fields.get(k, b"").decode("utf-8", "replace")  # noqa: E731
    frame = get(schema.FRAME_ID) or get(schema.ENTRY_ID) or own_id  # a line with no name began with a tab
    if dead:
        return f"{frame}\tDEAD {get(schema.REASON)}: {get(schema.ERROR)}"

    def number(key: str) -> float:
        try:
            value = float(get(key))
        except ValueError:
            raise BadResult(f"its {key} field is {get(key)[:40]!r}, not a number" if key in fields else
                            f"it has no {key} field") from None
        if not math.isfinite(value):  # a NaN score with anomalous 0 printed "ok": no verdict was made
            raise BadResult(f"its {key} field is {get(key)[:40]!r}, not a finite number")
        return value
    verdict = "ANOMALOUS" if get(schema.ANOMALOUS) == "1" else "ok"
    return (f"{frame}\tscore {number(schema.SCORE):.3f}\t{verdict}\tthreshold {number(schema.THRESHOLD):.3f}"
            f"\t{number(schema.LATENCY_MS):.1f} ms\t{get(schema.MODEL)}")


def passed_over(key: str, entry_id: str, err: BadResult) -> str:
    """The line of a result entry that cannot be read."""
    return f"{entry_id}\tNOT READ: {key} entry {entry_id}: {err}; passed over (not written by a ustudents worker?)"


SAFE_NAME_MAX = 100  # file systems allow 255 bytes a name; the entry id and the endings follow it


def safe_name(frame_id: str) -> str:
    """`frame_id` as a file name: other characters than [A-Za-z0-9._-] made `_`, and a long id cut to
    SAFE_NAME_MAX characters with a digest of the whole, so that ids sharing a long start stay apart."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", frame_id) or "frame"
    if len(name) <= SAFE_NAME_MAX:
        return name
    return f"{name[:SAFE_NAME_MAX - 9]}~{hashlib.blake2b(frame_id.encode(), digest_size=4).hexdigest()}"


def mask_overlay(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The frame with anomalous pixels tinted red and the mask outlined."""
    out = np.ascontiguousarray(frame).copy()
    red = np.zeros_like(out)
    red[..., 0] = 255
    # blended in uint8 by OpenCV, as engines.overlay does: numpy's float64 took 24 bytes a masked pixel
    # a step, gigabytes for a frame of tens of megapixels flagged all over
    np.copyto(out, cv2.addWeighted(out, 0.5, red, 0.5, 0.0), where=mask[..., None])
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 0, 0), 1)
    return out


def input_frame(client: redis.Redis, stream: str, entry_id: str) -> np.ndarray | str:
    """The decoded input frame of a result, or why there is none to draw the overlay on."""
    found = client.xrange(stream, entry_id, entry_id, count=1)
    if not found:
        return "the input frame has left the stream"
    fields = found[0][1]
    data = fields.get(schema.IMAGE.encode())
    if data is None and schema.IMAGE_KEY.encode() in fields:
        data = client.get(fields[schema.IMAGE_KEY.encode()])
        if not data:
            return "the input frame's image_key has expired"
    if not data:
        return "the input entry holds no image"
    try:
        return codec.decode(data, entry_id, uint16_bits=None)  # a picture: its own range
    except ValueError as err:  # all of these were said as "left the stream"
        return f"the input frame does not decode ({str(err).strip().splitlines()[-1]})"


SAVED_NAME = re.compile(r".+_\d+-\d+_(mask|overlay)\.png")  # save's: <frame>_<entry id>_<kind>.png


def check_save_folder(folder: Path) -> None:
    """ValueError where `folder` holds images that `save` did not write: masks and overlays put beside a
    user's images mix with them, and in a dataset's folder are read as its images (trained on as good
    parts from train/good; in test/<type>, asked for masks of their own). Its own accumulate. A folder inside a
    dataset is refused even empty, as `predict --out` is: under test/ it became a defect type without masks."""
    from ustudents.train.dataset import refuse_inside

    refuse_inside(folder, "--save", "a --save folder")
    theirs = sorted(f.name for f in (folder.iterdir() if folder.is_dir() else ())
                    if is_image_file(f) and not SAVED_NAME.fullmatch(f.name))
    if theirs:
        shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
        raise ValueError(f"--save {folder}: holds images that `ustudents results` did not write ({shown}); masks and "
                         "overlays written beside them would mix with them (in a dataset's folder, be read as its "
                         "images); give an empty folder or one that results --save wrote")


def picture(fields: dict[str, bytes], key: str) -> np.ndarray:
    """The image in field `key`, decoded; BadResult where it is missing or no image: its bytes are not
    written to a .png that no viewer opens."""
    if key not in fields:
        raise BadResult(f"it has no {key} field")
    try:  # not codec.decode: a picture has no frame's least size
        return decode_image(fields[key], f"its {key} field", bits=None)
    except (ValueError, cv2.error) as err:  # ImageError: not an image
        raise BadResult(str(err).strip().splitlines()[-1]) from None


def save(client: redis.Redis, stream: str, fields: dict[str, bytes], folder: Path) -> str:
    """Write <frame>_<entry>_mask.png and <frame>_<entry>_overlay.png; returns what was written, for the
    line. The input entry's id makes the names unique: two cameras, or a folder published twice, send
    the same frame ids, and safe_name may map two ids to one name. BadResult, with nothing written,
    for an entry without an entry_id or with a mask or heatmap that is no image."""
    if schema.ENTRY_ID not in fields:
        raise BadResult(f"it has no {schema.ENTRY_ID} field")
    entry_id = fields[schema.ENTRY_ID].decode("utf-8", "replace")
    if not is_entry_id(entry_id):  # Redis refuses to read such an id, which ended the follower
        raise BadResult(f"its {schema.ENTRY_ID} {entry_id!r} is not a stream entry id (like 1700000000000-0)")
    mask = picture(fields, schema.MASK)[:, :, 0] > 0
    if schema.HEATMAP in fields:
        picture(fields, schema.HEATMAP)
    frame_id = (fields.get(schema.FRAME_ID) or fields[schema.ENTRY_ID]).decode("utf-8", "replace")
    stem = f"{safe_name(frame_id)}_{safe_name(entry_id)}"
    mask_file = folder / f"{stem}_mask.png"
    write(mask_file, fields[schema.MASK])
    overlay_file = folder / f"{stem}_overlay.png"
    if schema.HEATMAP in fields:
        write(overlay_file, fields[schema.HEATMAP])
        return f"mask {mask_file}, overlay {overlay_file}"
    frame = input_frame(client, stream, entry_id)
    if isinstance(frame, str):
        return f"mask {mask_file} (no overlay: {frame})"
    if frame.shape[:2] != mask.shape:  # a producer's image_key written over by a later frame of another size
        return (f"mask {mask_file} (no overlay: the input frame is now {frame.shape[1]}x{frame.shape[0]}, the mask "
                f"{mask.shape[1]}x{mask.shape[0]}: its image_key was written over by another frame)")
    write(overlay_file, codec.png(mask_overlay(frame, mask)))
    return f"mask {mask_file}, overlay {overlay_file}"


def write(path: Path, data: bytes) -> None:
    """write_atomically, a failure SaveFailed: an OSError is taken for Redis being away (through_outages),
    and a folder gone or a full disk had the follower wait for a Redis that was there, printing nothing."""
    try:
        write_atomically(path, data)
    except OSError as err:
        raise SaveFailed(f"--save {path.parent}: cannot write {path.name} there ({err.strerror or err}); the results "
                         "printed before it are saved: free space on that disk or make the folder again, and follow "
                         "again (with --from-start, pictures saved already are written again alike)") from None


READ_COUNT = 100  # entries read of each stream at a time


def input_order(raw: dict[bytes, bytes]) -> tuple[int, int]:
    """Where a result's or dead letter's input entry stands in the input stream (its entry_id); last
    where it has none that is an entry id (a foreign entry)."""
    value = raw.get(schema.ENTRY_ID.encode(), b"")
    text = value.decode("utf-8", "replace")
    return id_key(text) if is_entry_id(text) else (2 ** 64, 0)


def follow(client: redis.Redis, stream: str, echo: Callable[[str], None], *, from_start: bool = False,
           count: int = 0, save_to: Path | None = None, block_ms: int = 1000,
           outage: Callable[[str], None] = lambda line: None) -> int:
    """Print one line per result and dead letter as they arrive (only new ones unless
    `from_start`); stop after `count` lines (0: never). Returns the number of lines. While Redis is
    unreachable it waits and says so through `outage`, then goes on after the last line it printed
    (saving too, where the input frame is read for an overlay): a follower on a line's screen
    outlives a Redis restart, as the worker and `publish` do. An entry that cannot be read gets a
    line saying so (passed_over) and counts as one."""
    keys = {schema.results_stream(stream): False, schema.dead_stream(stream): True}
    ids = {k: ("0-0" if from_start else last_id(client, k)) for k in keys}
    if save_to is not None:
        save_to.mkdir(parents=True, exist_ok=True)
    n, backoff = 0, Backoff()
    while not count or n < count:
        read, waited = through_outages(lambda: replies(client.xread(ids, count=READ_COUNT, block=block_ms)), outage,
                                       backoff, "following again once it is back", "following on")
        if waited:
            backoff.reset()
        # One line per frame in the order the workers wrote them, across both streams (printed stream by
        # stream, a read's results came before all its dead letters, and --count could end the run before
        # dead letters written between them): by the millisecond written, and within one (a batch's
        # outcomes, written at once) by their input entries. A stream that filled its page may hold more
        # of a later millisecond than the other's: those wait for the next read, unless a whole page is
        # of one millisecond (more than READ_COUNT outcomes in it), which is then printed as it is.
        merged, page_ends = [], []
        for key, entries in read:
            merged += [((id_key(eid.decode())[0], input_order(raw), id_key(eid.decode())[1], key.decode()), eid, raw)
                       for eid, raw in entries]
            if len(entries) == READ_COUNT:
                page_ends.append(id_key(entries[-1][0].decode())[0])
        merged.sort(key=lambda m: m[0])
        if page_ends and merged[0][0][0] < min(page_ends):
            merged = [m for m in merged if m[0][0] < min(page_ends)]
        for (_, _, _, key), eid, raw in merged:
            ids[key] = eid.decode()
            fields = schema.decode_fields(raw)
            try:
                line = describe(fields, dead=keys[key], own_id=ids[key])
                if save_to is not None and not keys[key]:
                    saved, waited = through_outages(lambda: save(client, stream, fields, save_to), outage, backoff,
                                                    "saving again once it is back", "saving on")
                    if waited:
                        backoff.reset()
                    line += "\t" + saved
            except BadResult as err:
                line = passed_over(key, ids[key], err)
            echo(line)
            n += 1
            if count and n >= count:
                return n
    return n
