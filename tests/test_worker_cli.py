"""Worker settings (flags > environment > .env > defaults) and the worker's one-line errors for bad
input at start (exit 2). No Redis needed: every case fails before the worker would connect."""
from __future__ import annotations

import shutil
import socket

import pytest
from click.testing import CliRunner

from ustudents.cli import main
from ustudents.worker.settings import WorkerSettings


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
    assert overridden.exit_code == 2 and "/no/such/model: not a model bundle directory" in overridden.output


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
                                  "port-taken", "bad-device", "no-env-file", "bad-precision-env"])
def test_bad_input_at_start_is_one_line_and_exit_2(case, tiny_bundle, damaged_bundle, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    # metrics port 0 but where the port is the case: the default 9108 may be taken here (a demo)
    base = ["worker", "--stream", "line1", "--model", str(tiny_bundle), "--device", "cpu", "--env-file", str(empty),
            "--metrics-port", "0"]
    bad_precision = tmp_path / "precision.env"
    bad_precision.write_text("USTUDENTS_PRECISION=fp64\n")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    args, expected = {
        "no-stream": (["worker", "--model", str(tiny_bundle)], "--stream / USTUDENTS_STREAM: required"),
        "no-model-dir": (["worker", "--stream", "line1", "--model", str(tmp_path / "nope"), "--metrics-port", "0"],
                         "not a model bundle directory"),
        "damaged-bundle": (["worker", "--stream", "line1", "--model", str(damaged_bundle), "--metrics-port", "0"],
                           "checksum mismatch"),
        "bad-url": (base + ["--redis-url", "localhost:6379"], "is not a Redis URL"),
        "bad-batch": (base + ["--batch", "0"], "--batch / USTUDENTS_BATCH: Input should be greater than or equal to 1"),
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
