"""`ustudents publish`: a camera stand-in writing frames to a stream as the worker expects them.

Frames come from an image folder (the files' bytes as they are), a video file or a camera index
(OpenCV; each frame encoded as PNG or JPEG). Frames larger than `inline_max` bytes go under a key
of their own with a TTL and the entry names it in `image_key`; SET and XADD share one MULTI/EXEC so
an entry never names a key that was not written.

Redis going away mid-run does not end it: the frame in hand is held and sent again with backoff
until Redis takes it, then publishing resumes at the set rate (the schedule starts again rather
than bursting the frames the outage cost). A frame whose XADD reached Redis but whose reply was
lost is sent twice: two entries, one frame_id.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import cv2
import redis

from ustudents.engines.images import IMAGE_SUFFIXES, image_files, looks_like_image, subfolder_hint

from . import schema
from .connection import Backoff, through_outages


def frames_from(source: str, fmt: str = "png", loop: bool = False,
                warn: Callable[[str], None] = print) -> Iterator[tuple[str, bytes]]:
    """(frame_id, encoded bytes) from a folder of images, one image, a video file or a camera
    index. Raises ValueError at once when the source cannot be used; `warn` hears of a video that
    ends before the frame count its header gives (a truncated or damaged file)."""
    path = Path(source)
    if source.isdigit() and not path.exists():
        return _capture(_open(int(source), f"camera {source}: cannot be opened; check the index (0, 1, ...) and "
                                           "that no other program holds it"), f"camera{source}", fmt, loop=False)
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise ValueError(f"{path}: no images ({'/'.join(IMAGE_SUFFIXES)}){subfolder_hint(path)}; give a folder "
                             "of frames, a video file or a camera index")
        return _files(files, loop, warn)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return _files([path], loop, warn)
    if path.is_file():
        return _capture(_open(str(path), f"{path}: cannot be opened as a video; give a video OpenCV reads "
                                         "(e.g. .mp4, .avi)"), path.stem, fmt, loop, warn=warn, source=str(path))
    raise ValueError(f"{source}: no such folder, image, video file or camera index")


def _files(files: list[Path], loop: bool, warn: Callable[[str], None]) -> Iterator[tuple[str, bytes]]:
    n = 0
    while True:
        for f in files:
            data = f.read_bytes()
            if n == 0 and not looks_like_image(data):  # sent all the same: a camera's bad frame is a case to test
                warn(f"{f}: not an image file by its first bytes; sent as it is, so the worker dead-letters it "
                     "(decode_error)")
            yield (f.stem if n == 0 else f"{f.stem}-{n}"), data
        n += 1
        if not loop:
            return


def _open(source: int | str, error: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise ValueError(error)
    return cap


def _capture(cap: cv2.VideoCapture, name: str, fmt: str, loop: bool, warn: Callable[[str], None] = print,
             source: str = "") -> Iterator[tuple[str, bytes]]:
    index, rewound, in_pass = 0, False, 0
    announced = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if source else 0  # a file's header; cameras: 0 or -1
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
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
        """XADD one frame; returns the entry id."""
        fields: dict[str, str | bytes] = {schema.FRAME_ID: frame_id, schema.CAMERA: self.camera,
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


def publish(frames: Iterator[tuple[str, bytes]], publisher: FramePublisher, fps: float = 0.0, count: int = 0,
            progress: Callable[[int, float], None] = lambda n, elapsed: None, progress_every_s: float = 10.0,
            outage: Callable[[str], None] = lambda message: None, backoff_cap_s: float = 5.0) -> int:
    """Send frames at `fps` (0: as fast as Redis takes them), at most `count` (0: all), holding a
    frame through Redis outages (`outage` hears when one starts and ends). Returns how many."""
    start = last_report = time.monotonic()
    n = 0
    for frame_id, data in frames:
        if count and n >= count:
            break
        if fps > 0:
            delay = start + n / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if send_through_outages(publisher, frame_id, data, outage, Backoff(backoff_cap_s)):
            start = time.monotonic() - n / fps if fps > 0 else start  # the next frame 1/fps from now
        n += 1
        if time.monotonic() - last_report >= progress_every_s:
            last_report = time.monotonic()
            progress(n, last_report - start)
    return n


def send_through_outages(publisher: FramePublisher, frame_id: str, data: bytes, outage: Callable[[str], None],
                         backoff: Backoff) -> bool:
    """Send one frame, retrying while Redis is unreachable; True if it had to wait. The capture
    time (`ts`) stays that of the first attempt."""
    ts = time.time()
    _, waited = through_outages(lambda: publisher.send(frame_id, data, ts=ts), outage, backoff,
                                f"holding frame {frame_id} and retrying", f"frame {frame_id} sent, resuming",
                                clock=time)
    return waited
