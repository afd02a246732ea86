"""Commands of the worker room: `ustudents worker` (= `ustudents-worker`), `publish`, `results`.

Every expected failure (no such model, damaged bundle, bad setting, malformed Redis URL, metrics
port taken) is one line naming what and how to fix it, exit code 2. Redis being unreachable is not
one of them for the worker: it retries with backoff and reports not-ready meanwhile.
"""
from __future__ import annotations

import errno
import faulthandler
import functools
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import click
import redis
from dotenv import dotenv_values
from pydantic import ValidationError

from ustudents.engines.cli import (CONTEXT_SETTINGS, InputError, PathArg, check_output, check_outside_bundles,
                                   stop_signals_as_ctrl_c)
from ustudents.engines.cli import user_errors as engine_errors
from ustudents.engines.runtime import BACKENDS, PRECISIONS

from .settings import (ENV_PREFIX, MAX_COUNT, MAX_S, ToolSettings, WorkerSettings, check_env_file, check_name,
                       flag_name, shown_url, unknown_variables)


def user_errors(fn):
    """The engines room's one-line errors (bundle, engine, image, value errors), plus bad settings."""
    @functools.wraps(fn)
    def settings_errors(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValidationError as err:
            raise InputError(settings_error(err)) from None
    return engine_errors(settings_errors)


def settings_error(err: ValidationError) -> str:
    """Pydantic's report as one line: which flag/variable, and what is wrong with it."""
    parts = []
    for e in err.errors():
        field = str(e["loc"][0]) if e["loc"] else "settings"
        msg = "required" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        # pydantic's own checks do not say what they were given (ours do); never a password or a URL,
        # which may hold one
        if e["type"] not in ("missing", "value_error") and isinstance(given, (str, int, float)) \
                and field not in ("redis_password", "redis_url"):
            msg += f" (given: {given!r})" if isinstance(given, str) else f" (given: {given})"
        parts.append(f"{flag_name(field, worker_flags())}: {msg}")
    return "; ".join(parts)


def worker_flags() -> set[str]:
    """The settings `ustudents worker` has a flag for (the others are set by variable or .env only)."""
    return {p.name for p in worker_cmd.params}


def tool_client(redis_url: str | None) -> redis.Redis:
    """A checked client for publish/results: Redis must answer now (one-line error otherwise)."""
    from .connection import connect, missing_database, tls_hint

    check_env_file(".env")
    # "" is a value (an unset $VAR in a script), refused as a URL, not taken as "no URL given"
    settings = ToolSettings(**({"redis_url": redis_url} if redis_url is not None else {}))
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    client = connect(settings.redis_url, password)
    try:
        client.ping()
    except redis.AuthenticationError as err:
        raise InputError(f"Redis at {shown_url(settings.redis_url)}: {err}; give the password in the URL or "
                         f"{ENV_PREFIX}REDIS_PASSWORD") from None
    except redis.RedisError as err:
        if missing := missing_database(client, err):
            raise InputError(f"Redis at {shown_url(settings.redis_url)} answers, but has {missing}; give one it has "
                             "in --redis-url (redis://HOST:PORT/0)") from None
        raise InputError(f"cannot reach Redis at {shown_url(settings.redis_url)} ({err}"
                         f"{tls_hint(settings.redis_url, err)}); start it or pass --redis-url") from None
    return client



# The ACL categories of the commands the worker runs: its streams, done markers (strings), attempt
# counts (hashes), TTLs and deletes (keyspace), its Lua scripts, MULTI/EXEC, PING; and TIME, Redis's
# clock, which the end-to-end latency is measured on.
ACL_NEEDED = "+@stream +@string +@hash +@keyspace +@scripting +@transaction +@connection +time"


def eviction_policy(client: redis.Redis) -> str | None:
    """Redis' maxmemory-policy where it evicts keys (a memory cap set, a policy other than
    noeviction), else None; None too where CONFIG is not allowed (a managed Redis, a user without
    @admin): nothing is known then."""
    try:
        config = client.config_get("maxmemory*")  # str keys and values (redis-py decodes CONFIG GET's)
    except redis.ResponseError:
        return None
    policy = config.get("maxmemory-policy")
    return policy if int(config.get("maxmemory") or 0) > 0 and policy not in (None, "noeviction") else None


def is_cluster_error(err: redis.ResponseError) -> bool:
    """What a Redis Cluster node answers for a key of another node's slot (MOVED, ASK), a slot no node
    serves (CLUSTERDOWN), or keys of several slots in one call (CROSSSLOT). Not MASTERDOWN, which redis-py
    files under CLUSTERDOWN: a replica of a standalone Redis that lost its primary says it too."""
    return (isinstance(err, (redis.exceptions.ClusterDownError, redis.exceptions.AskError,
                             redis.exceptions.ClusterCrossSlotError))
            and not isinstance(err, redis.exceptions.MasterDownError))


def cluster_refused(settings: WorkerSettings) -> str:
    """Why a Redis Cluster is refused. Its hash slots spread a line's keys over nodes: the first look at
    them read "Hash slot not served" (or MOVED) as if Redis were broken, and a node holding them all
    refuses the publish script (CROSSSLOT)."""
    from . import schema

    return (f"Redis at {shown_url(settings.redis_url)} is a Redis Cluster node, which ustudents does not support: "
            f"a frame's result, its done marker and its acknowledgement are written in one script, over keys "
            f"({settings.stream}, {schema.results_stream(settings.stream)}, {settings.stream}:done:...) that a "
            "cluster spreads over nodes; use a standalone Redis (one primary, which may have replicas)")


def cluster_enabled(client: redis.Redis) -> bool:
    """Whether this Redis is a node of a Redis Cluster (INFO cluster); False where INFO is not allowed."""
    try:
        return int(client.info("cluster").get("cluster_enabled", 0)) == 1
    except redis.ResponseError:
        return False


def check_redis_setup(settings: WorkerSettings) -> bool:
    """What would make the worker fail however long it retried, found before the model loads:
    a wrong password, a database index Redis does not have, a Redis Cluster, a key of the stream's
    that is not a stream, a Redis user not allowed the commands the worker runs (ACL), a second
    consumer group of ustudents workers (schema.groups_key; another program's group is its own).
    Redis being unreachable is not among them: False then (the worker waits for it, and runs these
    checks at first contact: Worker.setup_check); True once checked."""
    from . import schema
    from .connection import UNAVAILABLE, connect, missing_database, refusal
    from .streams import SCRIPTS, text_of

    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    client = connect(settings.redis_url, password)
    try:
        if cluster_enabled(client):
            raise InputError(cluster_refused(settings))
        pipe = client.pipeline(transaction=False)
        keys = [settings.stream, schema.results_stream(settings.stream), schema.dead_stream(settings.stream)]
        for key in keys:
            pipe.type(key)
        kinds = [text_of(k) for k in pipe.execute()]
        groups = [text_of(g["name"]) for g in (client.xinfo_groups(settings.stream) if kinds[0] == "stream" else [])]
        named = {text_of(g) for g in client.hkeys(schema.groups_key(settings.stream))} if groups else set()
        # Workers from before groups_key named none: on a stream they served (it has results) every group
        # counts as theirs, as they took it (a rollout changing USTUDENTS_GROUP beside them is refused)
        ours = named or (set(groups) if kinds[1] == "stream" else set())
        # One command of each kind the worker writes with, on a scratch key of the stream's (so that an
        # ACL key pattern applies), gone at once: a user without them passed this check, then crashed
        # on its first frame, and on every restart.
        scratch = f"{settings.stream}:access-check:{settings.consumer}"
        try:
            pipe = client.pipeline(transaction=False)
            for script in SCRIPTS:
                pipe.script_load(script)
            pipe.time()
            pipe.execute()
            pipe = client.pipeline(transaction=True)  # MULTI/EXEC, as the worker's own pipelines
            pipe.set(scratch, 1, px=1000).strlen(scratch).get(scratch).exists(scratch)  # and an image_key's reads
            pipe.hsetnx(f"{scratch}:h", "f", 1).expire(f"{scratch}:h", 1)
            pipe.delete(scratch, f"{scratch}:h")
            pipe.execute()
        except redis.ResponseError as err:
            if not refusal(err):
                raise
            # full, a replica, a failed snapshot: the worker waits it out, not ready (its writes then
            # meet the permissions)
        if evicting := eviction_policy(client):
            logging.getLogger("ustudents.worker").warning(
                "Redis at %s evicts keys at its memory cap (maxmemory-policy %s): frames waiting, the done markers "
                "that keep results to one per frame, attempt counts and name holds (volatile-*: the keys with a "
                "TTL) may vanish, losing frames or scoring them twice; set maxmemory-policy noeviction (at the cap "
                "the worker waits, not ready, and the camera's writes are refused)", shown_url(settings.redis_url),
                evicting, extra={"event": "redis_evicts", "policy": evicting})
    except redis.exceptions.NoPermissionError as err:
        raise InputError(f"Redis at {shown_url(settings.redis_url)}: the user may not run what the worker needs ({err}); "
                         f"allow it {ACL_NEEDED} on the stream's keys ({settings.stream}*)") from None
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as err:
        raise InputError(f"Redis at {shown_url(settings.redis_url)} refused the worker ({err}); give the password in the URL or "
                         f"{ENV_PREFIX}REDIS_PASSWORD, and a user allowed {ACL_NEEDED}") from None
    except UNAVAILABLE:
        return False  # not up yet: the worker retries with backoff and reports not-ready meanwhile
    except redis.ResponseError as err:
        if is_cluster_error(err):  # a user not allowed INFO (the worker's ACL) finds the cluster here
            raise InputError(cluster_refused(settings)) from None
        if missing := missing_database(client, err):
            raise InputError(f"Redis at {shown_url(settings.redis_url)} answers, but has {missing}; give one it has in "
                             "the URL (redis://HOST:PORT/0)") from None
        raise InputError(f"Redis at {shown_url(settings.redis_url)}: {err}") from None
    finally:
        client.close()
    others = [g for g in groups if g != settings.group and g in ours]
    if others:
        # results and done markers are per stream: a second group's frames would find the first
        # group's markers and be acknowledged without a result of their own
        raise InputError(f"stream {settings.stream} already has consumer group {', '.join(others)} of ustudents "
                         f"workers; ustudents serves one group per stream: start this worker with --group {others[0]}, "
                         f"or, if no worker uses that group any more, remove it with "
                         f"XGROUP DESTROY {settings.stream} {others[0]}")
    if foreign := [g for g in groups if g != settings.group]:
        # an archiver's or a second system's own reading: it stopped the line at the next restart
        logging.getLogger("ustudents.worker").info(
            "stream %s also has consumer group %s, which no ustudents worker reads with: another program's, "
            "reading the frames on its own beside group %s", settings.stream, ", ".join(foreign), settings.group,
            extra={"event": "other_groups", "groups": foreign})
    for key, kind in zip(keys, kinds):
        if kind not in ("stream", "none"):
            raise InputError(f"Redis key {key} holds a {kind}, not a stream; the worker reads frames from "
                             f"{settings.stream} and writes to {keys[1]} and {keys[2]}: rename or delete that key, "
                             "or choose another --stream")
    return True


def setup_check_at_first_contact(settings: WorkerSettings):
    """check_redis_setup for a Redis first reached after the start (Worker.setup_check)."""
    from .service import SetupRefused

    def check() -> bool:
        try:
            return check_redis_setup(settings)
        except InputError as err:
            raise SetupRefused(err.format_message()) from None
    return check


redis_url_option = click.option("--redis-url", default=None,
                                help=f"redis://HOST:PORT/DB, rediss://... or unix://PATH.  [default: {ENV_PREFIX}REDIS_URL or "
                                     "redis://127.0.0.1:6379/0]")


@click.command("worker", short_help="Serve models on a Redis stream.")
@click.option("--stream", default=None, help="Input stream, e.g. line1 (results: <stream>:results).  [required: this "
                                             "or USTUDENTS_STREAM]")
@click.option("--model", multiple=True, type=PathArg(path_type=Path),
              help="Model bundle directory; repeat to serve several categories (chosen by each frame's `category`). "
                   "Each value is one directory, commas included.  [required: this or USTUDENTS_MODEL]")
@redis_url_option
@click.option("--group", default=None, help="Consumer group shared by the workers of a stream.  [default: ustudents]")
@click.option("--consumer", default=None, help="This worker's name in the group.  [default: HOSTNAME-PID]")
@click.option("--batch", type=int, default=None, help="Frames per micro-batch.  [default: 8]")
@click.option("--backend", type=click.Choice(("auto",) + BACKENDS), default=None, help="Inference backend.  [default: auto]")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.  [default: auto]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Network precision.  [default: the backend's; torch on a CPU: the one the bundle was calibrated in "
                   "where the CPU runs it natively, else fp32]")
@click.option("--metrics-port", type=int, default=None, help="Port of /metrics, /healthz, /readyz; 0 = off.  [default: 9108]")
@click.option("--claim-idle-ms", type=int, default=None,
              help="Claim entries pending this long on a silent consumer.  [default: 60000]")
@click.option("--max-deliveries", type=int, default=None, help="Dead-letter a frame that fails, or kills its worker, this often.  [default: 3]")
@click.option("--max-frame-bytes", type=int, default=None, help="Dead-letter larger encoded frames, in bytes.  [default: 33554432 (32 MiB)]")
@click.option("--results-maxlen", type=int, default=None, help="MAXLEN ~ of <stream>:results.  [default: 100000]")
@click.option("--shutdown-timeout-s", type=float, default=None,
              help="SIGTERM: time to finish and publish the batches in flight.  [default: 30]")
@click.option("--heatmap/--no-heatmap", default=None, help="Add a heatmap overlay PNG to each result.  [default: off]")
@click.option("--log-json/--no-log-json", default=None, help="One JSON object per log line.  [default: off]")
@click.option("--env-file", type=PathArg(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"Read {ENV_PREFIX}* settings from this file.  [default: ./.env]")
@click.pass_context
@user_errors
def worker_cmd(ctx, env_file, **flags):
    """Serve model bundles on a Redis stream: frames in; scores, masks and dead letters out.

    Every setting can also come from an environment variable USTUDENTS_<NAME> (e.g.
    USTUDENTS_CLAIM_IDLE_MS) or a .env file; flags win. Settings without a flag: redis_password,
    block_ms, reap_idle_s, max_failures_in_row, dead_maxlen, dead_image_max_bytes, dedupe_ttl_s,
    backoff_max_s, decode_threads, queue_batches, inflight_mb, metrics_host, stats_interval_s, log_interval_s, log_level,
    stall_timeout_s.
    """
    from .logs import setup_logging
    from .metrics import starting
    from .service import Worker, load_engines

    values = {k: v for k, v in flags.items() if v is not None and v != ()}
    if "model" in values:
        values["model"] = [str(p) for p in values["model"]]  # a list: a comma in a directory's name is kept
    check_env_file(env_file or ".env")
    settings = WorkerSettings(_env_file=env_file or ".env", **values)
    setup_logging(settings.log_level, settings.log_json)
    print_stacks_on_sigusr1()
    env_path = Path(env_file or ".env")
    unknown = unknown_variables([*os.environ, *(dotenv_values(env_path) if env_path.is_file() else ())])
    if unknown:
        logging.getLogger("ustudents.worker").warning(
            "%s: not a setting of the worker, ignored (misspelt? the settings: ustudents worker --help, README "
            "'Settings')", ", ".join(unknown))
    checked = check_redis_setup(settings)
    server = None
    if settings.metrics_port:
        try:
            server = starting(settings.stream, settings.metrics_host, settings.metrics_port, "loading the models")
        except OSError as err:
            if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:  # the host, not the port
                raise InputError(f"{flag_name('metrics_host', worker_flags())} {settings.metrics_host}: cannot listen "
                                 f"there ({err.strerror or err}); give an address of this machine (0.0.0.0: all of "
                                 "them)") from None
            raise InputError(f"--metrics-port {settings.metrics_port}: cannot listen on {settings.metrics_host}:"
                             f"{settings.metrics_port} ({err.strerror or err}); choose a free port, or 0 for no metrics") from None
    try:
        with stop_signals_as_ctrl_c():  # minutes on a GPU's first start; Worker.run handles them from then on
            engines = load_engines(settings)
        worker = Worker(settings, engines, server=server,
                        setup_check=None if checked else setup_check_at_first_contact(settings))
    except BaseException:
        if server:
            server.stop()
        raise
    code = worker.run()
    if any(t.is_alive() for t in worker.threads):
        # The deadline passed with a stage still busy, maybe inside the networks' native code:
        # finalizing the interpreter under it aborts the process (SIGABRT, not the exit code).
        # Leave at once; what the worker held stays pending for another worker.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    ctx.exit(code)


def print_stacks_on_sigusr1() -> None:
    """A view into a worker that hangs, where no debugger is: `kill -USR1 PID` prints every thread's
    stack to the process's stderr and the worker goes on (README runbook). From a Python handler, run
    in the main thread with the GIL held: faulthandler.register's own handler reads the threads from C
    at any moment, and one ending meanwhile (a thread per /healthz request) crashed the process."""
    if sys.__stderr__ is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: faulthandler.dump_traceback(sys.__stderr__, all_threads=True))


MIN_FPS = 1e-3  # one frame in 1000 s; slower is a typo, and 1e-300 overflowed the pacing clock


def usable_fps(fps: float) -> bool:
    """A camera stand-in's rate: 0 (as fast as possible) or from MIN_FPS (publish, and the demo's line)."""
    return fps == 0 or MIN_FPS <= fps < math.inf  # NaN is neither


def read_by_none(client: redis.Redis, stream: str) -> bool:
    """Whether no consumer group reads the stream (it has none, or there is no stream yet); False
    where Redis cannot say (away: publish holds the frame; a user not allowed XINFO)."""
    try:
        return not client.xinfo_groups(stream)
    except redis.ResponseError as err:
        return "no such key" in str(err).lower()
    except redis.RedisError:
        return False


def not_a_stream(client: redis.Redis, stream: str) -> str | None:
    """The error for a --stream whose key holds another type (a string, a list), else None: Redis'
    WRONGTYPE read as "Redis stopped taking frames"."""
    from .streams import text_of

    try:
        kind = text_of(client.type(stream))
    except redis.RedisError:
        return None  # Redis away: publish holds the frame until it is back
    if kind in ("stream", "none"):
        return None
    return (f"Redis key {stream} holds a {kind}, not a stream, so no frame can be written to it; rename or delete "
            "that key, or choose another --stream")


def checked_stream(stream: str) -> str:
    """--stream of the tools: a name the worker accepts (publishing to one it refuses loses the frames),
    else one line (InputError), as the tools' other refusals, not Click's usage text."""
    try:
        return check_name(stream, stream=True)
    except ValueError as err:
        raise InputError(f"--stream: {err}") from None


@click.command("publish", short_help="Camera stand-in: send frames to a stream.")
@click.argument("source")
@click.option("--stream", required=True, help="Stream to write, e.g. line1.")
@click.option("--fps", type=click.FloatRange(min=0), default=10.0, show_default=True, help="Frames per second; 0 = as fast as possible.")
@click.option("--loop", is_flag=True, help="Start the folder or video again at its end.")
@click.option("--count", type=click.IntRange(min=0, max=MAX_COUNT), default=0, show_default=True,
              help="Stop after this many frames; 0 = all. A source that ends first ends the run, with a note (--loop "
                   "repeats it).")
@click.option("--camera", default=None, help="`camera` field.  [default: the source's name]")
@click.option("--category", default=None, help="`category` field: the model, where a worker serves several.")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg"]), default="png", show_default=True,
              help="Encoding of video and camera frames (image files are sent as they are).")
@click.option("--maxlen", type=click.IntRange(min=0, max=MAX_COUNT), default=10_000, show_default=True,
              help="MAXLEN ~ of the input stream; keep it above the largest backlog workers may have. 0 = no cap.")
@click.option("--inline-max", type=click.IntRange(min=0, max=MAX_COUNT), default=1 << 20, show_default=True,
              help="Larger frames go under their own key (image_key) instead of inline.")
@click.option("--key-ttl-s", type=click.IntRange(min=1, max=int(MAX_S)), default=3600, show_default=True,
              help="TTL of those keys.")
@redis_url_option
@user_errors
def publish_cmd(source, stream, fps, loop, count, camera, category, fmt, maxlen, inline_max, key_ttl_s, redis_url):
    """Camera stand-in: write frames from SOURCE (image folder, video file or camera index) to a stream."""
    from .connection import error_line, password_refused, redis_of
    from .publish import FramePublisher, frames_from, publish

    if not source.strip():  # "" (an unset variable in a script) would read the current folder
        raise InputError("SOURCE: empty (an unset variable in a script?); give an image folder, a video file "
                         "or a camera index")
    stream = checked_stream(stream)
    if not usable_fps(fps):
        raise InputError(f"--fps {fps}: give 0 (as fast as possible) or a rate from {MIN_FPS} frames/s")
    # the source is checked before Redis is reached; Redis' value limit is asked at the first frame, below
    frames = frames_from(source, fmt, loop, warn=lambda message: click.echo(message, err=True),
                         max_bytes=lambda: publisher.largest_frame())
    client = tool_client(redis_url)
    name = camera or (f"camera{source}" if source.isdigit() else Path(source).stem or "camera")
    publisher = FramePublisher(client, stream, camera=name, category=category, maxlen=maxlen,
                               inline_max=inline_max, key_ttl_s=key_ttl_s)
    start = time.monotonic()
    try:
        if wrong := not_a_stream(client, stream):
            raise InputError(wrong)
        if read_by_none(client, stream):
            # a typo in --stream, or another database than the workers': published, and read by no one
            click.echo(f"note: no worker has read {stream} at Redis {redis_of(client)} yet (no consumer group): its "
                       "frames wait there for a worker started with this --stream and Redis database; where the "
                       "line's workers run, one of the two differs", err=True)
        with stop_signals_as_ctrl_c():  # `timeout`, `docker stop`, systemd: the count is printed as on Ctrl-C
            sent = publish(frames, publisher, fps=fps, count=count,
                           progress=lambda k, t: click.echo(f"{k} frames in {t:.0f} s ({k / t:.1f}/s)", err=True),
                           outage=lambda message: click.echo(message, err=True))
        if count and sent < count:  # the source ended first (--count only stops)
            click.echo(f"{source}: ended after {sent} of the {count} frames --count asks for"
                       + ("" if loop else " (--loop starts it again at its end)"), err=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C: the frames sent so far are reported below
    except redis.RedisError as err:
        wrong = "WRONGTYPE" in str(err) and not_a_stream(client, stream)  # the key replaced meanwhile
        if password_refused(err):
            wrong = (f"stream {stream}: Redis refuses the password now ({error_line(err)}): it was set or changed "
                     f"while publishing; give the current one in the URL or {ENV_PREFIX}REDIS_PASSWORD and publish again")
        raise InputError(wrong or f"stream {stream}: Redis stopped taking frames ({error_line(err)})") from None
    finally:  # also before an error: what was sent is in the stream, and a rerun sends it again
        elapsed = time.monotonic() - start
        n = publisher.sent  # not publish()'s count, which Ctrl-C leaves unreturned
        click.echo(f"published {n} frames to {stream} in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.1f}/s)")


@click.command("results", short_help="Follow a stream's results and dead letters.")
@click.option("--stream", required=True, help="Input stream whose results to follow, e.g. line1.")
@click.option("--save", "save_to", type=PathArg(path_type=Path), default=None,
              help="Write <frame>_<entry id>_mask.png and <frame>_<entry id>_overlay.png here.")
@click.option("--from-start", is_flag=True, help="Begin with the oldest kept result instead of new ones.")
@click.option("--count", type=click.IntRange(min=0, max=MAX_COUNT), default=0, show_default=True,
              help="Exit after this many frames; 0 = follow forever.")
@redis_url_option
@user_errors
def results_cmd(stream, save_to, from_start, count, redis_url):
    """Follow <stream>:results and <stream>:dead: one line per frame."""
    from . import schema
    from .connection import redis_of
    from .results import SaveFailed, check_save_folder, follow

    stream = checked_stream(stream)
    check_output(save_to, "--save", folder=True)
    check_outside_bundles(save_to, "--save")
    if save_to is not None:
        check_save_folder(save_to)
    client = tool_client(redis_url)
    try:
        if not client.exists(schema.results_stream(stream), schema.dead_stream(stream)):
            # it waited in silence: a typo in --stream, or another database than the workers'
            click.echo(f"waiting: no worker has published an outcome of {stream} at Redis {redis_of(client)} yet "
                       f"({schema.results_stream(stream)} and {schema.dead_stream(stream)} do not exist); check "
                       "--stream and the Redis database if the line's workers run", err=True)
        with stop_signals_as_ctrl_c():  # a picture being saved is finished or left out whole, as on Ctrl-C
            follow(client, stream, click.echo, from_start=from_start, count=count, save_to=save_to,
                   outage=lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        pass
    except SaveFailed as err:
        raise InputError(str(err)) from None
    except redis.ResponseError as err:
        if "WRONGTYPE" not in str(err):
            raise InputError(f"stream {stream}: Redis refused the read ({err})") from None
        try:  # the input stream too, read for --save's overlays: name the key that is not a stream
            wrong = [k for k in (schema.results_stream(stream), schema.dead_stream(stream), stream)
                     if client.type(k) not in (b"stream", b"none")]
        except redis.RedisError:
            wrong = []
        named = " and ".join(wrong) if wrong else f"{stream}:results, {stream}:dead or {stream}"
        raise InputError(f"stream {stream}: {named} {'is a Redis key' if len(wrong) == 1 else 'are Redis keys'} of "
                         "another type, not a stream; check --stream (and that nothing else writes those keys)") from None
    except redis.RedisError as err:
        raise InputError(f"stream {stream}: lost Redis ({err}); run the command again") from None


COMMANDS = (worker_cmd, publish_cmd, results_cmd)


def worker_main() -> None:
    """`ustudents-worker` = `ustudents worker`."""
    worker_cmd(prog_name="ustudents-worker", **CONTEXT_SETTINGS)
