"""Worker settings (flags > environment > .env > defaults) and the one-line errors of the worker, publish
and results for bad input at start (exit 2). No Redis needed, but for the tests taking `redis_stream`
(REDIS_URL or 127.0.0.1:6379; skipped where neither answers): the other cases fail before a connection."""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

import pytest
import redis
import torch
from click.testing import CliRunner

from ustudents.cli import main
from ustudents.worker.settings import WorkerSettings, check_env_file


def test_flags_win_over_environment_over_env_file(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("USTUDENTS_STREAM=line4\nUSTUDENTS_MODEL=/models/a\nUSTUDENTS_BATCH=4\n"
                        "USTUDENTS_CLAIM_IDLE_MS=1234\nUSTUDENTS_REDIS_URL=rediss://:pw@redis.example:6380/1\n")
    monkeypatch.setenv("USTUDENTS_BATCH", "5")
    from_env = WorkerSettings(_env_file=env_file)
    assert (from_env.stream, from_env.batch, from_env.claim_idle_ms) == ("line4", 5, 1234)
    assert from_env.redis_url == "rediss://:pw@redis.example:6380/1" and from_env.model_dirs[0].name == "a"
    assert WorkerSettings(_env_file=env_file, batch=6).batch == 6
    monkeypatch.delenv("USTUDENTS_BATCH")
    assert WorkerSettings(_env_file=env_file).batch == 4
    # compose passes an unset override as "" (${USTUDENTS_CPU_PRECISION:-}): the runtime's default, not an error
    monkeypatch.setenv("USTUDENTS_PRECISION", "")
    assert WorkerSettings(_env_file=env_file).precision is None
    monkeypatch.setenv("USTUDENTS_PRECISION", "bf16")
    assert WorkerSettings(_env_file=env_file).precision == "bf16"


def test_the_command_reads_env_file_and_its_flags_override_it(tmp_path):
    env_file = tmp_path / "worker.env"
    # metrics port 0: the default 9108 may be taken on the machine running the tests (a demo)
    env_file.write_text("USTUDENTS_STREAM=line1\nUSTUDENTS_MODEL=/no/such/model\nUSTUDENTS_REDIS_URL=http://wrong\n"
                        "USTUDENTS_METRICS_PORT=0\n")
    runner = CliRunner()
    from_file = runner.invoke(main, ["worker", "--env-file", str(env_file)])
    assert from_file.exit_code == 2 and "USTUDENTS_REDIS_URL: 'http://wrong' is not a Redis URL" in from_file.output
    overridden = runner.invoke(main, ["worker", "--env-file", str(env_file), "--redis-url", "redis://127.0.0.1:1/0"])
    assert overridden.exit_code == 2 and "/no/such/model: not found; pass a model bundle" in overridden.output


@pytest.fixture
def damaged_bundle(tiny_bundle, tmp_path):
    path = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, path)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case", ["no-stream", "no-model-dir", "damaged-bundle", "bad-url", "bad-batch", "bad-backend",
                                  "port-taken", "bad-device", "no-env-file", "bad-precision-env", "absent-gpu-env"])
def test_bad_input_at_start_is_one_line_and_exit_2(case, tiny_bundle, damaged_bundle, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    # metrics port 0 but where the port is the case: the default 9108 may be taken here (a demo)
    base = ["worker", "--stream", "line1", "--model", str(tiny_bundle), "--device", "cpu", "--env-file", str(empty),
            "--metrics-port", "0"]
    bad_precision = tmp_path / "precision.env"
    bad_precision.write_text("USTUDENTS_PRECISION=fp64\n")
    absent_gpu = tmp_path / "gpu.env"
    absent_gpu.write_text(f"USTUDENTS_DEVICE=cuda:{torch.cuda.device_count() + 6}\n")  # a GPU past those here
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    args, expected = {
        "no-stream": (["worker", "--model", str(tiny_bundle)], "--stream / USTUDENTS_STREAM: required"),
        "no-model-dir": (["worker", "--stream", "line1", "--model", str(tmp_path / "nope"), "--metrics-port", "0"],
                         "nope: not found; pass a model bundle"),
        "damaged-bundle": (["worker", "--stream", "line1", "--model", str(damaged_bundle), "--metrics-port", "0"],
                           "checksum mismatch"),
        "bad-url": (base + ["--redis-url", "localhost:6379"], "is not a Redis URL"),
        "bad-batch": (base + ["--batch", "0"], "--batch / USTUDENTS_BATCH: Input should be greater than or equal to 1 "
                                               "(given: 0)"),
        "bad-backend": (base + ["--backend", "tensorrt"], "tensorrt needs a CUDA GPU"),
        # told before the models load (minutes on a GPU's first start), so even with a damaged bundle
        "port-taken": (["worker", "--stream", "line1", "--model", str(damaged_bundle), "--env-file", str(empty),
                        "--metrics-port", str(taken.getsockname()[1]), "--redis-url", "redis://127.0.0.1:1/0"],
                       f"--metrics-port {taken.getsockname()[1]}: cannot listen"),
        "bad-device": (base + ["--device", "gpu"], "--device / USTUDENTS_DEVICE: 'gpu': choose auto, cpu, cuda or cuda:N"),
        # a typo in the file's name must not silently run the worker on the defaults
        "no-env-file": ([a if a != str(empty) else str(tmp_path / "typo.env") for a in base], "typo.env' does not exist"),
        "bad-precision-env": ([a if a != str(empty) else str(bad_precision) for a in base],
                              "USTUDENTS_PRECISION: 'fp64': choose fp32, bf16, fp16, int8"),
        # named by the variable and as written (it was '--device cuda: ...' from the engine, whatever set it)
        "absent-gpu-env": ([a if a != str(empty) else str(absent_gpu) for a in base if a not in ("--device", "cpu")],
                           f"--device / USTUDENTS_DEVICE: 'cuda:{torch.cuda.device_count() + 6}': PyTorch sees"),
    }[case]
    try:
        result = CliRunner().invoke(main, args)
    finally:
        taken.close()
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.output, result.output


def test_json_logs_are_one_object_per_line_with_the_event_fields():
    import json
    import logging

    from ustudents.worker.logs import JsonFormatter

    record = logging.LogRecord("ustudents.worker", logging.WARNING, __file__, 1, "entry %s dead-lettered", ("1-0",), None)
    record.event, record.reason = "dead_letter", "decode_error"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line) | {"time": None} == {"time": None, "level": "warning", "logger": "ustudents.worker",
                                                  "message": "entry 1-0 dead-lettered", "event": "dead_letter",
                                                  "reason": "decode_error"}


def one_error(result) -> str:
    """The command's one error line, asserting exit code 2, no traceback and no second error line."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture
def redis_stream():
    """(URL, client, a fresh stream name) on a running Redis; the stream's keys are deleted afterwards."""
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as err:
        pytest.skip(f"no Redis at {url} ({err})")
    name = f"test-worker-cli-{uuid.uuid4().hex[:10]}"
    yield url, client, name
    client.delete(name, *client.scan_iter(match=f"{name}:*"))


@pytest.mark.parametrize("args, env, expected", [
    # each was accepted and crashed the worker later: at SIGTERM, in the monitor stage, at the first
    # read (the socket timeout), at the first result (a crash loop through restarts)
    (["--shutdown-timeout-s", "inf"], {},
     "--shutdown-timeout-s / USTUDENTS_SHUTDOWN_TIMEOUT_S: Input should be a finite number (given: inf)"),
    # settings without a flag are named by their variable alone: "--block-ms" sent users to no flag
    ([], {"USTUDENTS_STATS_INTERVAL_S": "inf"},
     "USTUDENTS_STATS_INTERVAL_S: Input should be a finite number (given: 'inf')"),
    # named by the engine as --backend, whatever set it
    ([], {"USTUDENTS_BACKEND": "foo"},
     "--backend / USTUDENTS_BACKEND: 'foo': choose auto, torch, onnxruntime or tensorrt"),
    # periods so short that an idle worker kept Redis and its cores busy (8,000 commands a second)
    ([], {"USTUDENTS_STATS_INTERVAL_S": "0.000001"},
     "USTUDENTS_STATS_INTERVAL_S: Input should be greater than or equal to 0.1 (given: '0.000001')"),
    (["--claim-idle-ms", "1"], {},
     "--claim-idle-ms / USTUDENTS_CLAIM_IDLE_MS: Input should be greater than or equal to 100 (given: 1)"),
    ([], {"USTUDENTS_BLOCK_MS": "99999999999999"},
     "USTUDENTS_BLOCK_MS: Input should be less than or equal to 2147473647 (given: '99999999999999')"),
    # the port and the database as urllib and redis-py word them named no setting; unix:// retried for ever
    (["--redis-url", "redis://127.0.0.1:abc/0"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'redis://127.0.0.1:abc/0': the port 'abc' is not a number from 1 to 65535; "
     "use redis://HOST:PORT/DB"),
    (["--redis-url", "redis://127.0.0.1:99999/0"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'redis://127.0.0.1:99999/0': the port '99999' is not a number from 1 to "
     "65535; use redis://HOST:PORT/DB"),
    (["--redis-url", "unix://"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'unix://' names no socket; use unix:///PATH/TO/redis.sock"),
    (["--redis-url", "redis://127.0.0.1/0?db=x"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'redis://127.0.0.1/0?db=x': the database 'x' (?db=) is not a number"),
    # options redis-py hands to its connections as is: a traceback (TypeError) at the first command, the
    # password shown in full, a socket_timeout in place of the worker's read timeout, a TLS file missing read
    # as Redis unreachable, ?db= quietly winning over the path's database
    (["--redis-url", "redis://:hunter2@127.0.0.1:1/0?socket_timeout=0.5"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'redis://:***@127.0.0.1:1/0?socket_timeout=0.5': the option "
     "'socket_timeout' is not one the worker takes; give only ?db= and, with rediss://, ssl_ca_certs, ssl_ca_path, "
     "ssl_cert_reqs, ssl_certfile, ssl_check_hostname, ssl_keyfile (the worker sets its own timeouts)"),
    (["--redis-url", "rediss://127.0.0.1:1/0?ssl_cert_reqs=bogus"], {},  # a traceback at start (helper-106)
     "--redis-url / USTUDENTS_REDIS_URL: 'rediss://127.0.0.1:1/0?ssl_cert_reqs=bogus': ssl_cert_reqs 'bogus' is not "
     "none, optional or required"),
    (["--redis-url", "rediss://127.0.0.1:1/0?ssl_check_hostname=maybe"], {},  # taken as true
     "--redis-url / USTUDENTS_REDIS_URL: 'rediss://127.0.0.1:1/0?ssl_check_hostname=maybe': ssl_check_hostname "
     "'maybe' is not true or false"),
    (["--redis-url", "REDISS://:pw@127.0.0.1:1/0"], {},  # shown as 'rediss://...' "is not a Redis URL"
     "--redis-url / USTUDENTS_REDIS_URL: the URL's scheme 'REDISS': write it in lower case, rediss://"),
    (["--redis-url", "redis://127.0.0.1:1/0?db=1&db=2"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'redis://127.0.0.1:1/0?db=1&db=2': the option 'db' is given 2 times; give "
     "it once"),
    (["--redis-url", "redis://127.0.0.1:1/0?ssl_ca_certs=/ca.pem"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'redis://127.0.0.1:1/0?ssl_ca_certs=/ca.pem': ssl_ca_certs is a TLS "
     "option, and redis:// connects without TLS; use rediss://"),
    (["--redis-url", "rediss://127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'rediss://127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem': ssl_ca_certs "
     "'/nonexistent/ca.pem' is no file here; give the path of the PEM file"),
    (["--redis-url", "redis://127.0.0.1:1/11?db=12"], {},
     "--redis-url / USTUDENTS_REDIS_URL: 'redis://127.0.0.1:1/11?db=12': two databases, 11 in the path and 12 "
     "(?db=), of which Redis would use the second; give one"),
    (["--results-maxlen", "99999999999999999999"], {},
     "--results-maxlen / USTUDENTS_RESULTS_MAXLEN: Input should be less than or equal to 9223372036854775807 "
     "(given: 99999999999999999999)"),
])
def test_numbers_the_worker_cannot_use_are_refused_at_start(args, env, expected, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = CliRunner().invoke(main, ["worker", "--stream", "line1", "--model", str(tmp_path), "--env-file", str(empty),
                                       "--metrics-port", "0", "--redis-url", "redis://127.0.0.1:1/0", *args], env=env)
    assert one_error(result) == f"Error: {expected}"


def test_a_variable_that_sets_nothing_is_warned_of_at_start(tmp_path):
    """USTUDENTS_BATCHSIZE=4 (for USTUDENTS_BATCH) was ignored in silence: the worker served batch 8."""
    env_file = tmp_path / "line.env"
    env_file.write_text("USTUDENTS_LOGLEVEL=DEBUG\nUSTUDENTS_BATCH=4\n")
    result = CliRunner().invoke(main, ["worker", "--stream", "line1", "--model", str(tmp_path), "--env-file",
                                       str(env_file), "--metrics-port", "0", "--redis-url", "redis://127.0.0.1:1/0"],
                                env={"USTUDENTS_BATCHSIZE": "4", "USTUDENTS_MODEL_NAME": "x"})
    one_error(result)  # then refused as no bundle, as before
    assert "USTUDENTS_BATCHSIZE, USTUDENTS_LOGLEVEL: not a setting of the worker, ignored (misspelt?" in result.output
    assert "USTUDENTS_BATCH," not in result.output and "USTUDENTS_MODEL_NAME" not in result.output


def test_a_metrics_address_not_of_this_machine_is_named_not_the_port(tmp_path):
    """USTUDENTS_METRICS_HOST=999.1.1.1 said '--metrics-port 19999: cannot listen ...; choose a free port'."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    for host in ("999.1.1.1", "192.0.2.1"):  # not an address; an address (TEST-NET-1) of no interface here
        result = CliRunner().invoke(main, ["worker", "--stream", "line1", "--model", str(tmp_path), "--env-file",
                                           str(empty), "--metrics-port", "19999"], env={"USTUDENTS_METRICS_HOST": host})
        error = one_error(result)
        assert error.startswith(f"Error: USTUDENTS_METRICS_HOST {host}: cannot listen there (") and error.endswith(
            "); give an address of this machine (0.0.0.0: all of them)"), error


def test_the_metrics_server_listens_on_an_ipv6_address():
    """USTUDENTS_METRICS_HOST=:: (an IPv6-only cluster's probes) was refused: "Address family for
    hostname not supported"."""
    import socket
    import urllib.request

    from ustudents.worker.metrics import HealthServer

    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    server = HealthServer("::1", 0, lambda: b"", lambda: (True, "ok"), lambda: (True, "ready"))
    server.start()
    try:
        assert urllib.request.urlopen(f"http://[::1]:{server.port}/healthz", timeout=5).status == 200
    finally:
        server.stop()


def test_the_help_names_every_setting_as_a_flag_or_among_those_without_one():
    from ustudents.worker.cli import worker_cmd

    flags = {p.name for p in worker_cmd.params}
    listed = worker_cmd.help.split("Settings without a flag:")[1]
    without = {n.strip(" .\n") for n in listed.replace("\n", " ").split(",")}
    assert set(WorkerSettings.model_fields) - flags == without


def test_every_numeric_setting_has_a_bound_and_is_finite():
    """Not only the four found: any count past Redis' integers, any duration past what a wait takes."""
    base = {"_env_file": None, "stream": "line1", "model": "m"}
    for name, field in WorkerSettings.model_fields.items():
        if field.annotation not in (int, float):
            continue
        too_large = [2**63] + ([float("inf"), float("nan")] if field.annotation is float else [])
        for value in too_large:
            with pytest.raises(ValueError) as err:
                WorkerSettings(**base, **{name: value})
            assert [e["loc"] for e in err.value.errors()] == [(name,)], (name, value)


@pytest.mark.parametrize("command", ["worker", "publish", "results"])
@pytest.mark.parametrize("content, expected", [
    # python-dotenv skipped the line (a warning naming no file) and the command went to the default Redis
    (b"USTUDENTS_STREAM=line1\nUSTUDENTS_REDIS_URL=\"redis://127.0.0.1:6391/0\n",
     ".env line 2: cannot be parsed (USTUDENTS_REDIS_URL...: an unclosed quote, or a space outside quotes?); "
     "fix or remove the line"),
    # no '=': the whole line was shown, a password with it
    (b"USTUDENTS_REDIS_PASSWORD hunter2\n",
     ".env line 1: cannot be parsed (USTUDENTS_REDIS_PASSWORD...: an unclosed quote, or a space outside quotes?); "
     "fix or remove the line"),
    (b"USTUDENTS_STREAM=l\xfcne1\n", ".env: not UTF-8 text (byte 0xfc on line 1); save it as UTF-8"),
])
def test_an_env_file_that_cannot_be_read_whole_is_refused_naming_it(command, content, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(content)
    (tmp_path / "frame.png").write_bytes(b"")  # publish's source: read only once Redis answers
    args = {"worker": ["worker", "--stream", "line1", "--model", "m", "--metrics-port", "0"],
            "publish": ["publish", "frame.png", "--stream", "line1"],
            "results": ["results", "--stream", "line1"]}[command]
    # a Redis that is not there: were the file let through, the command fails at once, writing nowhere
    result = CliRunner().invoke(main, args, env={"USTUDENTS_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert one_error(result) == f"Error: {expected}" and "6391" not in result.output  # the value may be a password
    assert "hunter2" not in result.output
    # and what python-dotenv reads whole passes: comments, export, quotes, a value over two lines
    (tmp_path / ".env").write_text("# settings\n\nexport USTUDENTS_STREAM=line1\nUSTUDENTS_MODEL='/models/a b'\n"
                                   "USTUDENTS_LOG_LEVEL=info  # quiet\nUSTUDENTS_METRICS_HOST=\"0.0.0.0\n\"\n"
                                   "OTHER_TOOL: 1\n")  # another tool's line python-dotenv skips: skipped, not refused
    check_env_file(tmp_path / ".env")


def test_a_model_directory_with_a_comma_in_its_name_is_one_directory(tiny_bundle, tmp_path):
    """--model was joined with commas and split again: "m,1" became the bundles m and 1."""
    bundle = shutil.copytree(tiny_bundle, tmp_path / "m,1")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    # served twice: both load (no "m: not a model bundle directory"), then refused as given twice (it was
    # "a second model for category 'tiles'", of the one model); another bundle of that category as a second
    again = ["--device", "cpu", "--env-file", str(empty), "--metrics-port", "0", "--redis-url", "redis://127.0.0.1:1/0"]
    result = CliRunner().invoke(main, ["worker", "--stream", "line1", "--model", str(bundle), "--model", str(bundle),
                                       *again])
    assert one_error(result) == f"Error: {bundle}: given twice (--model or USTUDENTS_MODEL); give each model once"
    (tmp_path / "current").symlink_to(bundle)  # a plant's `current` link beside the folder it names
    result = CliRunner().invoke(main, ["worker", "--stream", "line1", "--model", str(bundle), "--model",
                                       str(tmp_path / "current"), *again])
    assert one_error(result) == (f"Error: {tmp_path / 'current'}: given twice (--model or USTUDENTS_MODEL, also as "
                                 f"{bundle}); give each model once")
    other = shutil.copytree(tiny_bundle, tmp_path / "other")
    result = CliRunner().invoke(main, ["worker", "--stream", "line1", "--model", str(bundle), "--model", str(other),
                                       *again])
    assert one_error(result).startswith(f"Error: {other}: a second model for category 'tiles' (also ")
    # the variable keeps its documented form: directories separated by commas
    assert WorkerSettings(_env_file=None, stream="line1", model="/m/a, /m/b").model_dirs == [Path("/m/a"), Path("/m/b")]


def test_every_bundle_is_checked_before_any_engine_loads(small_bundle, tmp_path, monkeypatch):
    """A missing bundle, or a second of one category, was found after the bundles before it were
    loaded and warmed up (minutes on a CPU, or with a TensorRT plan to build), on every restart of a
    worker that crash-looped on it."""
    from ustudents.engines.bundle import BundleError
    from ustudents.worker import service

    loaded: list[Path] = []
    monkeypatch.setattr(service, "load_engine", lambda path, **kw: loaded.append(path))
    for second, error in ((tmp_path / "nonexist", BundleError), (Path(small_bundle), ValueError)):
        settings = WorkerSettings(_env_file=None, stream="line1", model=[str(small_bundle), str(second)])
        with pytest.raises(error):
            service.load_engines(settings)
    assert loaded == []


def test_publish_reports_the_frames_it_sent_when_interrupted(tiny_mvtec, redis_stream, monkeypatch):
    """Ctrl-C printed "published 0 frames" after frames had gone out: the count was publish()'s return."""
    from ustudents.worker import publish

    url, client, stream = redis_stream
    source = publish.frames_from

    def interrupted_after_3(*args, **kwargs):  # Ctrl-C while the fourth frame is read
        frames = source(*args, **kwargs)
        for _ in range(3):
            yield next(frames)
        raise KeyboardInterrupt

    monkeypatch.setattr(publish, "frames_from", interrupted_after_3)
    result = CliRunner().invoke(main, ["publish", str(tiny_mvtec / "tiles" / "test" / "good"), "--stream", stream,
                                       "--loop", "--fps", "0", "--redis-url", url])
    assert result.exit_code == 0 and client.xlen(stream) == 3, result.output
    assert result.output.splitlines()[-1].startswith(f"published 3 frames to {stream} in ")


@pytest.mark.parametrize("command, option, bound", [
    ("publish", "--maxlen", "0<=x<=9223372036854775807"), ("publish", "--key-ttl-s", "1<=x<=9223372036"),
    ("publish", "--count", "0<=x<=9223372036854775807"), ("publish", "--inline-max", "0<=x<=9223372036854775807"),
    ("results", "--count", "0<=x<=9223372036854775807"),
])
def test_the_tools_refuse_numbers_redis_cannot_take(command, option, bound, tmp_path):
    """--maxlen 99999999999999999999 was "Redis stopped taking frames (value is not an integer or out of range)"."""
    value = "99999999999999999999"
    source = [str(tmp_path)] if command == "publish" else []
    result = CliRunner().invoke(main, [command, *source, "--stream", "line1", option, value,
                                       "--redis-url", "redis://127.0.0.1:1/0"])
    assert one_error(result) == f"Error: Invalid value for '{option}': {value} is not in the range {bound}."


def test_publish_refuses_an_empty_source_instead_of_the_current_folder(tiny_mvtec, monkeypatch):
    """"" (an unset variable in a script) published the images of whatever folder it ran in."""
    monkeypatch.chdir(tiny_mvtec / "tiles" / "test" / "good")
    result = CliRunner().invoke(main, ["publish", "", "--stream", "line1", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2
    assert one_error(result) == ("Error: SOURCE: empty (an unset variable in a script?); give an image folder, a "
                                 "video file or a camera index")


def test_publish_names_a_stream_key_of_another_type(tiny_mvtec, redis_stream):
    """It was "Redis stopped taking frames (WRONGTYPE ...)", as if Redis were at fault."""
    url, client, stream = redis_stream
    source = str(tiny_mvtec / "tiles" / "test" / "good")
    client.set(stream, "a value of another program")
    result = CliRunner().invoke(main, ["publish", source, "--stream", stream, "--redis-url", url])
    assert one_error(result) == (f"Error: Redis key {stream} holds a string, not a stream, so no frame can be "
                                 "written to it; rename or delete that key, or choose another --stream")
    assert client.get(stream) == b"a value of another program"  # left as it was


def test_results_names_the_key_of_another_type_and_a_save_link_to_nothing(redis_stream, tmp_path):
    """A result whose input stream was replaced by a string blamed '<stream>:results or <stream>:dead',
    both streams; a --save link to a missing folder said "File exists; a file stands where a folder
    goes", after connecting, where it is checked before it starts."""
    import cv2
    import numpy as np

    url, client, stream = redis_stream
    mask = cv2.imencode(".png", np.zeros((20, 20), np.uint8))[1].tobytes()
    client.xadd(f"{stream}:results", {"entry_id": "1-0", "frame_id": "a", "score": "1", "anomalous": "0",
                                      "threshold": "2", "latency_ms": "3", "model": "m", "mask": mask})
    client.set(stream, "a value of another program")
    saved = tmp_path / "saved"
    args = ["results", "--stream", stream, "--from-start", "--count", "1", "--redis-url", url]
    result = CliRunner().invoke(main, [*args, "--save", str(saved)])
    assert one_error(result) == (f"Error: stream {stream}: {stream} is a Redis key of another type, not a stream; "
                                 "check --stream (and that nothing else writes those keys)")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    result = CliRunner().invoke(main, [*args[:-2], "--redis-url", "redis://127.0.0.1:1/0", "--save",
                                       str(tmp_path / "link")])
    assert one_error(result) == (f"Error: --save {tmp_path / 'link'}: a link to {tmp_path / 'nowhere'}, which does "
                                 "not exist; make that folder, or choose another --save")


def test_an_empty_backend_or_device_is_auto_as_an_empty_precision_is_the_default():
    """Compose's ${VAR:-} gives empty strings: an empty USTUDENTS_PRECISION meant the default, while an
    empty USTUDENTS_BACKEND or USTUDENTS_DEVICE was refused."""
    settings = WorkerSettings(_env_file=None, stream="line1", model="m", backend="", device=" ", precision="")
    assert (settings.backend, settings.device, settings.precision) == ("auto", "auto", None)


def test_max_deliveries_below_2_is_refused():
    """A redelivered frame counts its first delivery: with 1, every frame a stopped worker held would
    be dead-lettered without being tried."""
    base = {"_env_file": None, "stream": "line1", "model": "m"}
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        WorkerSettings(**base, max_deliveries=1)
    assert WorkerSettings(**base, max_deliveries=2).max_deliveries == 2


def test_a_first_contact_after_a_start_without_redis_is_no_reconnect():
    """ustudents_redis_reconnects_total counts Redis coming back; a worker that started while Redis
    was down had never been connected, and reaching it then is no reconnect."""
    from ustudents.worker.connection import RedisState

    reconnects = []
    state = RedisState(on_reconnect=lambda: reconnects.append(1))
    state.failed(ConnectionError("refused"))
    state.ok()
    assert reconnects == []
    state.failed(ConnectionError("reset"))
    state.ok()
    assert reconnects == [1]


def test_a_results_frame_id_is_the_producers_own_bytes():
    """A frame id that is not UTF-8 came back as replacement characters, matching no frame of the
    producer's, while `camera` came back byte for byte."""
    from ustudents.worker import schema

    fields = {b"frame_id": b"\xff\xfe\x80id", b"camera": b"\xffcam"}
    out = schema.result_entry("1-0", fields, score=1.0, anomalous=False, threshold=2.0, mask_png=b"", model="m",
                              latency_ms=1.0, consumer="c")
    assert out["frame_id"] == b"\xff\xfe\x80id" and out["camera"] == b"\xffcam"
    assert schema.result_entry("1-0", {}, score=1.0, anomalous=False, threshold=2.0, mask_png=b"", model="m",
                               latency_ms=1.0, consumer="c")["frame_id"] == "1-0"  # none given: the entry's id


def test_a_password_redis_refuses_is_said_as_such_not_as_an_outage(caplog):
    """A password set on a running Redis was logged as "redis unreachable (Connection closed by server.)"
    and nothing more for as long as it lasted, /readyz saying the same, while redis-cli ping worked."""
    import redis

    from ustudents.worker.connection import RedisState

    state = RedisState()
    with caplog.at_level("WARNING", logger="ustudents.worker"):
        state.failed(redis.ConnectionError("Connection closed by server."))
        state.failed(redis.ConnectionError("Connection closed by server."))  # the same outage: said once
        state.failed(redis.AuthenticationError("Authentication required."))  # what it turns out to be: said
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[0].startswith("redis unreachable (Connection closed by server.)")
    assert messages[1].startswith("redis refuses the worker's password (Authentication required.)") and \
        "USTUDENTS_REDIS_PASSWORD" in messages[1]
    assert state.up is False and state.password_refused
    state.ok()
    assert state.up is True and not state.password_refused


class FakeClock:
    """time for worker.publish: sleeping advances it, nothing waits."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def test_publish_sends_at_the_asked_rate_and_resumes_it_after_an_outage_without_a_burst(monkeypatch):
    """--fps paces frames 1/fps apart; a frame held through a Redis outage goes out when Redis is back,
    and the next ones follow it 1/fps apart, not all at once to catch up."""
    from ustudents.worker import publish

    clock = FakeClock()
    monkeypatch.setattr(publish, "time", clock)

    class Publisher:
        def __init__(self):
            self.sent, self.failures = [], 3  # frame 5 meets an outage of three attempts

        def send(self, frame_id, data, ts=None):
            if frame_id == "f5" and self.failures:
                self.failures -= 1
                raise redis.ConnectionError("Connection refused")
            self.sent.append((frame_id, clock.now, ts))

        def retention_warning(self, frame_bytes, fps):
            return None  # what Redis keeps fits its cap

        def largest_frame(self):
            return 512 << 20  # Redis' default proto-max-bulk-len

    sender, told = Publisher(), []
    frames = ((f"f{i}", b"png") for i in range(100))
    assert publish.publish(frames, sender, fps=4.0, count=9, outage=told.append, backoff_cap_s=5.0) == 9
    assert [f for f, _, _ in sender.sent] == [f"f{i}" for i in range(9)]  # --count, in order
    times = [t - sender.sent[0][1] for _, t, _ in sender.sent]
    assert times[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # 4 frames/s
    assert times[5] > 1.25  # f5 waited for Redis ...
    assert [b - a for a, b in zip(times[5:], times[6:])] == pytest.approx([0.25] * 3)  # ... then 4/s again
    assert sender.sent[5][2] == pytest.approx(sender.sent[0][1] + 1.25)  # its ts: when it was first tried
    assert len(told) == 2 and "holding frame f5" in told[0] and "frame f5 sent, resuming" in told[1]


def test_results_prints_only_what_arrives_after_it_starts_results_and_dead_letters_alike(redis_stream, monkeypatch):
    """Without --from-start, `ustudents results` skips what the streams held when it started and prints
    one line per result and per dead letter that arrives after."""
    import threading

    from ustudents.worker import schema

    url, client, stream = redis_stream
    results, dead = schema.results_stream(stream), schema.dead_stream(stream)

    def result(frame: str, score: float, anomalous: bool) -> dict:
        return {schema.SCHEMA: 1, schema.FRAME_ID: frame, schema.ENTRY_ID: "1-0", schema.SCORE: score,
                schema.ANOMALOUS: int(anomalous), schema.THRESHOLD: 2.5, schema.MASK: b"", schema.MODEL: "tiles-v1",
                schema.LATENCY_MS: 12.0, schema.CONSUMER: "w1"}

    client.xadd(results, result("old", 1.0, False))
    client.xadd(dead, {schema.FRAME_ID: "old-dead", schema.REASON: schema.EMPTY, schema.ERROR: "zero bytes"})
    done = threading.Event()

    reading = threading.Event()
    xread = redis.Redis.xread

    def noted_xread(self, *args, **kwargs):
        reading.set()
        return xread(self, *args, **kwargs)
    monkeypatch.setattr(redis.Redis, "xread", noted_xread)

    def arrive():
        # once the command reads the streams (it took their last ids before), new entries arrive. Not
        # told by CLIENT LIST's "cmd=xread": under xdist another test's client may be reading then.
        reading.wait(20)
        client.xadd(dead, {schema.FRAME_ID: "new-dead", schema.REASON: schema.DECODE_ERROR, schema.ERROR: "not an image"})
        client.xadd(results, result("new", 3.25, True))
        if not done.wait(20):  # the command missed them: unblock it so that the assertions tell
            client.xadd(results, result("missed", 0.0, False))
            client.xadd(results, result("missed", 0.0, False))

    thread = threading.Thread(target=arrive)
    thread.start()
    try:
        out = CliRunner().invoke(main, ["results", "--stream", stream, "--count", "2", "--redis-url", url])
    finally:
        done.set()
        thread.join()
    assert out.exit_code == 0, out.output
    assert sorted(out.output.splitlines()) == ["new\tscore 3.250\tANOMALOUS\tthreshold 2.500\t12.0 ms\ttiles-v1",
                                               "new-dead\tDEAD decode_error: not an image"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_the_models_load_is_a_ctrl_c(sig, tiny_bundle, tmp_path, monkeypatch):
    """Loading takes minutes on a GPU's first start (engines built). A SIGHUP (a closed terminal) or
    SIGTERM then ended the worker at once (exit 129 or 143, no line); now it stops as on Ctrl-C:
    its metrics server stopped, one line, exit 130."""
    import signal
    import time

    from ustudents.worker import service

    def slow_load(settings):
        os.kill(os.getpid(), getattr(signal, sig))
        time.sleep(1)  # the signal lands here
        raise AssertionError(f"the models went on loading after {sig}")

    monkeypatch.setattr(service, "load_engines", slow_load)
    empty = tmp_path / "empty.env"
    empty.write_text("")
    # the test's own handler: without the command's, the signal would end pytest itself
    def ignore(*args):
        pass

    before = signal.signal(getattr(signal, sig), ignore)
    try:
        result = CliRunner().invoke(main, ["worker", "--stream", "line1", "--model", str(tiny_bundle), "--device", "cpu",
                                           "--env-file", str(empty), "--metrics-port", "0",
                                           "--redis-url", "redis://127.0.0.1:1/0"])
        assert signal.getsignal(getattr(signal, sig)) is ignore  # what was there before the command, put back
    finally:
        signal.signal(getattr(signal, sig), before)
    assert result.exit_code == 130 and "interrupted" in result.output, result.output
    assert "Traceback" not in result.output and "went on loading" not in str(result.exception), result.output


def test_publish_stopped_by_sigterm_reports_the_frames_it_sent(tiny_mvtec, redis_stream, monkeypatch):
    """`timeout`, `docker stop` and systemd end a run with SIGTERM: it ended publish at once, exit 143 and
    no count, where README promises the count however the run ends."""
    import signal
    import time

    from ustudents.worker import publish

    url, client, stream = redis_stream
    source = publish.frames_from

    def terminated_after_3(*args, **kwargs):
        frames = source(*args, **kwargs)
        for _ in range(3):
            yield next(frames)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the signal lands here
        raise AssertionError("publish went on after SIGTERM")

    monkeypatch.setattr(publish, "frames_from", terminated_after_3)
    before = signal.signal(signal.SIGTERM, lambda *args: None)  # without the command's, it would end pytest
    try:
        result = CliRunner().invoke(main, ["publish", str(tiny_mvtec / "tiles" / "test" / "good"), "--stream", stream,
                                           "--loop", "--fps", "0", "--redis-url", url])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 0 and client.xlen(stream) == 3, result.output
    assert result.output.splitlines()[-1].startswith(f"published 3 frames to {stream} in ")


def test_results_prints_results_and_dead_letters_in_the_order_they_were_written(redis_stream, tmp_path, monkeypatch):
    """Read stream by stream, a read's results all came before its dead letters, so --count 3 of a result,
    a dead letter and two more results printed three results and never the dead letter. A result whose
    entry_id is no stream id ended the follower (Redis refused --save's read of its frame), at every
    --from-start again: it is passed over on a line of its own."""
    import cv2
    import numpy as np

    from ustudents.worker import results, schema

    url, client, stream = redis_stream
    mask = cv2.imencode(".png", np.zeros((20, 20), np.uint8))[1].tobytes()

    def result(frame: str, entry_id: str) -> dict:
        return {schema.SCHEMA: 1, schema.FRAME_ID: frame, schema.ENTRY_ID: entry_id, schema.SCORE: 1.0,
                schema.ANOMALOUS: 0, schema.THRESHOLD: 2.5, schema.MASK: mask, schema.MODEL: "tiles-v1",
                schema.LATENCY_MS: 12.0, schema.CONSUMER: "w1"}

    def dead(frame: str, entry_id: str) -> dict:
        return {schema.FRAME_ID: frame, schema.ENTRY_ID: entry_id, schema.REASON: schema.EMPTY,
                schema.ERROR: "zero bytes"}

    client.xadd(schema.results_stream(stream), result("f1", "1-0"), id="10-0")
    client.xadd(schema.dead_stream(stream), dead("f2", "1-1"), id="11-0")
    client.xadd(schema.results_stream(stream), result("f3", "../../etc/passwd"), id="12-0")
    client.xadd(schema.results_stream(stream), result("f4", "99999999999999999999999-0"), id="13-0")  # past 2^64
    # a worker's batch, written at once: one millisecond, each stream counting its own sequence
    client.xadd(schema.results_stream(stream), result("f5", "3-0"), id="20-0")
    client.xadd(schema.dead_stream(stream), dead("f6", "3-1"), id="20-0")
    client.xadd(schema.results_stream(stream), result("f7", "3-2"), id="20-1")
    args = ["results", "--stream", stream, "--from-start", "--redis-url", url, "--save", str(tmp_path / "saved")]
    out = CliRunner().invoke(main, [*args, "--count", "3"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["f1", "f2", "12-0"]
    assert "entry_id '../../etc/passwd' is not a stream entry id (like 1700000000000-0); passed over" in lines[2]
    out = CliRunner().invoke(main, [*args, "--count", "7"])  # and on past it, in the batch's own order
    assert out.exit_code == 0, out.output
    assert [line.split("\t")[0] for line in out.output.splitlines()[3:]] == ["13-0", "f5", "f6", "f7"], out.output
    monkeypatch.setattr(results, "READ_COUNT", 2)  # pages that cut through the streams, and through the batch
    paged = CliRunner().invoke(main, [*args, "--count", "7"])
    assert paged.output.splitlines() == out.output.splitlines(), paged.output


def test_results_save_is_refused_inside_a_dataset_and_a_write_failing_is_no_redis_outage(redis_stream, tmp_path,
                                                                                        monkeypatch):
    """--save into a new folder under a dataset's test/ became a defect type without masks (evaluate then
    refused the dataset); and a picture --save could not write (a full disk, the folder removed) was said
    as 'Redis unreachable', the follower waiting for ever on a Redis that was there."""
    import errno

    import cv2
    import numpy as np

    from ustudents.worker import results, schema

    url, client, stream = redis_stream
    mask = cv2.imencode(".png", np.zeros((20, 20), np.uint8))[1].tobytes()
    client.xadd(schema.results_stream(stream), {
        schema.SCHEMA: 1, schema.FRAME_ID: "f1", schema.ENTRY_ID: "1-0", schema.SCORE: 1.0, schema.ANOMALOUS: 0,
        schema.THRESHOLD: 2.5, schema.MASK: mask, schema.MODEL: "tiles-v1", schema.LATENCY_MS: 12.0,
        schema.CONSUMER: "w1"})
    for part in ("train/good", "test/good"):
        (tmp_path / "data" / "tiles" / part).mkdir(parents=True)
    inside = tmp_path / "data" / "tiles" / "test" / "results"
    args = ["results", "--stream", stream, "--from-start", "--count", "1", "--redis-url", url]
    assert one_error(CliRunner().invoke(main, [*args, "--save", str(inside)])) == (
        f"Error: --save {inside}: inside the dataset folder {tmp_path / 'data' / 'tiles' / 'test'}, where masks and "
        "overlays would be read as the category's own images (under test/, a defect type without masks; under "
        "train/, good parts); give a --save folder outside the dataset")
    assert not inside.exists()

    failures = []

    def full_disk(path, data, mode=None):  # a few times: the old code's wait for Redis then went on
        if len(failures) < 3:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(results, "write_atomically", full_disk)
    saved = tmp_path / "saved"
    result = CliRunner().invoke(main, [*args, "--save", str(saved)])
    assert one_error(result).startswith(f"Error: --save {saved}: cannot write f1_1-0_mask.png there (No space left "
                                        "on device")
    assert "Redis" not in result.output and len(failures) == 1


def test_publish_says_why_no_file_of_a_folder_could_be_read_on_its_first_pass(tmp_path, monkeypatch):
    """Files that cannot be read for an I/O error (or permission) ended the run with 'could be read any more
    (moved or deleted?)', on the very first pass too; that hint is for files gone."""
    import errno

    from ustudents.worker.publish import frames_from

    folder = tmp_path / "cam"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n")

    def failing(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", failing)
    warned: list[str] = []
    with pytest.raises(ValueError) as refused:
        list(frames_from(str(folder), warn=warned.append))
    assert str(refused.value) == (f"{folder}: none of its 2 image files could be read (the lines above say why); "
                                  "check the folder")
    assert warned == [f"{folder / n}: cannot be read (Input/output error); passed over" for n in ("a.png", "b.png")]


def test_results_names_every_line_and_says_why_a_saved_mask_has_no_overlay(redis_stream, tmp_path):
    """Foreign entries: a dead letter without fields printed a line with no name ('\\tDEAD : '); a NaN score
    with anomalous 0 printed 'ok', a verdict nobody made; and an input frame still in the stream but no
    image was said as 'the input frame has left the stream'."""
    import cv2
    import numpy as np

    from ustudents.worker import schema

    url, client, stream = redis_stream
    mask = cv2.imencode(".png", np.zeros((20, 20), np.uint8))[1].tobytes()
    broken = client.xadd(stream, {schema.IMAGE: b"not an image"}).decode()

    def result(frame: str, entry_id: str, score: str) -> dict:
        return {schema.SCHEMA: 1, schema.FRAME_ID: frame, schema.ENTRY_ID: entry_id, schema.SCORE: score,
                schema.ANOMALOUS: 0, schema.THRESHOLD: 2.5, schema.MASK: mask, schema.MODEL: "tiles-v1",
                schema.LATENCY_MS: 12.0, schema.CONSUMER: "w1"}

    client.xadd(schema.dead_stream(stream), {"x": "y"}, id="5-0")
    client.xadd(schema.results_stream(stream), result("nan", "1-0", "nan"), id="6-0")
    client.xadd(schema.results_stream(stream), result("f1", broken, "1.5"), id="7-0")
    out = CliRunner().invoke(main, ["results", "--stream", stream, "--from-start", "--count", "3", "--redis-url", url,
                                    "--save", str(tmp_path / "saved")])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "5-0\tDEAD : "
    assert lines[1].startswith("6-0\tNOT READ: ") and "its score field is 'nan', not a finite number" in lines[1]
    assert lines[2].startswith("f1\tscore 1.500\tok") and "(no overlay: the input frame does not decode" in lines[2]


def test_results_overlay_tints_the_masked_pixels_half_red_and_leaves_the_frame_as_it_was():
    """`results --save`'s overlay blended in numpy float64, 24 bytes a masked pixel a step: gigabytes for a
    frame of tens of megapixels flagged all over. In uint8 now, the same picture to within rounding."""
    import numpy as np

    from ustudents.worker.results import mask_overlay

    frame = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    kept = frame.copy()
    out = mask_overlay(frame, mask)
    assert np.array_equal(frame, kept) and np.array_equal(out[~mask], frame[~mask])
    inside = np.zeros_like(mask)
    inside[11:29, 21:49] = True  # within the outline
    half = (frame.astype(int) + [255, 0, 0]) / 2
    assert np.abs(out[inside] - half[inside]).max() <= 0.5
    assert (out[10, 20:50] == [255, 0, 0]).all()  # the outline, in red
