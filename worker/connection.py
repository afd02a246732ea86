"""Reaching Redis: the client, retry with backoff, and whether Redis is reachable now.

The client does no retrying of its own (redis-py's implicit retries would re-send a MULTI/EXEC
whose reply was lost); every caller retries through `Backoff` and reports to `RedisState`, which
drives readiness and counts reconnections.
"""
from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Callable, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .settings import check_redis_url, shown_url

log = logging.getLogger("ustudents.worker")
T = TypeVar("T")

# What "Redis is not there (now)" looks like; anything else from Redis is a bug or a bad setup.
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)
# Redis is there but cannot serve the worker now; each passes without anyone touching the worker:
# a node demoted to replica by a failover (READONLY), a Redis full under noeviction (OOM), a
# replica whose master is down (MASTERDOWN), a cluster slot moving (TRYAGAIN). redis-py gives
# these their own classes; three more come as plain ResponseError and are told by their code: a
# failed RDB save with stop-writes-on-bgsave-error (MISCONF: a full disk), too few replicas for
# min-replicas-to-write (NOREPLICAS), a script past its time limit (BUSY). The worker waits with
# backoff, not ready meanwhile (RedisState.refused).
TRANSIENT_ERRORS = (redis.ReadOnlyError, redis.OutOfMemoryError, redis.exceptions.MasterDownError,
                    redis.exceptions.TryAgainError)
REFUSAL_CODES = ("MISCONF", "NOREPLICAS", "BUSY")


# Redis before 7 reports an error raised inside a script as a generic one, its code buried in the text
# ("Error running script (call to f_...): @user_script:50: ... -READONLY You can't write against a read
# only replica."): a failover would read as a bug and stop the worker. Redis 7 keeps the code in front.
SCRIPT_ERROR_CODES = {"READONLY": redis.ReadOnlyError, "OOM": redis.OutOfMemoryError,
                      "MASTERDOWN": redis.exceptions.MasterDownError, "TRYAGAIN": redis.exceptions.TryAgainError,
                      "LOADING": redis.BusyLoadingError}


def script_error(err: redis.ResponseError) -> redis.ResponseError:
    """`err` as the class of the error Redis raised inside the script, where Redis < 7 wrapped it."""
    # "in", not startswith: a pipeline's error is "Command # 1 (EVALSHA ...) of pipeline caused error: Error ..."
    found = re.search(r": -([A-Z]+) ", str(err)) if "Error running script" in str(err) else None
    cls = SCRIPT_ERROR_CODES.get(found.group(1)) if found else None
    return cls(str(err)) if cls and not isinstance(err, cls) else err


def refusal(err: BaseException) -> bool:
    """Redis answered but refuses for now (TRANSIENT_ERRORS, REFUSAL_CODES): wait, do not fail."""
    if isinstance(err, TRANSIENT_ERRORS):
        return True
    return isinstance(err, redis.ResponseError) and any(code in REFUSAL_CODES for code in error_codes(err))


def error_codes(err: BaseException) -> list[str]:
    """The Redis error codes in `err`'s text: the code leads it, or follows a pipeline's "... of
    pipeline caused error: " or, from Redis < 7, a script's "Error running script ...: -"."""
    return re.findall(r"(?:^|caused error: |: -)([A-Z]+)\b", str(err))


# What each refusal means for a plant, and what ends it: Redis's own text says what, not what to do.
REFUSAL_ADVICE = {
    "READONLY": "the node is a replica now (a failover?): point the URL at the primary, or wait for it",
    "OOM": "Redis is at its memory cap (maxmemory): raise it, or lower USTUDENTS_RESULTS_MAXLEN, USTUDENTS_DEAD_MAXLEN "
           "and the producer's MAXLEN",
    "MASTERDOWN": "the replica's primary is down: bring it back",
    "TRYAGAIN": "a cluster slot is moving: it passes by itself",
    "MISCONF": "Redis cannot save its snapshot (a full disk?): free disk space on the Redis host",
    "NOREPLICAS": "fewer replicas than min-replicas-to-write: bring a replica back",
    "BUSY": "a script runs past its time limit: it passes, or SCRIPT KILL ends it",
}
_ADVICE_OF_CLASS = ((redis.ReadOnlyError, "READONLY"), (redis.OutOfMemoryError, "OOM"),
                    (redis.exceptions.MasterDownError, "MASTERDOWN"), (redis.exceptions.TryAgainError, "TRYAGAIN"))


def refusal_advice(err: BaseException) -> str:
    """What to do about a refusal (refusal(err)), for the log line that reports it; "" if unknown."""
    for cls, code in _ADVICE_OF_CLASS:
        if isinstance(err, cls):
            return REFUSAL_ADVICE[code]
    return next((REFUSAL_ADVICE[c] for c in error_codes(err) if c in REFUSAL_ADVICE), "")


def unblocked(err: redis.ResponseError) -> bool:
    """A blocked XREADGROUP cut short by Redis: the stream was deleted, or a failover demoted the
    node (`UNBLOCKED ...`). The group has to be checked again, and then reading goes on."""
    return str(err).startswith("UNBLOCKED")


def missing_database(client: redis.Redis, err: redis.RedisError) -> str | None:
    """When `err` is the server refusing the database of `client`'s URL (redis-py SELECTs it on
    connecting): "no database 99 (it has 16: 0 to 15)"; else None. The server is reachable then, and
    waiting for it or starting it would not help."""
    if not (isinstance(err, redis.ResponseError) and "DB index is out of range" in str(err)):
        return None
    pool = client.connection_pool
    db = pool.connection_kwargs.get("db", 0)
    # CONFIG GET databases, asked on database 0 (every server has it); managed Redis may disable CONFIG
    probe = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                             **dict(pool.connection_kwargs, db=0)))
    try:
        n = int(probe.config_get("databases")["databases"])
        has = f"it has {n}: 0 to {n - 1}"
    except (redis.RedisError, KeyError, ValueError):
        has = "it does not say how many it has; 16 by default: 0 to 15"
    finally:
        probe.close()
    return f"no database {db} ({has})"


def tls_hint(url: str, err: BaseException) -> str:
    """'; ...' saying what a TLS mismatch looks like from the client, else ''. A plain server given a
    rediss:// URL never answers the handshake (a connect timeout); a TLS server given redis:// resets
    the connection; a certificate signed by a private CA fails verification."""
    text = str(err)
    if url.startswith("rediss://") and "CERTIFICATE_VERIFY_FAILED" in text:
        return ("; the server's certificate is not trusted here: give the CA that signed it in the URL "
                "(?ssl_ca_certs=/path/ca.pem), and the host name the certificate names")
    if url.startswith("rediss://") and "ssl_certfile" not in url and (
            "CERTIFICATE_REQUIRED" in text or "EOF occurred in violation of protocol" in text):
        # TLS 1.3 says so (an alert) on the first read, or cuts the handshake: seen on Redis 7.0
        return ("; the server may require a client certificate: add it and its key to the URL "
                "(&ssl_certfile=/path/client.pem&ssl_keyfile=/path/client.key)")
    if url.startswith("rediss://") and isinstance(err, redis.TimeoutError):
        return "; rediss:// is Redis over TLS: if this server does not use TLS, use redis://"
    if url.startswith("redis://") and "reset by peer" in text:
        return "; if this server takes TLS connections only, use rediss://"
    return ""


def redis_of(client: redis.Redis) -> str:
    """Where a client reads and writes, with the database (a URL may leave it out: 0), no password."""
    kw = client.connection_pool.connection_kwargs
    place = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
    return f"{place} database {kw.get('db', 0)}"


def connect(url: str, password: str | None = None, read_timeout_s: float = 10.0) -> redis.Redis:
    """A client for `url` (redis://, rediss:// with TLS, unix://; a password in the URL or given
    here). Raises ValueError for a malformed URL; connecting happens on first use."""
    check_redis_url(url)
    kwargs = {"password": password} if password else {}
    if not url.startswith("unix://"):  # TCP keepalive notices a dead peer; redis-py refuses it on unix sockets
        kwargs["socket_keepalive"] = True
    try:
        client = redis.Redis.from_url(url, socket_timeout=read_timeout_s, socket_connect_timeout=5.0,
                                      retry=Retry(NoBackoff(), 0), **kwargs)
    except (ValueError, TypeError) as err:  # never the URL as given: it may hold a password
        raise ValueError(f"{shown_url(url)!r}: {err}") from None
    if password:  # it overrides one in the URL, as documented: from_url let the URL's win
        client.connection_pool.connection_kwargs["password"] = password
    return client


class Backoff:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... up to `cap` (each delay drawn from its upper half)."""

    def __init__(self, cap: float = 5.0, base: float = 0.1):
        self.cap, self.base, self.attempt = cap, base, 0

    def delay(self) -> float:
        d = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return d / 2 + random.uniform(0, d / 2)

    def wait(self, interrupt: threading.Event) -> bool:
        """Sleep the next delay; True if `interrupt` was set meanwhile."""
        return interrupt.wait(self.delay())

    def reset(self) -> None:
        self.attempt = 0


def through_outages(call: Callable[[], T], outage: Callable[[str], None], backoff: Backoff, waiting: str,
                    back: str, clock=time, refused: Callable[[BaseException], None] = lambda err: None) -> tuple[T, bool]:
    """call() until Redis takes it: the tools' way through an outage or a refusal that passes (the
    worker's is RedisState). Says "Redis unreachable (error); `waiting`" or "Redis refuses for now
    (error): what to do; `waiting`" once, and "Redis back after N s; `back`" when it goes through;
    `refused(err)` hears each refusal (publish makes room at a memory cap). Returns (call's result,
    whether it had to wait). `clock`: sleep and monotonic (publish paces frames on its own clock)."""
    down_since = None
    while True:
        try:
            result = call()
        except (*UNAVAILABLE, redis.ResponseError) as err:
            unreachable = isinstance(err, UNAVAILABLE)
            # a password changed under a running tool is no outage: no retry gives it the new one
            if not (unreachable or refusal(err)) or password_refused(err):
                raise
            if down_since is None:
                down_since = clock.monotonic()
                outage(f"Redis unreachable ({err}); {waiting}" if unreachable else
                       f"Redis refuses for now ({error_line(err)}): {refusal_advice(err) or 'it passes'}; {waiting}")
            if not unreachable:
                refused(err)
            clock.sleep(backoff.delay())
            continue
        if down_since is not None:
            outage(f"Redis back after {clock.monotonic() - down_since:.1f} s; {back}")
        return result, down_since is not None


def password_refused(err: BaseException) -> bool:
    """Redis refuses the password (set or changed on a running Redis): redis-py raises some of these
    as a ConnectionError, which would read as an outage."""
    return isinstance(err, redis.AuthenticationError) or any(code in str(err) for code in ("NOAUTH", "WRONGPASS"))


def error_line(err: BaseException) -> str:
    """Redis's error without the command a pipeline echoes before it ("Command # 1 (SET key <the
    frame's bytes>) of pipeline caused error: OOM ..."): the bytes of a frame are no message."""
    text = str(err)
    return text.split(" of pipeline caused error: ", 1)[-1]


class RedisState:
    """Reachable or not, as last seen by any thread; logs each transition once (no per-retry spam).

    Apart from that, which operations Redis refuses (`refused`: reachable, but a write refused for
    now, e.g. OOM at its memory cap): others still succeed then, so only the refused operation's own
    success (`accepted`) ends it. The worker is not ready while either holds."""

    def __init__(self, on_change: Callable[[bool], None] = lambda up: None,
                 on_reconnect: Callable[[], None] = lambda: None, url: str = ""):
        self._lock = threading.Lock()
        self.url = url  # for the TLS hint only
        self.up: bool | None = None  # None: not tried yet
        self.password_refused = False  # down because Redis refuses the worker's password (NOAUTH, WRONGPASS)
        self.reached = False  # ever reachable: only then is coming back a reconnect
        self.down_since = 0.0
        self.refusing: dict[str, str] = {}  # stage -> Redis' error
        self.refused_since = 0.0
        self._on_change, self._on_reconnect = on_change, on_reconnect

    def ok(self) -> None:
        if self.up is True:
            return
        with self._lock:
            was, reached, self.up, self.reached = self.up, self.reached, True, True
            self.password_refused = False
        if was is False and reached:
            self._on_reconnect()
            log.info("redis reachable again after %.1f s", time.monotonic() - self.down_since,
                     extra={"event": "redis_up", "down_s": round(time.monotonic() - self.down_since, 3)})
        elif was is False:  # unreachable from the start: a first contact, not a reconnect
            log.info("redis reachable after %.1f s", time.monotonic() - self.down_since,
                     extra={"event": "redis_up", "down_s": round(time.monotonic() - self.down_since, 3)})
        elif was is None:
            log.info("redis reachable", extra={"event": "redis_up"})
        self._on_change(True)

    def failed(self, err: BaseException) -> None:
        # redis-py raises a refused password as a ConnectionError: a password set on a running Redis
        # read as an outage for as long as it lasted, with no word of the password
        refused = password_refused(err)
        if self.up is False and refused == self.password_refused:
            return
        with self._lock:
            if self.up is not False:
                self.down_since = time.monotonic()
            self.up, self.password_refused = False, refused
        if refused:
            log.warning("redis refuses the worker's password (%s); not ready, retrying with backoff: give the password "
                        "in the URL or USTUDENTS_REDIS_PASSWORD and restart the worker", err,
                        extra={"event": "redis_auth", "error": str(err)})
        else:
            log.warning("redis unreachable (%s%s); not ready, retrying with backoff", err, tls_hint(self.url, err),
                        extra={"event": "redis_down", "error": str(err)})
        self._on_change(False)

    def refused(self, stage: str, err: BaseException) -> None:
        """Redis refused `stage` (one of the reader's operations, the publisher) for now; its warning is
        the caller's."""
        with self._lock:
            first = not self.refusing
            if first:
                self.refused_since = time.monotonic()
            # what /readyz says: Redis' error (without the command a pipeline echoes before it) and what
            # ends it, as the log line does
            advice = refusal_advice(err)
            self.refusing[stage] = error_line(err) + (f": {advice}" if advice else "")
        if first:
            self._on_change(False)

    def accepted(self, stage: str) -> None:
        """A call of `stage` went through: whatever refusal it had is over."""
        if stage not in self.refusing:
            return
        with self._lock:
            cleared = set(self.refusing) == {stage}
            if cleared:  # said before readiness shows it: whoever sees the worker ready finds the line logged
                took = time.monotonic() - self.refused_since
                log.info("redis takes the worker's writes again after %.1f s", took,
                         extra={"event": "redis_accepts", "refused_s": round(took, 3)})
            self.refusing.pop(stage, None)
        if cleared:
            self._on_change(True)
