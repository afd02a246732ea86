"""Check a running stack end to end: Redis, the workers, Prometheus, the alert rules, the dashboard.

    python deploy/check_stack.py [--redis-url redis://127.0.0.1:6379/0] [--prometheus http://127.0.0.1:9090]
                                 [--stream line1] [--group ustudents] [--watch 30] [--json FILE]

Run it from the repo against a stack that is up (compose, k8s with port-forwards, or processes).
It watches the stream for `--watch` seconds, then prints one line per check and exits 1 if any
failed. The checks:
  - stream: the consumer group exists and has consumers; results arrive during the watch;
  - accounting: every input entry the group has been handed and acknowledged has exactly one
    result or dead letter (where results were trimmed, MAXLEN, only the entries added after the
    oldest kept result was written are checked);
  - targets: Prometheus scrapes every worker and each is up and ready;
  - rules: every alert of deploy/prometheus/alerts.yml is loaded and evaluates without error;
  - dashboard: every query of the Grafana dashboard evaluates on this Prometheus; the panels that
    only a GPU, a failure or a restart fills may be empty, and the lag where Redis cannot tell it
    (the workers then withdraw the gauge); any other empty query fails.
It needs Redis 7 or later (the streams' entries-added and the group's lag); before it, one line, exit 2.
`--json FILE` replaces only an earlier report of this script; it is checked before the watch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
import yaml

from ustudents.engines.files import os_error_line, real_path, write_atomically
from ustudents.worker import schema
from ustudents.worker.connection import connect
from ustudents.worker.settings import ENV_PREFIX, REDIS_SCHEMES, shown_url
from ustudents.worker.schema import dead_stream, results_stream

DEPLOY = Path(__file__).resolve().parent
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ustudents.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
WORKER_JOB = "ustudents-worker"
# Metrics that stay empty on a healthy CPU stack: no GPU, no bad frame, no Redis outage yet.
MAY_BE_EMPTY = ("ustudents_gpu_memory_bytes", "ustudents_frames_dead_lettered_total",
                "ustudents_frame_failures_total", "ustudents_redis_reconnects_total")
LAG_UNKNOWN = "it restarted during a backlog, redis/redis#10569; back once the group catches up"
ACCOUNT_LAST = 5000  # newest results (and dead letters), and newest input entries, the accounting reads
INPUT_PAGE = 50  # input entries carry their frames (up to MiBs each): read a page at a time, ids kept
ENTRY_ID = schema.ENTRY_ID.encode()  # the input entry a result or dead letter answers
READS = (ALERTS, DASHBOARD, Path(__file__).resolve())  # files --json must never replace
REPORT_KEYS = {"time", "machine", "checks"}  # what marks a file as an earlier report (the oldest too)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def grafana_query(expr: str, stream: str = ".*", rate_interval: str = "1m") -> str:
    """A panel target's PromQL with Grafana's variables filled in as Grafana would: `stream` the line
    selected (".*": all of them), `rate_interval` the range."""
    return expr.replace("$stream", stream).replace("$__rate_interval", rate_interval)


def dashboard_queries(dashboard: dict, rate_interval: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, for "all streams" and a short range."""
    return [(panel["title"], grafana_query(target["expr"], rate_interval=rate_interval))
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_names(rules_yaml: dict) -> list[str]:
    return [r["alert"] for g in rules_yaml["groups"] for r in g["rules"] if "alert" in r]


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def unaccounted(inputs: list[str], outputs: list[str], pending: set[str], last_delivered: str,
                since: str | None = None) -> tuple[set, set]:
    """(missing, duplicated) entry ids: input entries the group was handed (id <= last delivered),
    no longer pending and, when outputs were trimmed, at least `since`, that have no output or more
    than one."""
    last, first = entry_key(last_delivered), entry_key(since) if since else (0, 0)
    handled = {i for i in inputs if first <= entry_key(i) <= last and i not in pending}
    seen: dict[str, int] = {}
    for o in outputs:
        seen[o] = seen.get(o, 0) + 1
    return handled - set(seen), {o for o, n in seen.items() if n > 1}


def input_ids(r: redis.Redis, stream: str, since: str | None, last: str) -> list[str]:
    """Ids of the input entries from `since` (or the first) to `last`, newest first, at most
    ACCOUNT_LAST: a page at a time, since a whole stream of frames in one reply can be GBs."""
    ids: list[str] = []
    newest = last
    while len(ids) < ACCOUNT_LAST:
        page = r.xrevrange(stream, max=newest, min=since or "-", count=min(INPUT_PAGE, ACCOUNT_LAST - len(ids)))
        ids += [i.decode() for i, _ in page]
        if len(page) < INPUT_PAGE:
            break
        newest = f"({ids[-1]}"  # exclusive (Redis 6.2+): the page after the last one read
    return ids


def prometheus(base: str, path: str, **params) -> dict:
    url = f"{base.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body.get('error', body)}")
    return body["data"]


def no_group(r: redis.Redis, stream: str, group: str) -> str | None:
    groups = [g["name"].decode() for g in r.xinfo_groups(stream)] if r.exists(stream) else []
    return None if group in groups else f"no consumer group {group!r} on stream {stream!r}: is a worker running?"


def check_flow(r: redis.Redis, stream: str, group: str, watch_s: float) -> Check:
    if problem := no_group(r, stream, group):
        return Check("stream", False, problem)
    # idle: since the consumer last read; one idle for minutes with nothing pending is a worker gone
    consumers = [f"{c['name'].decode()} idle {c['idle'] / 1000:.0f} s" for c in r.xinfo_consumers(stream, group)]

    def added() -> int:
        return r.xinfo_stream(results_stream(stream))["entries-added"] if r.exists(results_stream(stream)) else 0

    before = added()
    time.sleep(watch_s)
    n = added() - before
    lag = lag_of(r, stream, group)
    return Check("stream", bool(consumers) and n > 0,
                 f"group {group!r}: {len(consumers)} consumers ({', '.join(consumers)}); "
                 f"{n} results in {watch_s:.0f} s ({n / watch_s:.2f}/s); lag "
                 + (str(lag) if lag is not None else f"unknown to Redis ({LAG_UNKNOWN})"))


def lag_of(r: redis.Redis, stream: str, group: str) -> int | None:
    return next((g["lag"] for g in r.xinfo_groups(stream) if g["name"].decode() == group), None)


def check_accounting(r: redis.Redis, stream: str, group: str) -> Check:
    if problem := no_group(r, stream, group):
        return Check("accounting", False, problem)
    # One MULTI/EXEC: a consistent snapshot, so an entry acknowledged while we read is not missed.
    # Only the newest outputs are read (results carry their mask PNG).
    pipe = r.pipeline(transaction=True)
    pipe.xinfo_groups(stream).xpending_range(stream, group, "-", "+", 100000)
    for out in (results_stream(stream), dead_stream(stream)):
        if r.exists(out):  # a stream nobody wrote to yet (often the dead letters) does not exist
            pipe.xrevrange(out, count=ACCOUNT_LAST).xlen(out).xinfo_stream(out)
    info, pending, *outs = pipe.execute()
    last = next(g["last-delivered-id"].decode() for g in info if g["name"].decode() == group)
    outputs, since = [], None
    for kept, length, meta in zip(outs[0::3], outs[1::3], outs[2::3]):
        outputs += [f[ENTRY_ID].decode() for _, f in kept if ENTRY_ID in f]
        if kept and (len(kept) < length or meta["entries-added"] > length):  # older ones not read or trimmed
            # Outputs are written as frames finish, not in input order: with two workers, inputs newer
            # than the one the oldest kept output answers can have had theirs trimmed already. So cut at
            # that output's own id, its write time (input and output ids are both this Redis' clock): an
            # input added after it was answered after it, so its output is kept. Not its millisecond:
            # an input of the same millisecond may have come before it.
            cut = f"{entry_key(kept[-1][0].decode())[0] + 1}-0"  # newest first: kept[-1] is the oldest
            since = max(since or cut, cut, key=entry_key)
    # After the snapshot: inputs up to the last delivered one do not change, but for trimming (which
    # only leaves fewer to check); read newest first, at most ACCOUNT_LAST of them
    inputs = input_ids(r, stream, since, last)
    if len(inputs) >= ACCOUNT_LAST:
        since = max(since or inputs[-1], inputs[-1], key=entry_key)
    pending = {p["message_id"].decode() for p in pending}
    missing, duplicated = unaccounted(inputs, outputs, pending, last, since)
    return Check("accounting", not missing and not duplicated,
                 f"{len(inputs)} input entries, {len(outputs)} results and dead letters read, "
                 f"{len(pending)} pending: {len(missing)} without a result, {len(duplicated)} with two or more"
                 + (f" (e.g. {sorted(missing | duplicated)[:3]})" if missing or duplicated else ""))


def check_prometheus(base: str, lag_known: bool = True) -> list[Check]:
    targets = [t for t in prometheus(base, "/api/v1/targets")["activeTargets"] if t["labels"]["job"] == WORKER_JOB]
    down = [f"{t['labels']['instance']}: {t.get('lastError') or t['health']}" for t in targets if t["health"] != "up"]
    # by instance: series of a worker that is gone linger up to 5 min after a Prometheus restart
    ready = {s["metric"].get("instance"): float(s["value"][1])
             for s in prometheus(base, "/api/v1/query", query="ustudents_ready")["result"]}
    not_ready = [t["labels"]["instance"] for t in targets if ready.get(t["labels"]["instance"]) != 1]
    checks = [Check("targets", bool(targets) and not down and not not_ready,
                    f"{len(targets)} worker targets, {len(targets) - len(down)} up, "
                    f"{len(targets) - len(not_ready)} ready" + (f"; down: {down}" if down else "")
                    + (f"; not ready: {not_ready}" if not_ready else ""))]

    loaded = {r["name"]: r for g in prometheus(base, "/api/v1/rules")["groups"] for r in g["rules"]
              if r["type"] == "alerting"}
    wanted = alert_names(yaml.safe_load(ALERTS.read_text()))
    absent = [a for a in wanted if a not in loaded]
    broken = [f"{a}: {loaded[a].get('lastError')}" for a in wanted if a in loaded and loaded[a]["health"] != "ok"]
    firing = [a for a in wanted if a in loaded and loaded[a]["state"] == "firing"]
    checks.append(Check("rules", not absent and not broken,
                        f"{len(wanted) - len(absent)} of {len(wanted)} alerts loaded, {len(broken)} with errors; "
                        f"firing: {', '.join(firing) or 'none'}"
                        + (f"; not loaded: {absent}" if absent else "") + (f"; errors: {broken}" if broken else "")))

    empty, failed = [], []
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    for title, expr in queries:
        try:
            if not prometheus(base, "/api/v1/query", query=expr)["result"]:
                empty.append((title, expr))
        except Exception as exc:  # noqa: BLE001 - reported as the check's detail
            failed.append(f"{title}: {exc}")
    may_be_empty = MAY_BE_EMPTY + (() if lag_known else ("ustudents_consumer_lag_entries",))
    unexpected = [t for t, e in empty if not any(m in e for m in may_be_empty)]
    checks.append(Check("dashboard", not failed and not unexpected,
                        f"{len(queries)} queries: {len(queries) - len(failed) - len(empty)} with data, "
                        f"{len(empty)} empty ({', '.join(sorted({t for t, _ in empty})) or '-'}), {len(failed)} failed"
                        + (f"; empty but should not be: {unexpected}" if unexpected else "")
                        + (f"; failed: {failed}" if failed else "")))
    return checks


def redis_too_old(r: redis.Redis) -> str | None:
    """Why this Redis cannot be checked: before 7 it keeps no entries-added nor lag (a KeyError)."""
    version = r.info("server")["redis_version"]
    if int(version.split(".")[0]) >= 7:
        return None
    kw = r.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
    return (f"the Redis at {where} is version {version}; this check needs Redis 7 or later (the streams' "
            "entries-added and the group's lag): point --redis-url at the stack's Redis (compose runs Redis 7), "
            "or upgrade that one")


def positive_seconds(text: str) -> float:
    """--watch: seconds above 0 (0 divided the rate by zero; a negative one failed in time.sleep)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):  # nan fails this too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0: give how long to watch "
                                         "the results stream, e.g. 30")
    return value


def json_refusal(path: Path) -> str | None:
    """Why --json PATH cannot be written, found before the checks run (a bad path failed only after
    them, with a traceback), or None. It replaces only an earlier report: it wrote over any file."""
    where = f"--json {path}"
    try:
        real = real_path(path)  # a symbolic link: its target is written
    except OSError as err:
        return f"--json {os_error_line(err)}"  # a loop of links: names the path
    if real.is_dir():
        return f"{where}: is a folder; give a file name, e.g. {path / 'check_stack.json'}"
    if real.exists() and any(p.exists() and os.path.samefile(real, p) for p in READS):
        return f"{where}: is a file this script reads; give another file name"
    if not real.parent.is_dir():
        return (f"{where}: folder {real.parent} " + ("is not a folder" if real.parent.exists() else "does not exist")
                + "; create the folder or give another path")
    if not os.access(real.parent, os.W_OK | os.X_OK):
        return f"{where}: cannot write in folder {real.parent}; check its permissions, or give another path"
    if real.exists():
        earlier = None
        if real.is_file() and real.stat().st_size < 2 ** 20:  # a report is kilobytes; nothing larger is read whole
            try:
                earlier = json.loads(real.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
                pass
        if not (isinstance(earlier, dict) and REPORT_KEYS <= earlier.keys()):
            return (f"{where}: holds a file that is not an earlier report of check_stack.py, which this would "
                    "replace; give a new file name or move that file away")
    return None


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def shown_arg(arg: str) -> str:
    """A command-line argument as the report records it: a Redis URL's password replaced by ***."""
    option, eq, value = arg.partition("=")
    if eq and option.startswith("--"):
        return f"{option}={shown_arg(value)}"
    return shown_url(arg) if arg.startswith(REDIS_SCHEMES) else arg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--stream", default="line1")
    ap.add_argument("--group", default="ustudents")
    ap.add_argument("--watch", type=positive_seconds, default=30.0, help="seconds to watch the results stream")
    ap.add_argument("--json", type=Path, help="write the checks and the machine here (replaces only an earlier report)")
    args = ap.parse_args(argv)
    if args.json and (problem := json_refusal(args.json)):
        print(f"Error: {problem}", file=sys.stderr)
        return 2
    try:
        # the worker's client: its URL checks, TLS options and password setting (a URL's password alone
        # went into the --json report's command)
        r = connect(args.redis_url, password=os.environ.get(f"{ENV_PREFIX}REDIS_PASSWORD") or None)
        r.ping()
        if problem := redis_too_old(r):
            print(f"Error: {problem}", file=sys.stderr)
            return 2
        checks = [check_flow(r, args.stream, args.group, args.watch), check_accounting(r, args.stream, args.group)]
        lag_known = not r.exists(args.stream) or lag_of(r, args.stream, args.group) is not None
        checks += check_prometheus(args.prometheus, lag_known)
    except (redis.RedisError, OSError, RuntimeError, ValueError) as exc:  # ValueError: not JSON (no Prometheus there)
        print(f"Error: {exc}; is the stack up, and are --redis-url and --prometheus its addresses?", file=sys.stderr)
        return 2
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<10}  {c.detail}")
    if args.json:
        report = json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform()},
            "command": "python deploy/check_stack.py " + " ".join(shown_arg(a) for a in (sys.argv[1:] if argv is None
                                                                                       else argv)),
            "stream": args.stream, "watch_s": args.watch, "checks": [asdict(c) for c in checks]}, indent=2) + "\n"
        try:  # atomically: an interrupted write leaves the earlier report whole
            write_atomically(real_path(args.json), report)
        except OSError as err:  # checked above, but a disk can fill or a folder go during the watch
            print(f"Error: --json {args.json}: {os_error_line(err)} (the checks above ran; their report was not "
                  "written)", file=sys.stderr)
            return 2
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
