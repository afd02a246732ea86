"""The benchmark scripts' own arithmetic and refusals: what makes a committed figure right or wrong.
(The benchmarks themselves are run by hand, never by the suite: their timings are not tests.)"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(stem: str):
    """benchmarks/<stem>.py imported by its path, under a name of its own (benchmarks/engines.py is not
    the engines package); its `from common import ...` finds benchmarks/common.py."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{stem}", BENCHMARKS / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_each_row_is_set_against_the_peak_of_the_arithmetic_it_runs(tmp_path, monkeypatch):
    engines = benchmark_script("engines")
    monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path)
    timing = {"latency_ms": {"p50": 1.0, "p99": 1.0, "n": 3}, "peak_gpu_mb": 1.0, "peak_gpu_mb_first_call": 1.0}
    rows = [{"backend": "naive", "precision": "fp32", "batch": 1, "scales": [17], "frames_per_s": 2.0, **timing},
            {"backend": "torch", "precision": "fp32", "batch": 1, "scales": [17], "frames_per_s": 3.0, **timing},
            {"backend": "torch", "precision": "fp16", "batch": 1, "scales": [17], "frames_per_s": 8.0, **timing},
            {"backend": "onnxruntime", "precision": "int8", "batch": 1, "scales": [17], "frames_per_s": 4.0, **timing}]
    info = {"cpu": "test", "cores": 2, "cpu_features": [], "torch": "x", "gpu": "Test GPU"}
    peak = {"fp32": 100.0, "fp16": 400.0, "tf32": 200.0}
    engines.write_record("rows", rows, info, peak, [1.0], 64, 3, "cuda", quiet=True)
    gflop = engines.flops_per_frame([17], 64) / 1e9
    by_row = {(r["backend"], r["precision"]): r for r in rows}
    # the naive baseline runs with TF32 (PyTorch's cuDNN default); the torch engine's fp32 without it
    assert by_row["naive", "fp32"]["pct_of_peak"] == pytest.approx(100 * 2.0 * gflop / 200.0)
    assert by_row["torch", "fp32"]["pct_of_peak"] == pytest.approx(100 * 3.0 * gflop / 100.0)
    assert by_row["torch", "fp16"]["pct_of_peak"] == pytest.approx(100 * 8.0 * gflop / 400.0)
    assert by_row["onnxruntime", "int8"]["pct_of_peak"] == pytest.approx(100 * 4.0 * gflop / 100.0)  # no int8 peak
    assert by_row["torch", "fp16"]["speedup_vs_naive"] == pytest.approx(4.0)
    record = json.loads((tmp_path / "rows.json").read_text())
    assert record["frame_size"] == 64 and "direct convolutions" in record["flop_count"]


def test_interior_maxima_leave_out_the_border_at_any_width():
    image_score = benchmark_script("image_score")
    maps = np.zeros((2, 8, 8), np.float32)
    maps[:, 0, 0] = 9.0  # the rim's maximum
    maps[:, 3, 4] = 1.0  # the interior's
    for border in (0, 1, 2):  # 0 and 1 once sliced [0:-0], an empty interior
        scores = image_score.score_alternatives(maps, maps, border)
        assert scores[f"interior_max_{border // 2}"] == pytest.approx([9.0, 9.0] if border // 2 == 0 else [1.0, 1.0])
        assert scores[f"interior_max_{border}"] == pytest.approx([9.0, 9.0] if border == 0 else [1.0, 1.0])


def test_a_throughput_run_too_short_for_a_rate_is_refused_before_anything_loads(tmp_path):
    worker_throughput = benchmark_script("worker_throughput")
    result = CliRunner().invoke(worker_throughput.main, [str(tmp_path / "no-model"), "--batch", "8", "--frames", "16",
                                                         "--name", "never-written"])
    assert result.exit_code == 2 and "give at least 24" in result.output  # not a ZeroDivisionError after the run


def test_bf16_training_is_refused_up_front_where_evaluation_could_not_run_it(tmp_path, monkeypatch):
    bench = benchmark_script("train_magnetic_tile")
    (tmp_path / "magnetic_tile" / "train" / "good").mkdir(parents=True)
    trained = []
    monkeypatch.setattr(bench, "train", lambda cfg, log: trained.append(cfg.student.amp) or sys.exit(0))
    monkeypatch.setattr(bench, "native_bf16", lambda device: False)
    args = ["--data-root", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "out"), "--name", "never-written"]
    refused = CliRunner().invoke(bench.main, [*args, "--precision", "bf16"])
    assert refused.exit_code == 2 and "no native bfloat16" in refused.output and trained == []
    CliRunner().invoke(bench.main, args)  # auto: fp32 training here
    monkeypatch.setattr(bench, "native_bf16", lambda device: True)
    CliRunner().invoke(bench.main, args)  # auto: bf16 where native
    assert trained == [False, True]


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")
                                           if p.stem != "common" and ("@name_option" in p.read_text()
                                                                      or '"--name"' in p.read_text())))
def test_a_benchmark_never_replaces_a_result(script, tmp_path, monkeypatch):
    """README's own `worker_throughput.py MODEL --batch 8` wrote over worker_cpu.json, the result its
    Results table cites, in silence (defaults named committed files). --name is required, and a name
    taken is refused before any work."""
    module = benchmark_script(script)
    monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path)
    (tmp_path / "taken.json").write_text("{}")
    assert next(p for p in module.main.params if p.name == "name").required
    for name, says in [("taken", "taken.json exists (a committed result?)"), ("../elsewhere", "give a file name")]:
        # --name comes first on the line, so Click checks it before the other options: before any work
        result = CliRunner().invoke(module.main, ["--name", name])
        assert result.exit_code == 2 and says in result.output, (script, name, result.output)
    assert (tmp_path / "taken.json").read_text() == "{}"


def test_resampled_calibrations_count_new_good_images_at_or_above_the_threshold():
    image_threshold = benchmark_script("image_threshold")
    rng = np.random.default_rng(4)
    maps = (rng.normal(size=(6, 6)) + rng.uniform(0.5, 2, (6, 6)) * rng.normal(size=(200, 6, 6))).astype(np.float32)
    row = image_threshold.resampled_fpr(maps, n=30, trials=150, image_fpr=0.05)
    assert (row["calibration_images"], row["judged_images"], row["trials"]) == (30, 170, 150)
    assert row["product"]["mean"] == pytest.approx(0.05, abs=0.012)
    assert row["numpy_default"]["mean"] > row["product"]["mean"] + 0.01  # the rule it replaced flags more
    with pytest.raises(Exception, match="needs 30 or more"):
        image_threshold.resampled_fpr(maps, n=29, trials=1, image_fpr=0.05)


@pytest.mark.parametrize("case", ["batches", "backends", "size", "no-bundle", "no-masks", "runs", "no-redis"])
def test_a_benchmarks_bad_input_is_one_line_before_any_work(case, tmp_path):
    """A batch 'a', a folder without a bundle, a Redis not there: tracebacks after minutes of work, or
    (an unknown backend) passed over in silence, or (no masks under ROOT) a result of 0 masks written,
    or (an unreachable Redis) 15 minutes of silence."""
    script, args, says = {
        "batches": ("engines", ["--batches", "a"], "'a': give a comma-separated list of whole numbers from 1"),
        "backends": ("engines", ["--backends", "torch,foo"], "give a comma-separated list of torch, onnxruntime"),
        "size": ("engines", ["--image-size", "32"], "32 is not in the range x>=64"),
        "no-bundle": ("worker_start", [str(tmp_path)], "no manifest.json here, so not a model bundle"),
        "no-masks": ("mask_regions", [str(tmp_path)], "no masks under"),
        "runs": ("worker_start", [str(tmp_path), "--runs", "0"], "0 is not in the range x>=1"),
        "no-redis": ("worker_throughput", [str(tmp_path), "--redis-url", "redis://127.0.0.1:1/0"],
                     "--redis-url redis://127.0.0.1:1/0: cannot reach Redis"),
    }[case]
    result = CliRunner().invoke(benchmark_script(script).main, [*args, "--name", f"never-written-{case}"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2 and len(errors) == 1 and says in errors[0], result.output
    assert "Traceback" not in result.output and not list((BENCHMARKS / "results").glob("never-written-*"))
