"""The stream contract, version SCHEMA_VERSION: field names of input, result and dead-letter
entries, the derived key names, and the encoding of values.

Input (stream `<stream>`), written by a camera or frame grabber:
    image      encoded PNG/JPEG bytes            } exactly one of the two
    image_key  a Redis key holding those bytes   } (the producer sets the key's TTL)
    schema     optional: the version the producer writes; absent or SCHEMA_VERSION
    frame_id   the producer's id of the frame (the entry id stands in when absent)
    camera     optional
    ts         optional capture time, Unix seconds (float)
    category   optional: which model, where a worker serves several

Result (stream `<stream>:results`), one per input entry that was scored:
    schema, frame_id, entry_id, score (the bundle's image score), anomalous (0/1: score >= threshold),
    threshold (the bundle's image threshold), mask (PNG, 0/255 at the frame's size: the map at or above
    the bundle's mask threshold), model (bundle id), latency_ms, consumer; camera, ts, category when
    the input had them; heatmap (PNG) when the worker's `heatmap` setting is on.

Dead letter (stream `<stream>:dead`): the input's fields plus schema, entry_id, reason, error
(without `image` when the reason is too_large: a copy would defeat the limit; `image_bytes` then
gives its size). Of an entry with more than DEAD_LETTER_FIELDS fields, the contract's fields and
the first others up to that many are kept; `fields_dropped` gives how many were left out.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

SCHEMA_VERSION = 1

# input
IMAGE, IMAGE_KEY, FRAME_ID, CAMERA, TS, CATEGORY = "image", "image_key", "frame_id", "camera", "ts", "category"
INPUT_FIELDS = (IMAGE, IMAGE_KEY, FRAME_ID, CAMERA, TS, CATEGORY)
PASSED_THROUGH = (CAMERA, TS, CATEGORY)
# result
SCHEMA, ENTRY_ID, SCORE, ANOMALOUS, THRESHOLD, MASK, MODEL, LATENCY_MS, CONSUMER, HEATMAP = (
    "schema", "entry_id", "score", "anomalous", "threshold", "mask", "model", "latency_ms", "consumer", "heatmap")
# dead letter
REASON, ERROR, IMAGE_BYTES, FIELDS_DROPPED = "reason", "error", "image_bytes", "fields_dropped"
# Producer fields a dead letter copies at most. Redis' Lua refuses to unpack about 8,000 values, so
# an entry of some 4,000 fields (a producer's bug) made the publish script fail on every attempt:
# never dead-lettered, every worker that took it crashing. A frame needs six.
DEAD_LETTER_FIELDS = 64

# Dead-letter reasons: each is also the `reason` label of ustudents_frames_dead_lettered_total.
DECODE_ERROR = "decode_error"  # the bytes are not a PNG/JPEG/... image
EMPTY = "empty"  # zero bytes
TOO_LARGE = "too_large"  # more than max_frame_bytes
MISSING_IMAGE = "missing_image"  # neither image nor image_key, or image_key holds nothing (expired)
KEY_DENIED = "key_denied"  # image_key names a key the worker's Redis user may not read (its ACL)
INVALID_ENTRY = "invalid_entry"  # both image and image_key, or a schema version this worker does not read
UNKNOWN_CATEGORY = "unknown_category"  # no model served here for the entry's category
UNEXPECTED_SHAPE = "unexpected_shape"  # a frame unlike every image its model was trained and calibrated on
MAX_DELIVERIES = "max_deliveries"  # failed, or its worker died, on each of max_deliveries attempts
TRIMMED = "trimmed"  # the entry left the input stream (MAXLEN) before it was processed, or while a failed attempt did
REASONS = (DECODE_ERROR, EMPTY, TOO_LARGE, MISSING_IMAGE, KEY_DENIED, INVALID_ENTRY, UNKNOWN_CATEGORY,
           UNEXPECTED_SHAPE, MAX_DELIVERIES, TRIMMED)


def results_stream(stream: str) -> str:
    return f"{stream}:results"


def dead_stream(stream: str) -> str:
    return f"{stream}:dead"


def done_key(stream: str, entry_id: str) -> str:
    """Marker set in the same transaction as an entry's result or dead letter (see streams.publish)."""
    return f"{stream}:done:{entry_id}"


# The fingerprint of an entry whose fields are gone (trimmed away): it matches any marker, since such an
# entry can only be one this stream held.
ANY_ENTRY = "-"


def fingerprint(fields: dict[bytes, bytes]) -> str:
    """A digest of an entry's fields, kept in its done marker: an entry id that comes back with other
    fields (the stream deleted, and a producer that sets its own ids starting again) is a new frame,
    not one already published. Length-prefixed, so that no two different entries share the bytes hashed."""
    if not fields:
        return ANY_ENTRY
    h = hashlib.blake2b(digest_size=12)
    for name, value in sorted(fields.items()):
        for part in (name, value):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def marker_value(fp: str, kind: str, attempt: str) -> str:
    """A done marker's value: the entry's fingerprint, what was published ("result", "dead:<reason>"),
    and the publish attempt that wrote it (a retried publish whose first reply was lost finds its own)."""
    return f"{fp} {kind} {attempt}"


def marks_entry(marker: bytes | None, fp: str) -> bool:
    """Whether a done marker stands for the entry of fingerprint `fp` (PUBLISH_SCRIPT has the same rule in
    Lua). A marker without a fingerprint (written before markers had one) matches any entry, as does
    ANY_ENTRY on either side."""
    if marker is None:
        return False
    marked, sep, _ = marker.decode("ascii", "replace").partition(" ")
    return not sep or ANY_ENTRY in (marked, fp) or marked == fp


def groups_key(stream: str) -> str:
    """A hash of the consumer groups ustudents workers have read the stream with (StreamIO.ensure_group):
    a group on the stream not named there is another program's, which reads the frames on its own."""
    return f"{stream}:groups"


def name_key(stream: str, consumer: str) -> str:
    """Held by the live worker that reads as `consumer` (StreamIO.hold_name)."""
    return f"{stream}:consumer:{consumer}"


def serves_key(stream: str, consumer: str) -> str:
    """The models ({category: model id}) the live worker reading as `consumer` serves, as it last said
    (StreamIO.announce_models)."""
    return f"{stream}:serves:{consumer}"


def tries_key(stream: str, entry_id: str) -> str:
    """Count of the attempts at a redelivered entry, each made alone (see StreamIO.begin_attempt)."""
    return f"{stream}:tries:{entry_id}"


def text(fields: dict[bytes, bytes], name: str) -> str | None:
    value = fields.get(name.encode())
    return None if value is None else value.decode("utf-8", "replace")


# A number as JSON writes one (ASCII digits; no "+", "1." or ".5"). Python's float() also takes
# "1_700_000_000", " 1700000000 " and other scripts' digits, which a consumer in another language then
# failed to parse from the result. One way to split each run of digits: a failed match stays linear
# in the length (a pattern with two took 6 s on a 16,000-digit ts, growing as the square, stalling the worker).
NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def capture_time(fields: dict[bytes, bytes]) -> float | None:
    """The `ts` field as Unix seconds, or None when absent or not a finite number (NUMBER)."""
    value = text(fields, TS)
    if value is None or not NUMBER.fullmatch(value):
        return None
    ts = float(value)
    return ts if math.isfinite(ts) else None


@dataclass
class DeadLetter:
    reason: str
    error: str


def version_error(fields: dict[bytes, bytes]) -> DeadLetter | None:
    """Why an entry written for another version of this contract cannot be read, or None: a producer
    that writes `schema` states which fields it means, and a version this worker does not know may
    have redefined one of them."""
    version = text(fields, SCHEMA)
    if version is None or version.strip() == str(SCHEMA_VERSION):
        return None
    return DeadLetter(INVALID_ENTRY, f"the entry says schema {version!r}; this worker reads schema {SCHEMA_VERSION} "
                                     "(upgrade the worker, or have the producer write that version)")


def result_entry(entry_id: str, fields: dict[bytes, bytes], *, score: float, anomalous: bool, threshold: float,
                 mask_png: bytes, model: str, latency_ms: float, consumer: str,
                 heatmap_png: bytes | None = None) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {
        # the frame id's own bytes, as `camera`'s: one that is not UTF-8 came back altered, matching no frame
        SCHEMA: str(SCHEMA_VERSION), FRAME_ID: fields.get(FRAME_ID.encode()) or entry_id, ENTRY_ID: entry_id,
        SCORE: repr(float(score)), ANOMALOUS: "1" if anomalous else "0", THRESHOLD: repr(float(threshold)),
        MASK: mask_png, MODEL: model, LATENCY_MS: f"{latency_ms:.3f}", CONSUMER: consumer}
    for name in PASSED_THROUGH:
        value = fields.get(name.encode())
        # ts: a number, as documented; an empty category is none
        if value is not None and (name != TS or capture_time(fields) is not None) and (name != CATEGORY or value):
            out[name] = value
    if heatmap_png is not None:
        out[HEATMAP] = heatmap_png
    return out


def dead_entry(entry_id: str, fields: dict[bytes, bytes], dead: DeadLetter,
               max_image_bytes: int) -> dict[bytes | str, bytes | str]:
    """The entry's fields plus why it failed. An inline image up to `max_image_bytes` is kept (to look
    at, or publish again); a larger one is replaced by its size, so that a camera sending broken
    frames cannot fill Redis with copies of them (at most dead_maxlen x max_image_bytes)."""
    out: dict[bytes | str, bytes | str] = dict(fields)
    for name in (SCHEMA, ENTRY_ID, REASON, ERROR, IMAGE_BYTES, FIELDS_DROPPED):  # the worker's, never the producer's
        out.pop(name.encode(), None)
    if len(out) > DEAD_LETTER_FIELDS:  # the contract's fields first, so that the letter can be replayed
        contract = [n.encode() for n in INPUT_FIELDS if n.encode() in out]
        others = [n for n in out if n not in contract][:DEAD_LETTER_FIELDS - len(contract)]
        dropped = len(out) - len(contract) - len(others)
        out = {n: out[n] for n in contract + others}
        out[FIELDS_DROPPED] = str(dropped)
    image = out.get(IMAGE.encode())
    if image is not None and len(image) > max_image_bytes:
        del out[IMAGE.encode()]
        out[IMAGE_BYTES] = str(len(image))
    out.update({SCHEMA: str(SCHEMA_VERSION), ENTRY_ID: entry_id, REASON: dead.reason, ERROR: dead.error})
    return out


def decode_fields(fields: dict[bytes, bytes]) -> dict[str, bytes]:
    """A stream entry's fields with str names (values stay bytes)."""
    return {k.decode("utf-8", "replace"): v for k, v in fields.items()}
