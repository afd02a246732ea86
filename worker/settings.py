"""Every setting of one worker process, from flags, the environment (`USTUDENTS_*`) and `.env`.

Precedence, highest first: command-line flags (passed as keyword arguments), environment variables
`USTUDENTS_<NAME>`, the `.env` file (or the one given with `--env-file`), then the defaults below.
Nothing else in the worker reads the environment.
"""
from __future__ import annotations

import io
import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from dotenv.parser import parse_stream
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "USTUDENTS_"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

# Bounds of the numeric settings: a value past them was accepted and crashed the worker later (a
# traceback at SIGTERM, in a stage, at the first frame), or looped it through restarts.
MAX_COUNT = 2**63 - 1  # Redis' integers (MAXLEN, counts, TTLs)
MAX_S = threading.TIMEOUT_MAX  # the longest wait Python's threads and sockets take (292 years on Linux)
MAX_MS = int(MAX_S * 1000)
# The shortest period of the worker's own loops (the claim, the gauges' refresh, the log summary): at
# 1 microsecond an idle worker sent Redis about 8,000 commands a second, with most of a core busy.
MIN_PERIOD_MS = 100
# The client's socket timeout is block_ms / 1000 + 10 s; poll() takes it as a C int of ms, and past
# that the wait wraps round to a short one (a read timing out at random) or overflows
MAX_BLOCK_MS = 2**31 - 1 - 10_000  # 24.8 days


# What a URL may carry after '?': a database, and TLS settings. redis-py hands any other option to its
# connections as is: an unknown one ended in a TypeError traceback at the first command, and a
# socket_timeout replaced the worker's own read timeout (at 0.5 s readiness flapped; at 0 never came).
URL_OPTIONS = {"db", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
PATH_OPTIONS = (*TLS_FILES, "ssl_ca_path")  # the options whose values are paths, which may hold an '@'



def check_redis_url(url: str) -> str:
    if not url.startswith(REDIS_SCHEMES):
        scheme = url.partition("://")[0]
        if f"{scheme.lower()}://" in REDIS_SCHEMES:  # it was shown lower-cased: "'rediss://...' is not a Redis URL"
            raise ValueError(f"the URL's scheme {scheme!r}: write it in lower case, {scheme.lower()}://")
        raise ValueError(f"{shown_url(url)!r} is not a Redis URL; use redis://HOST:PORT/DB, rediss://... (TLS) or "
                         "unix://PATH")
    parts = urlsplit(url)
    if cut_short(url):  # the other checks would quote a piece of the password as a port, database or option
        raise ValueError(f"{shown_url(url)!r}: its password holds a '/', '?' or '#', where a URL's address ends; "
                         "percent-encode them (%2F, %3F, %23) or give the password in "
                         "USTUDENTS_REDIS_PASSWORD")
    if url.startswith("unix://"):
        if not parts.path:  # unix:// retried connecting to "" for ever
            raise ValueError(f"{shown_url(url)!r} names no socket; use unix:///PATH/TO/redis.sock")
    else:
        if not re.fullmatch(r"/?|/\d+", parts.path):
            # redis-py would silently use database 0 for redis://host/abc
            raise ValueError(f"{shown_url(url)!r}: the database {parts.path[1:]!r} is not a number; use redis://HOST:PORT/DB")
        try:
            port = parts.port
        except ValueError:  # urllib's "Port could not be cast to integer value as 'abc'" names no setting
            port = 0
        if port == 0:
            port_text = parts.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]
            raise ValueError(f"{shown_url(url)!r}: the port {port_text!r} is not a number from 1 to 65535; use "
                             "redis://HOST:PORT/DB")
    options = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(options) - URL_OPTIONS)
    if unknown:  # redis-py hands any option to its connections as is
        raise ValueError(f"{shown_url(url)!r}: the option {unknown[0]!r} is not one the worker takes; give only "
                         f"?db= and, with rediss://, {', '.join(sorted(URL_OPTIONS - {'db'}))} (the worker sets its "
                         "own timeouts)")
    repeated = sorted(k for k, v in options.items() if len(v) > 1)
    if repeated:  # redis-py takes the first, a reader the last
        raise ValueError(f"{shown_url(url)!r}: the option {repeated[0]!r} is given {len(options[repeated[0]])} times; "
                         "give it once")
    tls = sorted(k for k in options if k.startswith("ssl_"))
    if tls and not url.startswith("rediss://"):
        raise ValueError(f"{shown_url(url)!r}: {tls[0]} is a TLS option, and {url.partition(':')[0]}:// connects "
                         "without TLS; use rediss://")
    for option in TLS_FILES:  # a missing one read as Redis being unreachable ("No such file or directory")
        if option in options and not Path(options[option][-1]).is_file():
            raise ValueError(f"{shown_url(url)!r}: {option} {options[option][-1]!r} is no file here; give the path of "
                             "the PEM file")
    if tls:
        check_tls_options(url, {k: v[-1] for k, v in options.items()})
    db = options.get("db")
    if db is not None and not (len(db) == 1 and db[0].isdigit()):
        raise ValueError(f"{shown_url(url)!r}: the database {','.join(db)!r} (?db=) is not a number")
    if db is not None and not url.startswith("unix://") and parts.path.strip("/") and \
            int(parts.path.strip("/")) != int(db[0]):  # a unix:// path is the socket's
        raise ValueError(f"{shown_url(url)!r}: two databases, {parts.path.strip('/')} in the path and {db[0]} "
                         "(?db=), of which Redis would use the second; give one")
    return url


class _Encrypted(Exception):
    pass


def _no_passphrase() -> str:
    raise _Encrypted  # OpenSSL would ask for it at the terminal: a tool hung, a worker logged the prompt


def check_tls_options(url: str, options: dict[str, str]) -> None:
    """The TLS options' values and files, read as the connection will read them: a bad one read as
    Redis being unreachable (retried for ever by a worker), an encrypted key asked for its passphrase
    at the terminal, and an unknown word of ssl_cert_reqs ended the worker in a traceback."""
    import ssl

    where = f"{shown_url(url)!r}:"
    reqs, hostname = options.get("ssl_cert_reqs"), options.get("ssl_check_hostname")
    if reqs is not None and reqs not in ("none", "optional", "required"):  # redis-py's words, in lower case
        raise ValueError(f"{where} ssl_cert_reqs {reqs!r} is not none, optional or required")
    if hostname is not None and hostname.lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise ValueError(f"{where} ssl_check_hostname {hostname!r} is not true or false")
    ca_path = options.get("ssl_ca_path")
    if ca_path is not None and not Path(ca_path).is_dir():
        raise ValueError(f"{where} ssl_ca_path {ca_path!r} is no folder here; give the folder of CA certificates")
    cert, key, ca = options.get("ssl_certfile"), options.get("ssl_keyfile"), options.get("ssl_ca_certs")
    if key and not cert:
        raise ValueError(f"{where} ssl_keyfile without ssl_certfile; give the client certificate too")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):  # OpenSSL's error names no file
        if options.get(option) and not os.access(options[option], os.R_OK):
            raise ValueError(f"{where} {option} {options[option]!r} cannot be read by this user; make it readable "
                             "by the worker's user (a Secret's defaultMode, the file's owner)")
    try:
        if ca:
            context.load_verify_locations(cafile=ca)
    except ssl.SSLError as err:
        raise ValueError(f"{where} ssl_ca_certs {ca!r} holds no PEM certificate OpenSSL reads ({err.reason or err}); "
                         "give the CA's certificate in PEM") from None
    try:
        if cert:
            context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise ValueError(f"{where} ssl_keyfile {key or cert!r} is encrypted; the worker takes an unencrypted key: "
                         "`openssl pkey -in KEY -out PLAIN.key`, readable only by the worker's user") from None
    except ssl.SSLError as err:
        if key and "KEY_VALUES_MISMATCH" in str(err):
            why = f"ssl_keyfile {key!r} is not the key of ssl_certfile {cert!r}; give the certificate's own key"
        elif not key:
            why = f"ssl_certfile {cert!r} holds no private key OpenSSL reads ({err.reason or err}); give ssl_keyfile too"
        else:
            why = (f"ssl_certfile {cert!r} and ssl_keyfile {key!r} do not load ({err.reason or err}); give the PEM "
                   "certificate and its key")
        raise ValueError(f"{where} {why}") from None


def cut_short(url: str) -> bool:
    """Whether a URL's address ends before its '@': a password holding an unencoded '/', '?' or '#'
    (a generated one: base64 has '/'), whose rest a URL parser reads as the path, the options or the
    fragment. None of those holds an '@' of its own, except a file option's value (a path); a unix://
    socket's path may, where no password comes before it."""
    parts = urlsplit(url)
    if url.startswith("unix://"):
        return bool(parts.netloc) and "@" not in parts.netloc and "@" in parts.path
    if not url.startswith(("redis://", "rediss://")):
        return False
    query = parse_qs(parts.query, keep_blank_values=True)
    return "@" in parts.path or "@" in parts.fragment or any(
        "@" in key or (key not in PATH_OPTIONS and any("@" in v for v in values)) for key, values in query.items())


def shown_url(url: str) -> str:
    """The URL as messages and logs show it: a password in it replaced by ***."""
    if cut_short(url):  # where the user name ends is not known either: all before the last '@' goes
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")  # the last '@': a password may hold one unencoded
    return parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}").geturl()


def check_name(v: str, stream: bool = False) -> str:
    """A stream, group or consumer name the worker accepts. A stream named like another stream's
    results or dead letters (line1:results) would have the worker read its own output."""
    if not v or any(c.isspace() for c in v):
        raise ValueError("must be a non-empty name without spaces")
    if stream and v.endswith((":results", ":dead")):
        raise ValueError(f"{v!r} is where the results or dead letters of {v.rsplit(':', 1)[0]!r} go; give the input "
                         "stream's name")
    return v


def check_env_file(path: str | Path) -> None:
    """Refuse an env file python-dotenv would read only in part: it skips a line it cannot parse
    (with a warning naming no file) and fails on bytes that are not UTF-8 (naming no file), and
    the settings of that line then silently fall back to the defaults (another Redis)."""
    path = Path(path)
    if not path.is_file():
        return  # no .env: nothing to read (a missing --env-file is refused by its option)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as "
                         "UTF-8") from None
    # newline=None: universal newlines, as python-dotenv reads the file (line numbers alike)
    for binding in parse_stream(io.StringIO(text, newline=None)):
        if not binding.error:
            continue
        name = line_name(binding.original.string)
        what = (f"{path} line {binding.original.line}: cannot be parsed ({name}...: an unclosed quote, or a space "
                "outside quotes?)")
        if name.removeprefix("export ").startswith(ENV_PREFIX):
            raise ValueError(f"{what}; fix or remove the line")
        # a line of another tool's sharing the file: python-dotenv skips it, and so may ustudents
        logging.getLogger("ustudents.worker").warning("%s; skipped: not a %s setting", what, ENV_PREFIX)


def line_name(line: str) -> str:
    """An env file's line as an error shows it: its first word, never the value (it may be a password,
    and a line that cannot be parsed may lack its '=')."""
    words = re.split(r"[\s=:]", line.strip(), maxsplit=2)
    return " ".join(words[:2]) if words[0] == "export" and len(words) > 1 else words[0][:60]


def default_consumer() -> str:
    """Unique per process on a host of its own; containers on the host's network share hostname and pid 1,
    and the worker then adds a suffix (Worker._take_name)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", protected_namespaces=())

    # what to serve
    stream: str = Field(description="Input Redis stream, e.g. line1; results go to <stream>:results.")
    # NoDecode: the variable's value is split at commas below, not read as JSON; flags give a list
    model: Annotated[list[str], NoDecode] = Field(description="Model bundle directory; several separated by commas (chosen per frame by `category`). Each `--model` is one directory, commas included: give a directory whose name holds a comma that way.")
    backend: str = Field("auto", description="auto, torch, onnxruntime or tensorrt; empty: auto.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N; empty: auto.")
    precision: str | None = Field(None, description="fp32, bf16, fp16 or int8; empty or unset: the backend's default (on a CPU, the precision the bundle was calibrated in where the CPU has it natively, else fp32).")
    batch: int = Field(8, ge=1, le=256, description="Frames per micro-batch (XREADGROUP COUNT and inference batch).")

    # Redis
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis://, rediss:// (TLS) or unix:// URL.")
    redis_password: SecretStr | None = Field(None, description="Overrides a password in the URL.")
    group: str = Field("ustudents", description="Consumer group; workers of one group share the stream.")
    consumer: str = Field(default_factory=default_consumer, description="This worker's name in the group.")
    block_ms: int = Field(1000, ge=1, le=MAX_BLOCK_MS, description="XREADGROUP BLOCK: longest wait for new frames, ms (at most half of shutdown_timeout_s, so that a stop is not held).")
    claim_idle_ms: int = Field(60_000, ge=MIN_PERIOD_MS, le=MAX_MS, description="Idle time after which another worker's pending entry is claimed.")
    reap_idle_s: int = Field(3600, ge=0, le=int(MAX_S), description="Other consumers of the group idle this long with nothing pending are removed (workers gone without leaving it); 0 = never.")
    max_deliveries: int = Field(3, ge=2, le=MAX_COUNT, description="Attempts after which a frame that fails, or kills its worker, is dead-lettered (the first in a batch, each later one alone, so that it takes no other frame with it). At least 2: the frames a stopped worker held are delivered again, and with 1 they would be dead-lettered untried.")
    max_failures_in_row: int = Field(32, ge=1, le=MAX_COUNT, description="Frames in a row the model fails on, none scored between, after which the worker exits 1 (a broken model or GPU, not bad frames): they stay pending instead of being dead-lettered.")
    max_frame_bytes: int = Field(32 << 20, ge=1, le=MAX_COUNT, description="Encoded frames larger than this are dead-lettered.")
    results_maxlen: int = Field(100_000, ge=1, le=MAX_COUNT, description="MAXLEN ~ of <stream>:results.")
    dead_maxlen: int = Field(10_000, ge=1, le=MAX_COUNT, description="MAXLEN ~ of <stream>:dead.")
    dead_image_max_bytes: int = Field(64 << 10, ge=0, le=MAX_COUNT, description="A dead letter keeps its frame's inline image up to this size, else only `image_bytes` (the input stream keeps the frame until its MAXLEN trims it); with dead_maxlen it bounds the dead letters' images in Redis (default: 625 MiB).")
    dedupe_ttl_s: int = Field(3600, ge=1, le=int(MAX_S), description="How long the per-entry 'done' marker that prevents a second result lives.")
    backoff_max_s: float = Field(5.0, gt=0, le=MAX_S, allow_inf_nan=False, description="Longest wait between Redis retries.")

    # pipeline
    heatmap: bool = Field(False, description="Add a `heatmap` PNG (the frame with what the mask thresholds in colour) to each result.")
    decode_threads: int = Field(2, ge=1, le=MAX_COUNT, description="Threads decoding frames while inference runs.")
    queue_batches: int = Field(2, ge=1, le=MAX_COUNT, description="Decoded batches waiting for inference (bounds memory in batches).")
    inflight_mb: int = Field(1024, ge=0, le=MAX_COUNT, description="Decoded frames and results not yet published, in MiB: the worker reads only as many frames as fit, each taken to be the size of the last (bounds memory in bytes for large frames, where queue_batches bounds it in batches); 0 = no bound.")
    stall_timeout_s: float = Field(600.0, gt=0, le=MAX_S, allow_inf_nan=False, description="/healthz fails when entries are in flight and no stage has moved for this long (a hung inference or decode), so that Kubernetes restarts the worker; at twice this long the worker exits (code 1) by itself, for compose, which restarts only a container that exits.")
    shutdown_timeout_s: float = Field(30.0, gt=0, le=MAX_S, allow_inf_nan=False, description="SIGTERM: longest time to finish and publish in-flight batches.")

    # observability
    metrics_port: int = Field(9108, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0 = off.")
    metrics_host: str = Field("0.0.0.0", description="Address the metrics server binds (IPv4, or IPv6 such as :: for all).")
    stats_interval_s: float = Field(5.0, ge=MIN_PERIOD_MS / 1000, le=MAX_S, allow_inf_nan=False, description="Refresh period of lag, pending and GPU gauges, and of the offset to Redis's clock the end-to-end latency is measured on.")
    log_interval_s: float = Field(60.0, ge=MIN_PERIOD_MS / 1000, le=MAX_S, allow_inf_nan=False, description="Period of the one-line throughput summary in the log.")
    log_json: bool = Field(False, description="One JSON object per log line.")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @field_validator("stream", "group", "consumer")
    @classmethod
    def _name(cls, v: str, info) -> str:
        return check_name(v, stream=info.field_name == "stream")

    @field_validator("model", mode="before")
    @classmethod
    def _models(cls, v: object) -> object:
        # the variable (.env): directories separated by commas; the flags: a list, one directory a
        # value, kept whole, so that a comma in a directory's name survives
        paths = [p.strip() for p in v.split(",")] if isinstance(v, str) else v
        if isinstance(paths, (list, tuple)):
            paths = [str(p) for p in paths if str(p).strip()]
            if not paths:
                raise ValueError("give a model bundle directory")
        return paths

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_redis_url(v)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        # checked here, not when the engine loads, where the error named --backend for a value from
        # the environment; empty, as compose's ${VAR:-} gives: auto, as for precision and device
        if not v.strip():
            return "auto"
        if v != "auto":
            from ustudents.engines.runtime import BACKENDS  # imports torch: only when a backend is given
            if v not in BACKENDS:
                raise ValueError(f"{v!r}: choose auto, {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not v.strip():
            return "auto"
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"{v!r}: choose auto, cpu, cuda or cuda:N")
        if v.startswith("cuda"):  # checked here, not at the engine's load, so the line names USTUDENTS_DEVICE
            from ustudents.engines.runtime import device_refusal  # imports torch: only when a GPU is named
            if refusal := device_refusal(v):
                raise ValueError(f"{v!r}: {refusal}")
        return v

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, v: str | None) -> str | None:
        if v is None or not str(v).strip():
            return None  # empty, as compose's ${VAR:-} gives: the backend's default
        from ustudents.engines.runtime import PRECISIONS  # imports torch: only when a precision is given
        if v not in PRECISIONS:
            raise ValueError(f"{v!r}: choose {', '.join(PRECISIONS)}, or leave it empty for the backend's default")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("choose DEBUG, INFO, WARNING or ERROR")
        return v.upper()

    @property
    def model_dirs(self) -> list[Path]:
        return [Path(p) for p in self.model]


# USTUDENTS_* variables of deploy/ that are not worker settings: the images' entrypoint reads the
# first three, compose interpolates the last two (tests/test_deploy.py keeps this list whole).
DEPLOY_VARIABLES = ("MODELS_DIR", "MODEL_NAME", "ENGINE_CACHE", "ENGINE_PRECISION", "TAG", "CPU_PRECISION")


def unknown_variables(names) -> list[str]:
    """The USTUDENTS_* names among `names` (the environment's, a .env file's) that set nothing: a
    misspelt setting (USTUDENTS_BATCHSIZE) is otherwise ignored in silence and its default served."""
    known = {f.upper() for f in WorkerSettings.model_fields} | set(DEPLOY_VARIABLES)
    return sorted(n for n in names if n.upper().startswith(ENV_PREFIX) and n.upper()[len(ENV_PREFIX):] not in known)


def flag_name(field: str, flags: set[str]) -> str:
    """How a user sets `field`: its flag where `flags` (the command's parameters) has one, and the
    environment variable (block_ms has no --block-ms: naming one sent users to a flag that is not there)."""
    variable = f"{ENV_PREFIX}{field.upper()}"
    return f"--{field.replace('_', '-')} / {variable}" if field in flags else variable


class ToolSettings(BaseSettings):
    """The Redis connection of `ustudents publish` and `ustudents results` (same variables as the worker's)."""
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_redis_url(v)
