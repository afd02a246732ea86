"""Redis Streams operations of one worker: the consumer group, reading (own pending, then new),
reclaiming from silent consumers, delivery counts, and the atomic publish-and-acknowledge.

Exactly one outcome per input entry
-----------------------------------
An entry leaves the group's pending entries list (PEL) only in `publish`, one Lua script that
writes its result (or dead letter), sets the marker `<stream>:done:<entry_id>` and XACKs it. A
script runs atomically but does not roll back: a command failing halfway (a results key that is
not a stream, WRONGTYPE) would leave the earlier ones done, and a MULTI/EXEC has the same flaw
(measured: the marker and the XACK went through without the result, and the frame was gone). So
the script checks every key it writes before its first write and refuses the whole call when one
is of the wrong type; then nothing can fail. Hence:

* At least one: until the script has run the entry stays pending, so a worker that dies (or whose
  Redis connection dies) at any point before it leaves the entry to be re-read (its own pending,
  on restart) or claimed by a live worker (CLAIM_SCRIPT after `claim_idle_ms`).
* At most one: after it the entry is acknowledged, and neither XREADGROUP `>` (new entries
  only), nor a history read, nor the claim (both: pending entries only) hands it out again. The one
  remaining way to two results is two workers holding the same entry at once: a worker stalls
  longer than `claim_idle_ms`, another claims the entry, both finish. Both publish through the
  script, which writes a result only where the marker is absent; scripts run one at a time, so
  whichever runs second finds the marker and only acknowledges. Re-sending a script whose reply
  was lost is safe for the same reason. The marker has to outlive that race, not the entry:
  `dedupe_ttl_s` (default 1 h) bounds how long a stalled worker may hold a claimed entry.
* An id names one entry only within one life of the stream: deleted and written again by a producer
  that sets its own ids, it can hand out a used id for a new frame. So making a group from the
  stream's start (which a new stream needs) removes the stream's markers (clear_markers), and a marker holds a digest of its
  entry's fields (schema.fingerprint) and stands only for that entry, for a worker of the stream's
  earlier life publishing late: the new frame is scored.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import redis

from . import schema
from .connection import error_codes, refusal, script_error

log = logging.getLogger(__name__)

# How long an entry's attempt count is kept: far longer than a crash-looping worker takes to restart
# (Kubernetes backs off to 5 min), and a few bytes each for the rare entries that were redelivered.
TRIES_TTL_S = 24 * 3600

# An entry as XREADGROUP or the claim gives it: (entry id, fields); fields are {} for an entry trimmed away.
RawEntry = tuple[bytes, dict[bytes, bytes]]


@dataclass
class Entry:
    """An input entry handed to this worker."""
    id: str
    fields: dict[bytes, bytes]
    attempt: int = 1  # attempts at processing it, this one included (the first in a batch, later ones alone)
    token: str | None = None  # this attempt's name in the entry's count (StreamIO.begin_attempt), when counted
    received: float = field(default_factory=time.monotonic)
    already_done: bool = False  # its marker exists: acknowledge only

    @functools.cached_property
    def fingerprint(self) -> str:
        return schema.fingerprint(self.fields)


@dataclass
class Record:
    """What `publish` writes for one entry: `fields` to `target` (None: acknowledge only)."""
    entry_id: str
    target: str | None
    fields: dict | None = None
    kind: str = "result"  # marker value: "result" or "dead:<reason>"
    fingerprint: str = schema.ANY_ENTRY  # the input entry's (schema.fingerprint), kept in its marker
    received: float | None = None  # time.monotonic() when the worker read the entry (a result's latency_ms)


def replies(reply) -> list[tuple[bytes, list[RawEntry]]]:
    """An XREAD/XREADGROUP reply as (stream, entries) pairs, in either protocol (RESP2 gives a list
    of [stream, entries], RESP3 a {stream: [entries]} mapping); trimmed entries get fields {}."""
    if not reply:
        return []
    pairs = [(k, v[0]) for k, v in reply.items()] if isinstance(reply, dict) else reply
    return [(k, [(eid, fields or {}) for eid, fields in entries]) for k, entries in pairs]


def text_of(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id ('1700000000000-3') in the order Redis gives ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# Redis 7.0 counts entries trimmed before a group read them as lag for good (redis/redis#13957): the
# lag gauge, the lag alert and KEDA's scale-out (which reads XINFO GROUPS itself) stay up. The counting
# read (GAP_SCRIPT) sets the count right at the gaps it finds; this repairs the rest (a gap that a
# waiting read jumped, entries deleted by XDEL ahead of the group). A group that
# has read the stream's last entry has lag 0: there, and only there, its read counter is set to the
# entries the stream ever had, in one atomic step (the group's position is unchanged). Returns 1 if
# it repaired the count. Redis before 7 has no lag, and nothing to repair.
REPAIR_LAG_SCRIPT = """
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  if f['name'] == ARGV[1] then
    if type(f['lag']) ~= 'number' or f['lag'] == 0 then return 0 end
    local s, sf = redis.call('XINFO', 'STREAM', KEYS[1]), {}
    for i = 1, #s, 2 do sf[s[i]] = s[i + 1] end
    if f['last-delivered-id'] ~= sf['last-generated-id'] then return 0 end
    redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], f['last-delivered-id'], 'ENTRIESREAD', sf['entries-added'])
    return 1
  end
end
return 0
"""

# Count the entries that left the stream before the group read them, ahead of a read of new entries
# (StreamIO.read_new: this script and XREADGROUP in one MULTI, so no trim comes between them): the
# producer's MAXLEN (or XTRIM) cut them while every worker was behind, and a plain read skips the gap
# silently. A gap is possible only where Redis' lag is the stream's length or more (Redis 7.0 estimates
# it as the length when the group's read counter is unknown) or Redis cannot tell the lag; only then is
# XINFO STREAM read. The entries removed number entries-added - XLEN, of which the group had read
# entries-read (every entry up to its last-delivered-id is gone, or there would be no gap; a group that
# has read nothing has read none, though Redis 7.0 keeps no counter for it): the rest were never read.
# The group is then moved to just before the first entry kept, with its read counter set, so that a gap
# is counted once (by whichever worker reads first) and the lag is right again. Redis before 7 counts no
# entries added: nothing is done there. KEYS: the stream. ARGV: group. Returns the entries trimmed unread
# (-1: some may be, Redis cannot tell how many: the group has no read counter, or entries were deleted
# ahead of it). The read itself is not in the script: Lua would copy every frame's image twice.
GAP_SCRIPT = """
local function fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
-- ids are compared and decremented as decimal strings: producer-set ids may exceed a Lua number's 2^53
local function less(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function id_less(x, y)
  local xm, xs = string.match(x, '^(%d+)-(%d+)$')
  local ym, ys = string.match(y, '^(%d+)-(%d+)$')
  if xm ~= ym then return less(xm, ym) end
  return less(xs, ys)
end
local function decrement(s)
  local d, i = {string.byte(s, 1, -1)}, #s
  while d[i] == 48 do d[i] = 57; i = i - 1 end
  d[i] = d[i] - 1
  return (string.gsub(string.char(unpack(d)), '^0+(%d)', '%1'))
end
local function id_before(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if seq ~= '0' then return ms .. '-' .. decrement(seq) end
  return decrement(ms) .. '-18446744073709551615'
end
local lost = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local f = fields(g)
    -- a lag field that is absent: Redis before 7; false: Redis cannot tell the lag
    if f['name'] == ARGV[1] and f['lag'] ~= nil then
      local len = redis.call('XLEN', KEYS[1])
      if f['lag'] == false or f['lag'] >= len then
        local s = fields(redis.call('XINFO', 'STREAM', KEYS[1]))
        local first = s['recorded-first-entry-id'] or (len > 0 and redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1])
        local upto = len == 0 and s['last-generated-id'] or id_before(first)
        if id_less(f['last-delivered-id'], upto) then
          local removed = s['entries-added'] - len
          local read = f['entries-read'] or (f['last-delivered-id'] == '0-0' and 0)
          -- an XDEL ahead of the group (trimming never moves max-deleted-entry-id) is in `removed`
          -- wherever it was, in the gap or among the entries kept: then the gap's size is unknown
          if id_less(f['last-delivered-id'], s['max-deleted-entry-id']) then read = nil end
          if removed == 0 then
            lost = 0
          elseif read then
            lost = math.max(0, removed - read)
            redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], upto, 'ENTRIESREAD', string.format('%d', removed))
          else
            lost = -1
            redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], upto)  -- Redis estimates the counter again
          end
        end
      end
    end
  end
end
return lost
"""

# newest_outcome: more than the entries in flight across a line's workers; each carries a mask PNG, and this
# is read once, when a group is made
OUTCOMES_SEEN = 100

# XINFO CONSUMERS and XGROUP DELCONSUMER in one atomic step (StreamIO.reap_idle_consumers).
REAP_SCRIPT = """
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
"""


# Reset the idle time of entries a worker holds (StreamIO.keep_claimed). KEYS: input stream. ARGV:
# group, consumer, min idle ms, then the ids. Only entries still in the stream: XCLAIM of one trimmed
# away drops it from the pending list (Redis 7), and a frame whose attempt then fails, or whose worker
# dies, would vanish instead of ending as a `trimmed` dead letter.
KEEP_SCRIPT = """
local call = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3]}
for i = 4, #ARGV do
  if #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i], 'COUNT', 1) > 0 then call[#call + 1] = ARGV[i] end
end
if #call == 5 then return 0 end
call[#call + 1] = 'JUSTID'
return #redis.call(unpack(call))
"""


# Claim entries left pending by silent consumers (StreamIO.autoclaim). KEYS: input stream. ARGV: group,
# consumer, min idle ms, start (an id, or '(' and an id: after it), count. Returns {next start ('0-0':
# done), claimed entries as XCLAIM gives them, {id, consumer} of entries gone from the stream}. XAUTOCLAIM would
# drop the gone ones from the pending list (Redis 7), so that a worker killed before it dead-lettered
# them left no trace of those frames: here they stay pending, on whichever consumer held them, until
# the `trimmed` dead letter that acknowledges them is written (by this worker, or the next one). Like
# XAUTOCLAIM it looks at no more than 10 x count pending entries a call: an IDLE filter scans the
# whole list, blocking Redis meanwhile (benchmarks/claim_scan.py: 15.7 ms with 200,000 pending and
# none idle, against 0.26 ms).
CLAIM_SCRIPT = """
local min_idle, count = tonumber(ARGV[3]), tonumber(ARGV[5])
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[4], '+', count * 10)
local call, gone, taken, cursor = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3]}, {}, 0, nil
for _, row in ipairs(rows) do
  if row[3] >= min_idle then
    if #redis.call('XRANGE', KEYS[1], row[1], row[1], 'COUNT', 1) > 0 then call[#call + 1] = row[1]
    else gone[#gone + 1] = {row[1], row[2]} end
    taken = taken + 1
    if taken == count then cursor = '(' .. row[1] break end
  end
end
if cursor == nil then cursor = (#rows == count * 10) and ('(' .. rows[#rows][1]) or '0-0' end
local claimed = {}
if #call > 5 then claimed = redis.call(unpack(call)) end
return {cursor, claimed, gone}
"""


# Publish a batch's outcomes (StreamIO.publish). KEYS: input stream, results stream, dead stream,
# then one marker per record. ARGV: group, marker TTL, results MAXLEN, dead MAXLEN, then per
# record: entry id, target (0: acknowledge only, 1: results, 2: dead), the entry's fingerprint,
# marker value, field count, fields. Returns the 1-based numbers of the records written. A marker
# counts only for the entry it was set for: marks_entry is schema.marks_entry.
PUBLISH_SCRIPT = """
local function marks_entry(marker, fp)
  -- a marker key of another type (a stray SET ... by hand is a string; HSET is not) is no marker: the
  -- SET below replaces it, and an error here would stop the script after earlier records' writes
  if type(marker) ~= 'string' then return false end
  local marked = string.match(marker, '^(%S+) ')
  return marked == nil or marked == '-' or fp == '-' or marked == fp
end
local kinds = {stream = true, none = true}
for i = 1, 3 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if not kinds[t] then
    return redis.error_reply('USTUDENTS_WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a stream')
  end
end
local group, ttl = ARGV[1], ARGV[2]
local maxlen = {ARGV[3], ARGV[4]}
local ids, written, a = {}, {}, 5
for r = 1, #KEYS - 3 do
  local id, target, fp, marker, n = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  ids[r] = id
  local found = redis.pcall('GET', KEYS[r + 3])
  if target > 0 and not marks_entry(found, fp) then
    redis.call('XADD', KEYS[target + 1], 'MAXLEN', '~', maxlen[target], '*', unpack(ARGV, a + 5, a + 4 + n))
    redis.call('SET', KEYS[r + 3], marker, 'EX', ttl)
    written[#written + 1] = r
  elseif target > 0 and found == marker then  -- this very publish, retried: its first reply was lost
    written[#written + 1] = r
  end
  a = a + 5 + n
end
redis.call('XACK', KEYS[1], group, unpack(ids))
return written
"""


# A worker's hold on its consumer name (StreamIO.hold_name). The value is "<token> <stamp>", the
# stamp new at each renewal, so a hold whose value changes is a live worker's. ARGV: 'hold' or
# 'release', token, TTL ms, stamp, and a stale value: a hold is taken from another worker once it has
# lapsed (a dead worker's), or where it still holds the stale value, which the caller saw unrenewed
# for longer than a hold lasts (its TTL runs on Redis's clock, which a step back stretches).
NAME_SCRIPT = """
local held = redis.call('GET', KEYS[1])
local mine = held and string.match(held, '^(%S+)') == ARGV[2]
if ARGV[1] == 'release' then
  if mine then redis.call('DEL', KEYS[1]) end
  return 1
end
if held and not mine and held ~= ARGV[5] then return held end
redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. ARGV[4], 'PX', ARGV[3])
return 1
"""

# Every script the worker runs (the start-up check loads them: a user not allowed scripts is told then)
SCRIPTS = (REAP_SCRIPT, REPAIR_LAG_SCRIPT, GAP_SCRIPT, PUBLISH_SCRIPT, NAME_SCRIPT, KEEP_SCRIPT, CLAIM_SCRIPT)


class PublishRefused(Exception):
    """Redis refused to take a batch's outcomes (a key of the wrong type): nothing was written or
    acknowledged; the message says which key and what to do."""


def key_denied(err: BaseException) -> bool:
    """NOPERM for a key the Redis user may not access (its ACL's key pattern), not for a command it may
    not run ("... permissions to run the 'get' command", which no frame's key changes)."""
    return isinstance(err, redis.exceptions.NoPermissionError) and "to run the" not in str(err)


def _as_fetched(replies: list) -> list:
    """A pipeline's replies with WRONGTYPE (the key holds no string) as None, and a key the worker's
    Redis user may not read (key_denied) kept as the error, which no retry changes; any other error
    raised."""
    for reply in replies:
        if isinstance(reply, redis.ResponseError) and not key_denied(reply) and "WRONGTYPE" not in error_codes(reply):
            raise reply
    return [r if key_denied(r) else None if isinstance(r, redis.ResponseError) else r for r in replies]


class StreamIO:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str, *,
                 results_maxlen: int, dead_maxlen: int, dedupe_ttl_s: int):
        self.r, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.results, self.dead = schema.results_stream(stream), schema.dead_stream(stream)
        self.maxlen = {self.results: results_maxlen, self.dead: dead_maxlen}
        self.dedupe_ttl_s = dedupe_ttl_s
        self._group_named = False  # in schema.groups_key (_name_group)
        self.unwritten = False  # whether the stream had never held an entry at the last ensure_group
        self._reap = client.register_script(REAP_SCRIPT)
        self._repair_lag = client.register_script(REPAIR_LAG_SCRIPT)
        self._gap = client.register_script(GAP_SCRIPT)
        self._publish = client.register_script(PUBLISH_SCRIPT)
        self._name = client.register_script(NAME_SCRIPT)
        self._keep = client.register_script(KEEP_SCRIPT)
        self._claim = client.register_script(CLAIM_SCRIPT)

    # -- the group -------------------------------------------------------------------------------
    def ensure_group(self) -> str | None:
        """Create the group (and the stream) if missing; returns the id it starts after, None if it
        existed. A first group reads from the stream's first entry, so frames written before any
        worker started are processed too. A group made again (destroyed by hand, say to rename it)
        starts after the newest entry that already has a result or dead letter: from the start it would
        score the whole kept stream again, and publish second outcomes once their done markers expired.
        Unless the stream never reached that id: then it is a new stream (deleted and written again, ids
        set by the producer starting over) and every entry in it is new."""
        info = self.stream_info()
        # no stream, or one that never held an entry (made by a worker, no frame since): Redis 6.2 too
        self.unwritten = text_of((info or {}).get("last-generated-id", "0-0")) == "0-0"
        # Called again after every Redis outage: when the group exists, nothing else is read (the
        # newest outcome reads the last results and dead letters, their masks and heatmaps too)
        if info is not None and self.group in self.group_names():
            self._name_group()
            return None
        info = info or {}
        start = self.newest_outcome()
        if start != "0" and id_key(start) > id_key(text_of(info.get("last-generated-id", "0-0"))):
            start = "0"
        # From the start: the entries the stream already lost (trimmed before this group existed, or
        # read by a group destroyed since) count as read, so GAP_SCRIPT does not page for them (Redis 7)
        before = (int(info["entries-added"]) - int(info["length"])
                  if start == "0" and "entries-added" in info else None)
        try:
            self.r.xgroup_create(self.stream, self.group, id=start, mkstream=True, entries_read=before)
        except redis.ResponseError as err:
            if "BUSYGROUP" in str(err):
                self._name_group()
                return None
            raise
        self._group_named = False  # a Redis that lost the group lost its name with it
        self._name_group()
        if start == "0":  # a new life of the stream; else every marker is of entries of this one, and
            self.clear_markers()  # those past `start` that other workers publish meanwhile must keep theirs
        return start

    def _name_group(self) -> None:
        """Name the group ustudents' in schema.groups_key (the start's check tells another program's
        groups from a second one of ours), once per worker and group made. A Redis refusing writes for
        now (at its memory cap) is asked again at the next call: reading goes on meanwhile."""
        if self._group_named:
            return
        try:
            self.r.hsetnx(schema.groups_key(self.stream), self.group, int(time.time()))
            self._group_named = True
        except redis.ResponseError as err:
            if not refusal(err):
                raise

    def clear_markers(self) -> int:
        """Remove the stream's done markers (returns how many), when its group is made from the start
        (a new stream, or one written again): a marker of the stream's earlier life would take a new
        frame under a used id (a producer's frame counter starting again, with the same `image_key` and
        `frame_id`, so the same fingerprint) for one already published. Entries the new group will read
        have no outcome yet, so no marker that matters goes; a worker of the old group that publishes
        later sets its marker again. Not for a group made again on the kept stream: it reads after the
        newest outcome, and an entry past it that another worker published while the keys were
        scanned lost its marker and was scored a second time."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.stream) + ":done:*"  # a stream name is no glob
        removed, batch = 0, []
        for key in self.r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 1000:
                removed += self.r.unlink(*batch)
                batch = []
        if batch:
            removed += self.r.unlink(*batch)
        return removed

    def stream_info(self) -> dict | None:
        """XINFO STREAM of the input stream; None when it does not exist (also when it is deleted
        between the check and the call)."""
        return self._unless_missing(lambda: self.r.xinfo_stream(self.stream)) if self.r.exists(self.stream) else None

    def group_names(self) -> list[str]:
        """The input stream's consumer groups ([] when the stream does not exist)."""
        return [text_of(g["name"]) for g in self._unless_missing(lambda: self.r.xinfo_groups(self.stream)) or []]

    @staticmethod
    def _unless_missing(call):
        """call()'s reply, None where Redis answers that the stream does not exist."""
        try:
            return call()
        except redis.ResponseError as err:
            if "no such key" in str(err).lower():
                return None
            raise

    def newest_outcome(self) -> str:
        """The largest input entry id among the last OUTCOMES_SEEN results and dead letters (outcomes are
        written in publish order, not entry order: several workers, a claimed entry or a late dead
        letter), '0' if there is none."""
        newest = (0, 0)
        for key in (self.results, self.dead):
            for _, fields in self.r.xrevrange(key, count=OUTCOMES_SEEN):
                eid = fields.get(schema.ENTRY_ID.encode(), b"").decode("ascii", "replace")
                if re.fullmatch(r"\d+-\d+", eid):
                    newest = max(newest, id_key(eid))
        return "0" if newest == (0, 0) else f"{newest[0]}-{newest[1]}"

    def group_info(self) -> dict:
        """XINFO GROUPS for our group: pending, lag (None where Redis < 7 or it cannot tell), ...
        A lag Redis kept for entries trimmed unread is repaired first (REPAIR_LAG_SCRIPT)."""
        if self._run(self._repair_lag, [self.stream], [self.group]):
            log.info("repaired the group's lag count, which Redis kept for entries trimmed before they were read "
                     "(redis/redis#13957)", extra={"event": "lag_repaired"})
        for g in self.r.xinfo_groups(self.stream):
            if text_of(g["name"]) == self.group:
                return g
        return {}

    def length(self) -> int:
        return int(self.r.xlen(self.stream))

    def clock_offset(self) -> float:
        """Redis's clock (TIME) less this process' monotonic clock, in seconds, at the middle of the
        call: time.monotonic() plus it reads Redis's clock, the one entry ids are stamped with."""
        before = time.monotonic()
        seconds, micros = self.r.time()
        return seconds + micros / 1e6 - (before + time.monotonic()) / 2

    @staticmethod
    def arrival(entry_id: str) -> float:
        """When Redis added an entry, on its clock, in Unix seconds: the milliseconds of its id."""
        return int(entry_id.split("-", 1)[0]) / 1000

    def has_own_pending(self) -> bool:
        return bool(self.r.xpending_range(self.stream, self.group, min="-", max="+", count=1,
                                          consumername=self.consumer))

    def hold_name(self, token: str, ttl_ms: int, stamp: int, stale: str = "") -> bool | str:
        """Take or renew this consumer name for the worker of `token` for `ttl_ms`; True, or the value
        of another worker's hold (taken over where it is `stale`: see NAME_SCRIPT). Two workers reading
        as one consumer share a pending list: each takes the other's in-flight entries for a dead
        worker's, and the first to leave the group (XGROUP DELCONSUMER) drops the other's entries from
        it, unacknowledged, for good."""
        got = self._name(keys=[schema.name_key(self.stream, self.consumer)],
                         args=["hold", token, ttl_ms, stamp, stale])
        return True if got == 1 else text_of(got)

    def release_name(self, token: str) -> None:
        self._name(keys=[schema.name_key(self.stream, self.consumer)], args=["release", token, 0, 0, ""])
        self.r.delete(schema.serves_key(self.stream, self.consumer))  # gone with the hold: no longer a live worker

    def announce_models(self, models: dict[str, str], ttl_ms: int) -> None:
        """Say for `ttl_ms` which models this worker serves ({category: model id}), for the group's other
        workers to compare (models_elsewhere); renewed with the name hold, deleted at its release."""
        self.r.set(schema.serves_key(self.stream, self.consumer), json.dumps(models, sort_keys=True), px=ttl_ms)

    def models_elsewhere(self) -> dict[str, dict[str, str]]:
        """The models ({category: model id}) each other live worker of the group serves, as it said; a
        worker of a release before the announcement is left out."""
        others = [name for c in self.r.xinfo_consumers(self.stream, self.group)
                  if (name := c["name"].decode(errors="replace") if isinstance(c["name"], bytes) else c["name"])
                  != self.consumer]
        said = self.r.mget([schema.serves_key(self.stream, name) for name in others]) if others else []
        out = {}
        for name, value in zip(others, said):
            try:
                models = json.loads(value) if value is not None else None
            except ValueError:
                continue
            if isinstance(models, dict):
                out[name] = {str(k): str(v) for k, v in models.items()}
        return out

    def delete_consumer_if_idle(self) -> bool:
        """Remove this consumer from the group when nothing is pending on it (clean exit; only this
        process reads as this consumer, and it has stopped reading)."""
        if self.has_own_pending():
            return False
        self.r.xgroup_delconsumer(self.stream, self.group, self.consumer)
        return True

    def reap_idle_consumers(self, idle_ms: int) -> list[str]:
        """Remove the group's consumers (other than this one) idle at least `idle_ms` with nothing
        pending: workers that died without leaving the group (kill -9, a crashed container), which
        a group otherwise collects for as long as the line runs. One Lua script, so no entry can be
        delivered to a consumer between the check and its removal; a live worker removed by a wrong
        guess loses nothing (it had nothing pending) and is recreated by its next read."""
        names = self._run(self._reap, [self.stream], [self.group, idle_ms, self.consumer])
        return [text_of(n) for n in names]

    # -- reading ---------------------------------------------------------------------------------
    def read(self, last_id: str, count: int, block_ms: int | None) -> list[RawEntry]:
        """XREADGROUP: `last_id` '>' for new entries, or an id for this consumer's own pending
        entries after it ('0': from the start)."""
        reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: last_id}, count=count, block=block_ms)
        return [e for _, entries in replies(reply) for e in entries]

    def read_new(self, count: int) -> tuple[list[RawEntry], int]:
        """New entries, without waiting, and how many entries the stream lost before the group read them
        (GAP_SCRIPT; -1: some may have been, Redis cannot tell how many). Where it finds none, the
        caller waits on `read('>')`: a group that has read everything has no gap to count."""
        pipe = self.r.pipeline(transaction=True)
        self._gap(keys=[self.stream], args=[self.group], client=pipe)
        pipe.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count)
        try:
            lost, reply = pipe.execute()
        except redis.ResponseError as err:
            raise script_error(err) from None
        return [e for _, entries in replies(reply) for e in entries], int(lost)

    @staticmethod
    def _run(script, keys: list, args: list):
        """Run a script, with the errors Redis raised inside it as their own classes (script_error)."""
        try:
            return script(keys=keys, args=args)
        except redis.ResponseError as err:
            raise script_error(err) from None

    def autoclaim(self, min_idle_ms: int, start: str, count: int) -> tuple[str, list[RawEntry], list[str]]:
        """Claim up to `count` entries from `start` idle longer than `min_idle_ms` (CLAIM_SCRIPT): (next
        start, '0-0' when done; claimed entries; ids of entries pending but gone from the stream, left
        pending for their dead letter to acknowledge). On Redis 6.2 as on 7.

        A gone entry held by another live worker (its name hold stands) is not reported: that worker
        scores and publishes it (keep_claimed leaves gone entries idle, so they looked abandoned after
        claim_idle_ms, and were dead-lettered `trimmed` here while their holder scored them, its
        result then dropped). A dead worker's hold lapses within NAME_HOLD_S; its entries go then."""
        cursor, claimed, gone = self._run(self._claim, [self.stream], [self.group, self.consumer, min_idle_ms, start,
                                                                       count])
        entries = [(eid, dict(zip(fields[::2], fields[1::2]))) for eid, fields in claimed]
        gone = [(text_of(eid), text_of(holder)) for eid, holder in gone]
        others = sorted({holder for _, holder in gone if holder != self.consumer})
        held = {holder for holder, hold in zip(others, self.r.mget([schema.name_key(self.stream, h) for h in others]))
                if hold is not None} if others else set()
        return text_of(cursor), entries, [eid for eid, holder in gone if holder not in held]

    def keep_claimed(self, ids: list[str], min_idle_ms: int) -> None:
        """Reset the idle time of entries this worker holds, so that no other worker takes them for
        abandoned while they wait in its pipeline: XCLAIM JUSTID (which counts no delivery) of those
        idle at least `min_idle_ms` and still in the stream (KEEP_SCRIPT). An entry another worker
        claimed meanwhile is idle for less, so it stays theirs; an entry acknowledged meanwhile is not
        pending and is left alone."""
        for i in range(0, len(ids), 1000):
            self._run(self._keep, [self.stream], [self.group, self.consumer, min_idle_ms, *ids[i:i + 1000]])

    def begin_attempt(self, entry_id: str, token: str) -> int:
        """Count the start of one more attempt at an entry that was handed out before and never
        completed; returns the attempts counted so far, this one included. The count is kept in Redis
        (`<stream>:tries:<id>`, for TRIES_TTL_S), so it survives the worker dying during the attempt
        and is shared by every worker of the group, unlike XPENDING's delivery count, which also
        rises for every frame that only shared a batch with the one that killed the worker. Each
        attempt is a field named by its `token` (HSETNX), so resending a call whose reply was lost
        does not count it twice."""
        key = schema.tries_key(self.stream, entry_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(key, token, 1)
        pipe.expire(key, TRIES_TTL_S)
        pipe.hlen(key)
        return int(pipe.execute()[2])

    def forget_attempts(self, ids: list[str], taken_back: list[tuple[str, str]] = ()) -> None:
        """Drop the attempt counts of the entries `ids` (published), and take back single counted
        attempts, each (entry id, token), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        if ids:
            pipe.delete(*[schema.tries_key(self.stream, i) for i in ids])
        for entry_id, token in taken_back:
            pipe.hdel(schema.tries_key(self.stream, entry_id), token)
        pipe.execute()

    def done(self, entries: list[Entry]) -> list[bool]:
        """Whether each entry already has its outcome published (a marker set for it exists)."""
        if not entries:
            return []
        markers = self.r.mget([schema.done_key(self.stream, e.id) for e in entries])
        return [schema.marks_entry(m, e.fingerprint) for m, e in zip(markers, entries)]

    def fetch_images(self, keys: list[bytes], max_bytes: int) -> list[bytes | int | None | Exception]:
        """Bytes held at each `image_key`: the bytes, or their length when over `max_bytes` (not
        fetched), or None when the key is missing or not a string, or Redis' NOPERM error when the
        worker's user may not read it (a key outside its ACL's pattern: raised, it crashed the worker
        on that frame at every restart). Any other refusal (BUSY, LOADING, MASTERDOWN: Redis unable to
        answer for now) is raised, for the caller to wait out: read as "no image", it dead-lettered
        frames whose keys were there."""
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.strlen(k)
        sizes = _as_fetched(pipe.execute(raise_on_error=False))
        pipe = self.r.pipeline(transaction=False)
        wanted = [i for i, n in enumerate(sizes) if isinstance(n, int) and 0 < n <= max_bytes]
        for i in wanted:
            pipe.get(keys[i])
        got = dict(zip(wanted, _as_fetched(pipe.execute(raise_on_error=False))))
        out: list[bytes | int | None | Exception] = []
        for i, n in enumerate(sizes):
            if n is None or isinstance(n, Exception):  # WRONGTYPE, NOPERM
                out.append(n)
            elif n == 0:  # STRLEN of a missing key is 0 too: tell apart below
                out.append(None if not self.r.exists(keys[i]) else b"")
            elif n > max_bytes:
                out.append(n)
            else:
                v = got.get(i)
                out.append(v if isinstance(v, (bytes, Exception)) else None)
        return out

    # -- writing ---------------------------------------------------------------------------------
    def publish(self, records: list[Record], attempt: str | None = None) -> list[Record]:
        """Write each record's result or dead letter, set its marker and XACK every entry, all in one
        script; a record whose marker already exists is only acknowledged. Returns the records
        written, by this call or by an earlier call of the same `attempt` (a token the caller keeps
        over retries of one publish: when a reply is lost, the retry still reports what the first
        call wrote, so it is counted once). See the module docstring for why this yields exactly one
        outcome per entry. Raises PublishRefused when a key it writes is not a stream (then nothing
        was done)."""
        attempt = attempt or uuid.uuid4().hex
        targets = {None: 0, self.results: 1, self.dead: 2}
        keys = [self.stream, self.results, self.dead] + [schema.done_key(self.stream, r.entry_id) for r in records]
        args: list = [self.group, self.dedupe_ttl_s, self.maxlen[self.results], self.maxlen[self.dead]]
        for rec in records:
            fields = [x for kv in (rec.fields or {}).items() for x in kv]
            args += [rec.entry_id, targets[rec.target], rec.fingerprint, schema.marker_value(rec.fingerprint, rec.kind, attempt),
                     len(fields), *fields]
        try:
            numbers = self._run(self._publish, keys, args)
        except redis.ResponseError as err:
            if "USTUDENTS_WRONGTYPE" not in str(err):
                raise
            key = str(err).split("USTUDENTS_WRONGTYPE ", 1)[1]
            raise PublishRefused(f"Redis key {key}: the worker writes results and dead letters there; rename or "
                                 "delete that key (nothing was acknowledged: the frames wait)") from None
        return [records[int(n) - 1] for n in numbers]
