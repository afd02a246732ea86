"""`ustudents publish`: a camera stand-in writing frames to a stream as the worker expects them.

Frames come from an image folder (the files' bytes as they are), a video file or a camera index
(OpenCV; each frame encoded as PNG or JPEG). Frames larger than `inline_max` bytes go under a key
of their own with a TTL and the entry names it in `image_key`; SET and XADD share one MULTI/EXEC so
an entry never names a key that was not written.

Redis going away or refusing for now (a failover, its memory cap) does not end a run: the frame in
hand is held and sent again with backoff until Redis takes it, then publishing resumes at the set
rate (the schedule starts again rather than bursting the frames the outage cost). At the memory cap
it makes room by trimming the entries every consumer group has finished with (make_room). A frame
whose XADD reached Redis but whose reply was lost is sent twice: two entries, one frame_id.

A frame larger than Redis takes in one value (proto-max-bulk-len) is named and passed over.

Redis keeps what is published after the workers are done with it (XACK deletes nothing): the last
`maxlen` entries, and each frame under its own key for `key_ttl_s`. retention_warning says at the
first frame when that is more than Redis' memory cap.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import cv2
import redis

from ustudents.engines.images import IMAGE_SUFFIXES, image_files, looks_like_image, subfolder_hint

from . import schema
from .connection import Backoff, through_outages
from .streams import id_key, text_of

MB = 1 << 20
REDIS_BULK_DEFAULT = 512 * MB  # Redis' proto-max-bulk-len unless its config says otherwise


def frames_from(source: str, fmt: str = "png", loop: bool = False, warn: Callable[[str], None] = print,
                max_bytes: Callable[[], int] | None = None) -> Iterator[tuple[str, bytes]]:
    """(frame_id, encoded bytes) from a folder of images, one image, a video file or a camera
    index. Raises ValueError at once when the source cannot be used; `warn` hears of a video that
    ends before the frame count its header gives (a truncated or damaged file). `max_bytes`, asked
    once at the first frame: image files larger are named and passed over unread."""
    path = Path(source)
    if source.isdigit() and not path.exists():
        return _capture(_open(int(source), f"camera {source}: cannot be opened; check the index (0, 1, ...) and "
                                           "that no other program holds it"), f"camera{source}", fmt, loop=False,
                        camera=source)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise ValueError(f"{path}: no images ({'/'.join(IMAGE_SUFFIXES)}){subfolder_hint(path)}; give a folder "
                             "of frames, a video file or a camera index")
        return _files(files, loop, warn, max_bytes)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return _files([path], loop, warn, max_bytes)
    if path.is_file():
        return _capture(_open(str(path), f"{path}: cannot be opened as a video; give a video OpenCV reads "
                                         "(e.g. .mp4, .avi)"), path.stem, fmt, loop, warn=warn, source=str(path))
    raise ValueError(f"{source}: no such folder, image, video file or camera index")


def _files(files: list[Path], loop: bool, warn: Callable[[str], None],
           max_bytes: Callable[[], int] | None) -> Iterator[tuple[str, bytes]]:
    """The files' bytes; one that cannot be read (moved away by a grabber's rotation meanwhile) or is
    larger than Redis takes is named (once) and passed over, and a pass that sends none ends the run.
    A file too large is not read: a 600 MB file was read in whole on every pass of --loop, and a sparse
    one was said to be "sent as it is" on the line before the one that passed it over."""
    n, unread, too_large = 0, set(), set()
    largest = max_bytes() if max_bytes else None
    while True:
        sent, gone = 0, set()
        for f in files:
            try:
                if largest is not None and (size := f.stat().st_size) > largest:
                    if f not in too_large:
                        too_large.add(f)
                        warn(larger_than_redis_takes(str(f), size, largest))
                    continue
                data = f.read_bytes()
            except OSError as err:
                if isinstance(err, FileNotFoundError):
                    gone.add(f)
                if f not in unread:
                    unread.add(f)
                    warn(f"{f}: cannot be read ({err.strerror or err}); passed over")
                continue
            if n == 0 and not data:
                warn(f"{f}: an empty file; sent as it is, so the worker dead-letters it (empty)")
            elif n == 0 and not looks_like_image(data):  # sent all the same: a camera's bad frame is a case to test
                warn(f"{f}: not an image file by its first bytes; sent as it is, so the worker dead-letters it "
                     "(decode_error)")
            sent += 1
            yield (f.stem if n == 0 else f"{f.stem}-{n}"), data
        if not sent:  # "moved or deleted?" only where they are gone: not for I/O errors or read permission
            what = ("could be read any more (moved or deleted?)" if gone >= set(files) else
                    f"could be {'sent' if too_large else 'read'} (the lines above say why)")
            raise ValueError(f"{files[0].parent}: none of its {len(files)} image files {what}; check the folder")
        n += 1
        if not loop:
            return


def _open(source: int | str, error: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise ValueError(error)
    return cap


def _capture(cap: cv2.VideoCapture, name: str, fmt: str, loop: bool, warn: Callable[[str], None] = print,
             source: str = "", camera: str | None = None) -> Iterator[tuple[str, bytes]]:
    """Frames of a video file (`source`) or a camera (`camera`: its index): a camera has no end,
    so one that stops delivering frames (unplugged, its driver gone) ends the run with an error."""
    index, rewound, in_pass = 0, False, 0
    announced = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if source else 0  # a file's header; cameras: 0 or -1
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                if camera is not None:
                    raise ValueError(f"camera {camera}: stopped delivering frames after {index} (unplugged, its "
                                     "driver or power gone?); check the camera and publish again")
                if in_pass < announced:
                    warn(f"{source}: the video ended after {in_pass} of the {announced} frames its header gives; "
                         "the file is truncated or damaged")
                    announced = 0  # once, not on every loop
                if loop and index and not rewound and cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
                    rewound, in_pass = True, 0
                    continue
                return
            rewound = False
            in_pass += 1
            ok, buf = cv2.imencode(f".{fmt}", bgr)
            if ok:
                yield f"{name}-{index:06d}", buf.tobytes()
            index += 1
    finally:
        cap.release()


class FramePublisher:
    def __init__(self, client: redis.Redis, stream: str, *, camera: str, category: str | None = None,
                 maxlen: int = 10_000, inline_max: int = 1 << 20, key_ttl_s: int = 3600):
        self.r, self.stream, self.camera, self.category = client, stream, camera, category
        self.maxlen, self.inline_max, self.key_ttl_s = maxlen or None, inline_max, key_ttl_s
        self.sent = 0  # entries written: what publish() has done when Ctrl-C leaves it without a return

    def send(self, frame_id: str, data: bytes, ts: float | None = None) -> str:
        """XADD one frame; returns the entry id. Names from file names go as their bytes: one that is
        not UTF-8 (a Latin-1 share) is the producer's id all the same (fsencode undoes the surrogates
        Python reads it with)."""
        fields: dict[str, str | bytes] = {schema.FRAME_ID: os.fsencode(frame_id), schema.CAMERA: os.fsencode(self.camera),
                                          schema.TS: repr(time.time() if ts is None else ts)}
        if self.category:
            fields[schema.CATEGORY] = self.category
        if len(data) <= self.inline_max:
            fields[schema.IMAGE] = data
            entry_id = self.r.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        else:
            key = f"{self.stream}:frame:{uuid.uuid4().hex}"
            fields[schema.IMAGE_KEY] = key
            with self.r.pipeline(transaction=True) as pipe:
                pipe.set(key, data, ex=self.key_ttl_s)
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
                entry_id = pipe.execute()[1]
        self.sent += 1
        return entry_id.decode()

    def largest_frame(self) -> int:
        """The most bytes Redis takes in one value (proto-max-bulk-len). Redis answers a larger one by
        closing the connection, which looks like an outage: such a frame was sent again forever and
        held up the line. Redis' default where the config may not be read (an ACL, a managed Redis)."""
        try:
            return int(self.r.config_get("proto-max-bulk-len").get("proto-max-bulk-len", REDIS_BULK_DEFAULT))
        except (redis.RedisError, ValueError):
            return REDIS_BULK_DEFAULT

    def make_room(self) -> int:
        """At Redis' memory cap under noeviction no XADD goes through, and with it no MAXLEN trimming:
        the line would stop for frames the workers are done with. Trims the entries every consumer
        group of the stream has finished with (XTRIM MINID: before each group's oldest pending entry,
        or after its last delivered one), which Redis allows at its cap; no frame a worker has yet to
        judge goes. Returns how many went; 0 when the stream has no group."""
        try:
            groups = self.r.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return 0
        bounds = []
        for g in groups:
            pending = self.r.xpending(self.stream, g["name"])
            if pending["pending"]:
                bounds.append(id_key(text_of(pending["min"])))
            else:  # everything delivered is acknowledged: the next id is the first one it still needs
                ms, seq = id_key(text_of(g["last-delivered-id"]))
                bounds.append((ms, seq + 1))
        if not bounds:
            return 0
        ms, seq = min(bounds)
        return int(self.r.xtrim(self.stream, minid=f"{ms}-{seq}", approximate=False))

    def retention_warning(self, frame_bytes: int, fps: float) -> str | None:
        """What Redis keeps of this run (make_room's docstring) measured against its memory cap, for
        frames the size of the first; None when it fits, Redis has no cap, or will not say (ACL)."""
        try:
            cap = int(self.r.info("memory").get("maxmemory", 0))
        except redis.RedisError:
            return None
        if not cap:
            return None
        by_key = frame_bytes > self.inline_max
        if by_key:  # each under its key for its TTL, whether its entry is trimmed or not
            kept, how = (round(fps * self.key_ttl_s), f"{fps:g} frames/s for --key-ttl-s {self.key_ttl_s}") \
                if fps else (self.maxlen or 0, f"--maxlen {self.maxlen}")
        else:
            kept, how = self.maxlen or 0, f"--maxlen {self.maxlen or 0}"
        if kept and kept * frame_bytes < cap * 0.8:  # the rest for results, dead letters, Redis itself
            return None
        fit = int(cap * 0.8 // frame_bytes)
        held = "every frame (--maxlen 0: no cap)" if not kept else \
            f"the last {kept} frames ({how}: {kept * frame_bytes / MB:.0f} MB at {frame_bytes / MB:.2f} MB each)"
        fix = f"lower --key-ttl-s to about {max(1, int(fit / fps))}" if by_key and fps else f"lower --maxlen to about {fit}"
        return (f"Redis keeps {held} after the workers are done with them, more than 80% of its memory cap "
                f"(maxmemory {cap / MB:.0f} MB): at the cap it refuses frames until room is made; {fix}, or raise "
                "maxmemory")


def _quietly(call: Callable[[], int]) -> int:
    """call(), 0 if Redis fails it: making room is a help, and the retry says what is wrong."""
    try:
        return call()
    except redis.RedisError:
        return 0


def publish(frames: Iterator[tuple[str, bytes]], publisher: FramePublisher, fps: float = 0.0, count: int = 0,
            progress: Callable[[int, float], None] = lambda n, elapsed: None, progress_every_s: float = 10.0,
            outage: Callable[[str], None] = lambda message: None, backoff_cap_s: float = 5.0) -> int:
    """Send frames at `fps` (0: as fast as Redis takes them), at most `count` (0: all), holding a
    frame through Redis outages and refusals (`outage` hears when one starts and ends, of the
    retention_warning, and of a frame too large for Redis ever to take, which is passed over).
    Returns how many were sent."""
    began = start = last_report = time.monotonic()  # start: the pacing schedule's, moved on by an outage
    n, largest = 0, None
    frames = iter(frames)
    while not (count and n >= count):  # checked before the next frame is read, not after
        if (frame := next(frames, None)) is None:
            break
        frame_id, data = frame
        largest = publisher.largest_frame() if largest is None else largest
        if len(data) > largest:
            outage(larger_than_redis_takes(frame_id, len(data), largest))
            continue
        if n == 0 and (warning := publisher.retention_warning(len(data), fps)):
            outage(f"WARNING: {warning}")
        if fps > 0:
            delay = start + n / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if send_through_outages(publisher, frame_id, data, outage, Backoff(backoff_cap_s)):
            start = time.monotonic() - n / fps if fps > 0 else start  # the next frame 1/fps from now
        n += 1
        if time.monotonic() - last_report >= progress_every_s:
            last_report = time.monotonic()
            progress(n, last_report - began)
    return n


def larger_than_redis_takes(name: str, nbytes: int, largest: int) -> str:
    return (f"{name}: {nbytes / MB:.1f} MB, more than Redis takes in one value (proto-max-bulk-len "
            f"{largest / MB:.1f} MB): passed over; send smaller frames or raise proto-max-bulk-len")


def send_through_outages(publisher: FramePublisher, frame_id: str, data: bytes, outage: Callable[[str], None],
                         backoff: Backoff) -> bool:
    """Send one frame, retrying while Redis is unreachable or refuses for now; True if it had to wait.
    The capture time (`ts`) stays that of the first attempt."""
    ts = time.time()

    def refused(err: BaseException) -> None:
        if isinstance(err, redis.OutOfMemoryError) and (trimmed := _quietly(publisher.make_room)):
            outage(f"made room: trimmed {trimmed} entries of {publisher.stream} every consumer group had finished "
                   "with (their results stay)")

    _, waited = through_outages(lambda: publisher.send(frame_id, data, ts=ts), outage, backoff,
                                f"holding frame {frame_id} and retrying", f"frame {frame_id} sent, resuming",
                                clock=time, refused=refused)
    return waited
