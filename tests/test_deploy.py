"""The deploy room (deploy/): Prometheus config and alert rules (promtool), the Grafana dashboard,
compose and Dockerfiles, Kubernetes manifests (offline schemas), the GPU image's engine step, and
the generated settings table. Every check here reads files; none builds images or needs a cluster."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import deploy_script, pyproject

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
WORKER_JOB = "ustudents-worker"

PROMTOOL = shutil.which("promtool")
# Skipped where promtool is missing, except in CI, which installs it (.ci/run) and must run these.
needs_promtool = pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"),
                                    reason="promtool not installed (Debian: apt-get install prometheus); .ci/run installs it")


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is required in CI (.ci/run installs Debian's prometheus package)"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "ustudents.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


# -- Prometheus ----------------------------------------------------------------------------------
@needs_promtool
def test_promtool_accepts_the_compose_config_and_rules():
    done = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(alert_rules())} rules found" in done.stdout  # the config loads every rule
    done = promtool("check", "rules", str(PROM / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_alert_unit_tests_pass():
    done = promtool("test", "rules", str(PROM / "tests" / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_alert_unit_tests_catch_a_wrong_threshold(tmp_path):
    """The unit tests are not vacuous: the lag alert with its threshold raised tenfold fails them."""
    (tmp_path / "tests").mkdir()
    shutil.copy(PROM / "tests" / "alerts_test.yml", tmp_path / "tests" / "alerts_test.yml")
    rules = (PROM / "alerts.yml").read_text()
    assert "(ustudents_consumer_lag_entries) > 100" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace("(ustudents_consumer_lag_entries) > 100",
                                                       "(ustudents_consumer_lag_entries) > 1000"))
    done = promtool("test", "rules", str(tmp_path / "tests" / "alerts_test.yml"))
    assert done.returncode != 0
    assert "UstudentsLagGrowing" in done.stdout + done.stderr


@needs_promtool
def test_k8s_scrape_config_is_valid_prometheus_config(tmp_path):
    """promtool checks everything but the discovery block: Debian's promtool is built without
    Kubernetes service discovery, so that block is checked here and swapped for a static target."""
    (cm,) = load_yaml_docs(K8S / "prometheus-scrape.yaml")
    config = yaml.safe_load(cm["data"]["prometheus.yml"])
    assert config["rule_files"] == ["/etc/prometheus/rules/alerts.yml"]
    config["rule_files"] = [str(PROM / "alerts.yml")]  # where `kubectl create configmap` takes it from
    (job,) = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "endpointslice"}]
    labels = {lab for r in job["relabel_configs"] for lab in r.get("source_labels", [])}
    assert all(lab.startswith("__meta_kubernetes_") for lab in labels)
    job["static_configs"] = [{"targets": ["worker:9108"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each panel's query (Grafana's variables filled in as deploy/check_stack.py
    fills them for a live Prometheus) as a recording rule; a typo in one fails here, not on a screen."""
    queries = deploy_script("check_stack.py").dashboard_queries(dashboard())
    assert len(queries) == len(dashboard_exprs())
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": e}
                                                         for i, (_, e) in enumerate(queries)]}]}
    (tmp_path / "ok.yml").write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(tmp_path / "ok.yml"))
    assert done.returncode == 0 and f"{len(queries)} rules found" in done.stdout, done.stdout + done.stderr
    rules["groups"][0]["rules"][0]["expr"] = queries[0][1].replace(")", "", 1)  # one unbalanced bracket
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(tmp_path / "bad.yml")).returncode != 0



def panel_query(title: str, ref: str, stream: str) -> str:
    """A panel target's PromQL as Grafana sends it with one line selected in the stream variable."""
    panel = next(p for p in dashboard()["panels"] if p["title"] == title)
    expr = next(t["expr"] for t in panel["targets"] if t["refId"] == ref)
    return deploy_script("check_stack.py").grafana_query(expr, stream, "2m")


@needs_promtool
def test_dashboard_queries_show_the_selected_lines_workers_and_traffic(tmp_path):
    """Grafana is not run here, so Prometheus' own engine (promtool's expression tests) evaluates
    the panels' queries on a plant of four workers: a and b (not ready) serve line1, c serves line2,
    d served line1 and went down. Selecting line1 must show line1's workers and traffic only."""
    w = 'job="ustudents-worker", instance="{}:9108"'
    series = {
        f'up{{{w.format("a")}}}': "1x10", f'up{{{w.format("b")}}}': "1x10",
        f'up{{{w.format("c")}}}': "1x10", f'up{{{w.format("d")}}}': "1 1 1 1 0 0 0 0 0 0 0",
        f'ustudents_ready{{{w.format("a")}, stream="line1"}}': "1x10",
        f'ustudents_ready{{{w.format("b")}, stream="line1"}}': "0x10",
        f'ustudents_ready{{{w.format("c")}, stream="line2"}}': "1x10",
        f'ustudents_ready{{{w.format("d")}, stream="line1"}}': "1 1 1 1 stale",
        # a scores 1 frame/s on line1, 1 in 10 anomalous; c scores 2 frames/s on line2, none anomalous
        f'ustudents_frames_processed_total{{{w.format("a")}, stream="line1"}}': "0+60x10",
        f'ustudents_anomalies_total{{{w.format("a")}, stream="line1"}}': "0+6x10",
        f'ustudents_frames_processed_total{{{w.format("c")}, stream="line2"}}': "0+120x10",
        f'ustudents_anomalies_total{{{w.format("c")}, stream="line2"}}': "0x10",
    }
    at = "10m"
    cases = [
        ("Workers up", "A", "line1", [("{}", 2)]),
        ("Workers up", "B", "line1", [("{}", 1)]),
        ("Workers up", "C", "line1", [("{}", 1)]),
        ("Workers up", "A", ".*", [("{}", 3)]),
        ("Workers up", "C", "line2", [("{}", 0)]),
        ("Worker up", "A", "line1", [(f"{{__name__=\"up\", {w.format(i)}}}", v) for i, v in
                                     (("a", 1), ("b", 1), ("d", 0))]),
        ("Frames/s per line", "A", "line1", [('{stream="line1"}', 1)]),
        ("Anomaly rate", "A", "line1", [('{stream="line1"}', 0.1)]),
        ("Anomaly rate", "A", ".*", [('{stream="line1"}', 0.1), ('{stream="line2"}', 0)]),
    ]
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "promql_expr_test": [{"expr": panel_query(title, ref, stream), "eval_time": at,
                              "exp_samples": [{"labels": lab, "value": val} for lab, val in want]}
                             for title, ref, stream, want in cases]}]}
    (tmp_path / "dashboard_test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    done = promtool("test", "rules", str(tmp_path / "dashboard_test.yml"))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr

def test_every_alert_has_a_unit_test_that_fires_it_and_a_runbook_entry():
    names = [r["alert"] for r in alert_rules()]
    assert {"UstudentsWorkerDown", "UstudentsLagGrowing", "UstudentsDeadLetterRate", "UstudentsAnomalyRateSpike",
            "UstudentsLatencyObjectiveBreached"} <= set(names)
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c.get("exp_alerts")}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c.get("exp_alerts")}
    assert set(names) == fired, f"alerts without a firing unit test: {set(names) - fired}"
    assert set(names) <= quiet, f"alerts without a not-firing case: {set(names) - quiet}"
    section = (ROOT / "README.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", section, re.M)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning")
        anchor = rule["annotations"]["runbook"].split("#")[1]
        assert anchor in headings, f"{rule['alert']}: runbook anchor #{anchor} is not a heading of README.md"


def test_worker_job_name_is_the_one_the_alerts_select():
    assert f'up{{job="{WORKER_JOB}"}}' in (PROM / "alerts.yml").read_text()
    jobs = [j["job_name"] for j in yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]]
    assert WORKER_JOB in jobs
    (cm,) = load_yaml_docs(K8S / "prometheus-scrape.yaml")
    assert [j["job_name"] for j in yaml.safe_load(cm["data"]["prometheus.yml"])["scrape_configs"]] == [WORKER_JOB]
    assert any('up{job="ustudents-worker"}' in e for e in dashboard_exprs())


# -- metric names ----------------------------------------------------------------------------------
METRIC_RE = re.compile(r"\bustudents_[a-z0-9_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def referenced_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC_RE.findall(e)}


def unknown_metrics(names: set[str], exported: set[str]) -> set[str]:
    def known(n: str) -> bool:
        return n in exported or any(n.endswith(s) and n[: -len(s)] in exported for s in HISTOGRAM_SUFFIXES)
    return {n for n in names if not known(n)}


def test_every_metric_in_the_dashboard_and_the_rules_is_exported_by_the_worker():
    from ustudents.worker.metrics import METRIC_NAMES, WorkerMetrics

    rules = referenced_metrics([r["expr"] for r in alert_rules()])
    dash = referenced_metrics(dashboard_exprs() + [v["definition"] for v in dashboard()["templating"]["list"]
                                                           if v["type"] == "query"])
    assert len(rules) >= 6 and len(dash) >= 10
    assert unknown_metrics(rules | dash, set(METRIC_NAMES)) == set()
    # and the worker's live registry exposes them under those names (histograms as _bucket/_sum/_count)
    metrics = WorkerMetrics("line1", "ustudents", ["tiles"])
    metrics.processed.labels("line1", "tiles").inc()
    metrics.dead_lettered.labels("line1", "decode_error").inc()
    metrics.anomalies.labels("line1", "tiles").inc()
    for hist in (metrics.inference, metrics.end_to_end, metrics.batch_size):
        hist.labels("line1").observe(1)
    metrics.observe_score("tiles", 2.0, 4.0)
    metrics.lag.labels("line1", "ustudents").set(0)
    metrics.pending.labels("line1", "ustudents").set(0)
    metrics.length.labels("line1").set(0)
    metrics.serving_for.labels("line1").set(0)
    metrics.gpu_memory.labels("line1", "cuda:0", "used").set(0)
    metrics.model_info.labels("line1", "tiles-1", "0.1.0", "tiles", "torch", "fp32", "cpu").set(1)
    exposed = {line.split("{")[0].split(" ")[0] for line in metrics.exposition().decode().splitlines()
               if line and not line.startswith("#")}
    missing = {n for n in rules | dash if n not in exposed}
    assert missing == set(), f"named in dashboard/rules but not exposed by WorkerMetrics: {missing}"


def test_the_name_check_catches_an_unknown_metric():
    from ustudents.worker.metrics import METRIC_NAMES

    names = referenced_metrics(['rate(ustudents_frames_procesed_total[5m])',
                                'histogram_quantile(0.99, rate(ustudents_inference_seconds_bucket[5m]))'])
    assert unknown_metrics(names, set(METRIC_NAMES)) == {"ustudents_frames_procesed_total"}


def test_dashboard_has_the_panels_operations_needs():
    panels = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard()["panels"]}
    wanted = {
        "Frames/s per line": "ustudents_frames_processed_total",
        "Latency p50 / p99": "ustudents_end_to_end_seconds_bucket",
        "Anomaly rate": "ustudents_anomalies_total",
        "Score distribution: $stream": "ustudents_anomaly_score_ratio_bucket",
        "Lag and pending": "ustudents_pending_entries",
        "Dead letters by reason, frames lost": "ustudents_frames_dead_lettered_total",
        "GPU memory": "ustudents_gpu_memory_bytes",
        "Frames held in memory": "ustudents_frames_held_bytes",
        "Worker up": "ustudents_ready",
    }
    for title, metric in wanted.items():
        assert metric in panels.get(title, ""), f"panel {title!r} missing or not on {metric}"
    assert "0.99" in panels["Latency p50 / p99"] and "0.5," in panels["Latency p50 / p99"]
    assert "ustudents_consumer_lag_entries" in panels["Lag and pending"]
    assert "by (stream, reason)" in panels["Dead letters by reason, frames lost"]
    assert "ustudents_frames_trimmed_unread_total" in panels["Dead letters by reason, frames lost"]
    # one panel per line: each line's drift apart
    score = next(p for p in dashboard()["panels"] if p["title"] == "Score distribution: $stream")
    assert score["repeat"] == "stream"
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_matches_the_dashboard_and_compose():
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    # every query through the dashboard's datasource variable, which picks the provisioned one in the
    # stack and lets a plant's own Grafana (the Kubernetes path ships none) pick its Prometheus
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    uids = {p["datasource"]["uid"] for p in dashboard()["panels"]} | \
           {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p["targets"]} | \
           {v["datasource"]["uid"] for v in variables.values() if "datasource" in v}
    assert uids == {"${datasource}"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == ds["type"]
    assert variables["datasource"]["current"]["value"] == ds["uid"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "ustudents.yml").read_text())["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"])
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


# -- compose and Dockerfiles ----------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def worker_settings_env() -> set[str]:
    from ustudents.worker.settings import ENV_PREFIX, WorkerSettings

    return {ENV_PREFIX + n.upper() for n in WorkerSettings.model_fields}


GPU_IMAGE_ENV = {"USTUDENTS_ENGINE_CACHE", "USTUDENTS_ENGINE_PRECISION"}  # deploy/docker/prepare_engines.py


def test_every_ustudents_variable_of_the_deploy_files_is_a_setting_or_one_the_worker_knows_of():
    """The worker warns of USTUDENTS_* variables that set nothing (a misspelt setting is otherwise
    ignored); the deploy files' own variables must not be among them, and each it knows must be used."""
    from ustudents.worker.settings import DEPLOY_VARIABLES, unknown_variables

    used = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix not in (".json", ".pyc"):
            used |= set(re.findall(r"USTUDENTS_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")))
    assert unknown_variables(used) == []
    assert {f"USTUDENTS_{v}" for v in DEPLOY_VARIABLES} <= used
    assert unknown_variables(["USTUDENTS_BATCHSIZE", "USTUDENTS_BATCH", "ustudents_log_level", "PATH"]) == \
        ["USTUDENTS_BATCHSIZE"]


def test_compose_redis_persists_and_is_capped():
    redis = compose()["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--appendfsync everysec" in cmd
    assert re.search(r"--maxmemory \$\{REDIS_MAXMEMORY:-\d+[kmg]b\}", cmd)
    assert "--maxmemory-policy noeviction" in cmd  # never evict stream keys
    assert "--protected-mode no" in cmd  # else Redis refuses the workers on the stack's network
    # one password for Redis, its health check and every client (an empty one is none): set in
    # deploy/.env it reached no container (helper-106's audit)
    assert "--requirepass ${USTUDENTS_REDIS_PASSWORD:-}" in cmd
    assert redis["environment"]["REDISCLI_AUTH"] == "${USTUDENTS_REDIS_PASSWORD:-}"
    for name in ("worker-cpu", "worker-gpu", "publisher"):
        env = compose()["services"][name]["environment"]
        assert env["USTUDENTS_REDIS_PASSWORD"] == "${USTUDENTS_REDIS_PASSWORD:-}", name
        assert env["USTUDENTS_REDIS_URL"] == "${USTUDENTS_REDIS_URL:-redis://redis:6379/0}", name
    assert any(v.endswith(":/data") for v in redis["volumes"])
    # the reply, not redis-cli's exit code, which is 0 on "NOAUTH" once a password is set
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping 2>/dev/null | grep -q PONG"]


def test_compose_workers_are_non_root_read_only_and_health_checked():
    services = compose()["services"]
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    for name in ("worker-gpu", "worker-cpu"):
        w = services[name]
        env = w["environment"]
        port = env["USTUDENTS_METRICS_PORT"]
        assert f"127.0.0.1:{port}/healthz" in " ".join(w["healthcheck"]["test"])
        assert any(v.endswith(":/models:ro") for v in w["volumes"]), f"{name}: bundles must be mounted read-only"
        assert w["read_only"] is True and w["user"].split(":")[0] not in ("0", "root")
        assert env["USTUDENTS_MODEL"].startswith("/models/")
        assert w["depends_on"]["redis"]["condition"] == "service_healthy"
        unknown = set(env) - worker_settings_env() - GPU_IMAGE_ENV
        assert unknown == set(), f"{name}: not worker settings: {unknown}"
        assert (ROOT / w["build"]["dockerfile"]).is_file()
    gpu = services["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert any(v.endswith(":/var/cache/ustudents/engines") and not v.endswith(":ro") for v in gpu["volumes"])


def test_compose_demo_line_and_monitoring():
    services = compose()["services"]
    pub = services["publisher"]
    assert pub["profiles"] == ["demo"] and pub["command"][0] == "publish" and "--loop" in pub["command"]
    # no frames before a worker serves them: a backlog built during training would trip the lag alerts
    assert all(pub["depends_on"][w] == {"condition": "service_healthy", "required": False}
               for w in ("worker-cpu", "worker-gpu"))
    assert services["demo-model"]["command"][:2] == ["demo", "--train-only"]
    prom = services["prometheus"]
    # nor alerts before: no worker can be up while the demo model trains (UstudentsNoWorkerUp)
    assert prom["depends_on"]["demo-model"] == {"condition": "service_completed_successfully", "required": False}
    for v in prom["volumes"]:
        src = v.split(":")[0]
        if src.startswith("./"):
            assert (DEPLOY / src).exists(), v
    assert any(v.endswith("/etc/prometheus/alerts.yml:ro") for v in prom["volumes"])
    dns = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]["dns_sd_configs"][0]
    assert set(dns["names"]) == {"worker-gpu", "worker-cpu"} and str(dns["port"]) == "9108"


def dockerfile_final_stage(name: str) -> list[str]:
    text = (DEPLOY / "docker" / name).read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("FROM ")]
    return lines[starts[-1]:]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles(name):
    text = (DEPLOY / "docker" / name).read_text()
    final = dockerfile_final_stage(name)
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert not any(ln.startswith("RUN ") for ln in final[final.index(next(ln for ln in final if ln.startswith("USER "))):]), \
        "nothing may run as root after USER"
    health = next(ln for ln in final if ln.startswith("HEALTHCHECK"))
    assert "/healthz" in health and "USTUDENTS_METRICS_PORT" in health
    assert any(ln.startswith("VOLUME") and "/models" in ln for ln in final)
    # .dockerignore keeps what is not named out of the context; what is named must stay in it
    allowed = [ln[1:].rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")]
    for ln in text.splitlines():  # every COPY from the build context exists and is sent
        m = re.match(r"COPY (?!--from)(.+) \S+$", ln)
        if m:
            for source in m.group(1).split():
                assert (ROOT / source).exists(), ln
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source}: .dockerignore leaves it out"
    # the dependencies in a layer before the wheel's (a code change must not reinstall them all), the
    # same extras as the wheel's install
    wheel_at = next(i for i, ln in enumerate(final) if ln.startswith("COPY --from=build /wheels"))
    assert any("install -r /tmp/requirements.txt" in ln for ln in final[:wheel_at])
    wheel_extras = re.search(r"ustudents-\*\.whl\)\[([a-z,]+)\]", text).group(1).split(",")
    assert re.search(r"requirements\.py pyproject\.toml (.+) > /requirements\.txt", text).group(1).split() == wheel_extras
    if name == "Dockerfile.gpu":
        assert re.search(r"^ARG TENSORRT_IMAGE=nvcr\.io/nvidia/tensorrt:\S+-py3$", text, re.M)
        assert 'ENTRYPOINT ["/opt/ustudents/gpu-entrypoint.sh"]' in text
        assert "[onnx,tensorrt]" in text
    else:
        assert 'ENTRYPOINT ["ustudents-worker"]' in text
        assert "download.pytorch.org/whl/cpu" in text


def test_gpu_entrypoint_is_valid_sh_and_needs_a_model(tmp_path):
    script = DEPLOY / "docker" / "gpu-entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("USTUDENTS_")}
    done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "USTUDENTS_MODEL is not set" in done.stderr
    # the worker gets the bundles prepare_engines printed and runs the precision their plans were built in
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python3", "echo /var/cache/ustudents/engines/tiles--gpu"),
                       ("ustudents-worker", 'echo "$USTUDENTS_MODEL $USTUDENTS_PRECISION $*"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", USTUDENTS_MODEL="/models/tiles", USTUDENTS_ENGINE_PRECISION="fp16")
    for extra, runs in (({}, "/var/cache/ustudents/engines/tiles--gpu fp16"),
                        ({"USTUDENTS_PRECISION": "int8"}, "/var/cache/ustudents/engines/tiles--gpu int8"),
                        # no plan used: the bundles as they are, in the backend's own default precision
                        ({"USTUDENTS_BACKEND": "torch"}, "/models/tiles ")):
        done = subprocess.run(["sh", str(script), "--stream", "line1"], env={**env, **extra}, capture_output=True,
                              text=True, timeout=30)
        assert done.stdout == f"{runs} --stream line1\n", (extra, done.stdout, done.stderr)
    # a stop while the plans build: passed on to the build, which ends; the worker is not started
    (bin_dir / "python3").write_text("#!/bin/sh\ntrap 'echo build stopped >&2; exit 143' TERM\n"
                                     "touch \"$STARTED\"\nwhile :; do sleep 0.1; done\n")
    started = tmp_path / "started"
    proc = subprocess.Popen(["sh", str(script)], env={**env, "STARTED": str(started)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 143 and "build stopped" in err and out == "", (proc.returncode, out, err)


def test_the_images_requirements_are_the_projects_with_its_extras():
    reqs = deploy_script("docker/requirements.py").requirements(str(ROOT / "pyproject.toml"), ["onnx"])
    project = pyproject()["project"]
    assert set(reqs) == set(project["dependencies"]) | set(project["optional-dependencies"]["onnx"])
    assert any(r.startswith("torch") for r in reqs) and any(r.startswith("onnxruntime") for r in reqs)


# -- the GPU image's engine step --------------------------------------------------------------------
def prepare_module():
    return deploy_script("docker/prepare_engines.py")


def fake_bundle(folder: Path, ident: str = "tiles-20250101T000000Z", threshold: float = 1.0) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"id": ident, "threshold": {"value": threshold}}))
    (folder / "weights.safetensors").write_bytes(b"weights")
    return folder


def test_prepare_engines_builds_once_into_the_cache_and_never_touches_the_mount(tmp_path):
    pe = prepare_module()
    src = fake_bundle(tmp_path / "models" / "tiles")
    for f in (src, *src.iterdir()):
        f.chmod(0o555 if f.is_dir() else 0o444)  # as mounted read-only
    built: list[tuple[Path, str, int]] = []

    def build(path, precision, batch):
        built.append((path, precision, batch))
        (path / f"plan-{precision}-{batch}.engine").write_bytes(b"plan")

    def has_plan(path, precision, batch):  # as the runtime's: this precision, a batch at least as large
        return any(int(p.stem.split("-")[2]) >= batch for p in path.glob(f"plan-{precision}-*.engine"))

    kw = dict(has_plan=has_plan, tag=lambda: "NVIDIA H100 80GB HBM3-sm90-trt10.3.0", build=build)
    try:
        (served,) = pe.prepare([src], tmp_path / "cache", "fp16", 8, **kw)
        assert served.parent == tmp_path / "cache" and served.name.startswith("tiles-20250101T000000Z--NVIDIA-H100")
        assert has_plan(served, "fp16", 8) and not has_plan(src, "fp16", 8) and sorted(p.name for p in src.iterdir()) == ["manifest.json",
                                                                                                   "weights.safetensors"]
        assert built == [(tmp_path / "cache" / f".{served.name}.partial", "fp16", 8)]
        # a restart reuses the plan
        assert pe.prepare([src], tmp_path / "cache", "fp16", 8, **kw) == [served] and len(built) == 1
        # a recalibrated bundle (same id, new manifest) gets a new plan; the old copy goes
        for f in src.iterdir():
            f.chmod(0o644)
        (src / "manifest.json").write_text(json.dumps({"id": "tiles-20250101T000000Z", "threshold": {"value": 2.0}}))
        (served2,) = pe.prepare([src], tmp_path / "cache", "fp16", 8, **kw)
        assert served2 != served and len(built) == 2 and not served.exists()
        # a raised USTUDENTS_BATCH builds a plan that serves it, not one capped at the old maximum
        (served3,) = pe.prepare([src], tmp_path / "cache", "fp16", 16, **kw)
        assert served3 != served2 and built[-1][2] == 16 and len(built) == 3
        # a bundle that has a plan for this GPU is served as it is, but only in the precision asked for
        # and up to the batch it was built for
        other = fake_bundle(tmp_path / "models" / "other", "other-1")
        (other / "plan-fp16-8.engine").write_bytes(b"plan")
        assert pe.prepare([other], tmp_path / "cache", "fp16", 8, **kw) == [other] and len(built) == 3
        assert pe.prepare([other], tmp_path / "cache", "fp16", 4, **kw) == [other] and len(built) == 3
        assert pe.prepare([other], tmp_path / "cache", "fp32", 8, **kw) != [other] and built[-1][1:] == ("fp32", 8)
        assert pe.prepare([other], tmp_path / "cache", "fp16", 16, **kw) != [other] and built[-1][1:] == ("fp16", 16)
    finally:
        for f in (src, *src.iterdir()):
            f.chmod(0o755 if f.is_dir() else 0o644)


def test_prepare_engines_leaves_an_interrupted_commands_leftovers_out_of_its_copy(tmp_path):
    """A SIGKILLed int8 build left a hidden work folder of mode 0700 in engines/: the image's user could
    not read it from the host's read-only mount, and the copy for the build failed with a traceback."""
    pe = prepare_module()
    src = fake_bundle(tmp_path / "models" / "tiles")
    (src / "engines" / ".model-int8.onnx.k2j4.partial").mkdir(parents=True)
    (src / "engines" / ".model-int8.onnx.k2j4.partial" / "model-fp32.onnx").write_bytes(b"fp32")
    (src / "engines" / "model-fp32.onnx").write_bytes(b"onnx")
    built = []
    (served,) = pe.prepare([src], tmp_path / "cache", "fp16", 8, has_plan=lambda path, p, b: bool(built),
                           tag=lambda: "GPU", build=lambda path, p, b: built.append(sorted(
                               f.relative_to(path).as_posix() for f in path.rglob("*"))))
    assert built == [["engines", "engines/model-fp32.onnx", "manifest.json", "weights.safetensors"]]


def test_prepare_engines_asks_the_runtime_for_a_plan_of_the_precision_and_batch_the_worker_runs(small_bundle,
                                                                                                 tmp_path, monkeypatch):
    """The real has_plan: the runtime's find_engine for this GPU (its plan check stubbed: no TensorRT
    here), in the precision asked for, built for batches at least as large as the worker's."""
    import ustudents.engines.tensorrt_build as trt_build
    from ustudents.engines.bundle import load_bundle, update_manifest
    from ustudents.engines.runtime import model_digest
    from ustudents.engines.tensorrt_build import plan_entry

    pe = prepare_module()
    bundle = Path(shutil.copytree(small_bundle, tmp_path / "tiles"))
    entry = plan_entry("fp16", "NVIDIA H100", "10.14", 8, 32, "0" * 64, "0" * 64, model_digest(load_bundle(bundle)))
    update_manifest(bundle, engines=[entry])
    monkeypatch.setattr(trt_build, "plan_mismatch", lambda e: None)  # as if built on this GPU and TensorRT
    assert pe.has_plan(bundle, "fp16", 8) and pe.has_plan(bundle, "fp16", 4)
    assert not pe.has_plan(bundle, "fp32", 8) and not pe.has_plan(bundle, "fp16", 16)
    monkeypatch.setattr(trt_build, "plan_mismatch", lambda e: "built for another GPU")
    assert not pe.has_plan(bundle, "fp16", 8)
    # int8 is never built at start (it needs calibration images): shipped, or refused with the command
    with pytest.raises(pe.PrepareError, match=r"int8 plans are not built at start .* --precision int8 --max-batch 8"):
        pe.prepare([bundle], tmp_path / "cache", "int8", 8, tag=lambda: "gpu", build=lambda *a: None)


def test_prepare_engines_one_line_errors(tmp_path, capsys):
    pe = prepare_module()
    src = fake_bundle(tmp_path / "tiles")

    def failing_build(path, precision, batch):
        raise pe.PrepareError(f"{path}: `ustudents build-engines` failed (exit 1)")
    with pytest.raises(pe.PrepareError, match="failed"):
        pe.prepare([src], tmp_path / "cache", "fp16", 8, has_plan=lambda p, precision, batch: False, tag=lambda: "gpu",
                   build=failing_build)
    with pytest.raises(pe.PrepareError, match="not a model bundle"):
        pe.prepare([tmp_path], tmp_path / "cache", "fp16", 8, has_plan=lambda p, precision, batch: False, tag=lambda: "gpu")
    with pytest.raises(pe.PrepareError, match="TensorRT plans are one of fp32, fp16, int8"):
        pe.prepare([src], tmp_path / "cache", "bf16", 8, has_plan=lambda p, precision, batch: False, tag=lambda: "gpu")
    for env, says in (({"USTUDENTS_MODEL": str(tmp_path / "missing")}, "no such bundle directory"),
                      ({"USTUDENTS_MODEL": str(src), "USTUDENTS_PRECISION": "bf16", "USTUDENTS_ENGINE_PRECISION": "fp16"},
                       "precision bf16 (USTUDENTS_PRECISION, else USTUDENTS_ENGINE_PRECISION)")):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("USTUDENTS_")}, **env}
        done = subprocess.run([sys.executable, str(DEPLOY / "docker" / "prepare_engines.py")], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.strip().count("\n") == 0 and says in done.stderr, done.stderr


def test_prepare_engines_serves_the_workers_endpoints_during_the_build(monkeypatch, capsys):
    """A TensorRT build takes minutes before the worker starts: meanwhile the worker's port answers
    (Prometheus sees it starting, not down) and says why it is not live or ready yet."""
    import urllib.error
    import urllib.request

    pe = prepare_module()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in [k for k in os.environ if k.startswith("USTUDENTS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("USTUDENTS_MODEL", "/models/tiles")
    assert pe.serve_while_building() is None  # no stream set: nothing to label the metrics with
    assert "no metrics endpoint during the build" in capsys.readouterr().err
    monkeypatch.setenv("USTUDENTS_STREAM", "line1")
    monkeypatch.setenv("USTUDENTS_METRICS_PORT", str(port))
    monkeypatch.setenv("USTUDENTS_METRICS_HOST", "127.0.0.1")
    server = pe.serve_while_building()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert 'ustudents_ready{stream="line1"} 0.0' in resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert err.value.code == 503 and b"starting: building TensorRT engines" in err.value.read()
    finally:
        server.stop()


# -- Kubernetes -------------------------------------------------------------------------------------
K8S_VERSION = "1.30"


def k8s_docs() -> list[tuple[str, dict]]:
    return [(f.name, d) for f in sorted(K8S.glob("*.yaml")) for d in load_yaml_docs(f)]


def validate_k8s(doc: dict) -> None:
    """Kubernetes kinds against kubernetes-validate's schemas (strict); KEDA's against deploy/k8s/schemas."""
    if doc["apiVersion"].startswith("keda.sh/"):
        import jsonschema

        schema = json.loads((K8S / "schemas" / "keda.sh_v1alpha1_scaledobject.json").read_text())
        assert doc["kind"] == "ScaledObject"
        jsonschema.Draft202012Validator(schema).validate(doc)
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_manifests_validate_offline():
    import jsonschema
    import kubernetes_validate

    kinds = [d["kind"] for _, d in k8s_docs()]
    assert sorted(kinds) == ["ConfigMap", "ConfigMap", "Deployment", "PersistentVolumeClaim", "ScaledObject", "Service"]
    for name, doc in k8s_docs():
        validate_k8s(doc)
    # the validation is strict: a misspelt field fails
    dep = next(d for _, d in k8s_docs() if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(dep)
    so = next(d for _, d in k8s_docs() if d["kind"] == "ScaledObject")
    so["spec"]["triggers"][0]["metadata"]["pendingEntries"] = "5"
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(so)


def test_k8s_worker_scaled_object_service_and_scrape_fit_together():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs()}
    dep = docs[("Deployment", "ustudents-worker-line1")]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    config = docs[("ConfigMap", "ustudents-worker")]["data"]
    # a GPU per worker, non-root, read-only
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    models = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] is True
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # a roll whose new pod builds its plan for the whole startup allowance is not reported failed
    start = c["startupProbe"]
    assert dep["spec"]["progressDeadlineSeconds"] > start.get("initialDelaySeconds", 0) + \
        start["periodSeconds"] * start["failureThreshold"]
    port = next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"]
    assert str(port) == config["USTUDENTS_METRICS_PORT"]
    # settings are worker settings (or the GPU image's)
    names = set(config) | {n for n in env if n.startswith("USTUDENTS_")}
    assert names - worker_settings_env() - GPU_IMAGE_ENV == set()
    # KEDA scales this Deployment on this stream and group, with env the pod has
    so = docs[("ScaledObject", "ustudents-worker-line1")]
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # KEDA's alone: a replica count here would reset the line on every `kubectl apply`
    assert "replicas" not in dep["spec"]
    # found through the Service only: an annotation-based cluster job would scrape each worker twice
    assert not any(k.startswith("prometheus.io/") for k in pod["metadata"].get("annotations", {}))
    assert so["spec"]["minReplicaCount"] >= 1
    # a pod may build its TensorRT plan for minutes: load must last before pods are added, a few at a time
    up = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]
    assert up["stabilizationWindowSeconds"] >= 60 and all(p["type"] == "Pods" for p in up["policies"])
    # spread over the GPU machines: the constraint selects this line's pods
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    triggers = so["spec"]["triggers"]
    assert any("pendingEntriesCount" in t["metadata"] for t in triggers)
    for t in triggers:
        m = t["metadata"]
        assert t["type"] == "redis-streams"
        assert m["stream"] == env["USTUDENTS_STREAM"]["value"] and m["consumerGroup"] == config["USTUDENTS_GROUP"]
        assert m["addressFromEnv"] in env and m["passwordFromEnv"] in env
    assert env["USTUDENTS_REDIS_URL"]["value"] == f"redis://$({so['spec']['triggers'][0]['metadata']['addressFromEnv']})/0"
    # the Service selects the pods on the port the scrape config keeps
    svc = docs[("Service", "ustudents-worker")]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["name"] == "metrics" and svc["spec"]["ports"][0]["port"] == port
    scrape = yaml.safe_load(docs[("ConfigMap", "ustudents-prometheus")]["data"]["prometheus.yml"])
    keep = scrape["scrape_configs"][0]["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == f"{svc['metadata']['name']};metrics"
    pvc = docs[("PersistentVolumeClaim", "ustudents-models")]
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == models["name"])["persistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"] and claim["readOnly"] is True
    # the workers read it, and bundles can be put on it: a claim provisioned ReadOnlyMany stays empty
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (loader,) = load_yaml_docs(K8S / "tools" / "models-loader.yaml")
    validate_k8s(loader)
    (vol,) = loader["spec"]["volumes"]
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"] and not vol["persistentVolumeClaim"].get("readOnly")
    assert loader["spec"]["securityContext"]["runAsUser"] == pod["spec"]["securityContext"]["runAsUser"]


# -- settings table ---------------------------------------------------------------------------------
def gen_module():
    return deploy_script("gen_settings_table.py")


def test_settings_table_is_generated_from_the_settings_class():
    from ustudents.worker.settings import WorkerSettings

    gen = gen_module()
    table = gen.table()
    for name, field in WorkerSettings.model_fields.items():
        assert f"`USTUDENTS_{name.upper()}`" in table
    assert "| `USTUDENTS_STREAM` | `--stream` | **required** |" in table
    assert "| `USTUDENTS_METRICS_PORT` | `--metrics-port` | `9108` |" in table
    readme = ROOT / "README.md"
    assert gen.main(["--check", str(readme)]) == 0, f"run python deploy/gen_settings_table.py --write {readme}"


def test_settings_table_check_fails_on_a_stale_table(tmp_path, capsys):
    gen = gen_module()
    stale = tmp_path / "README.md"
    stale.write_text((ROOT / "README.md").read_text().replace("`9108`", "`9100`"))
    assert gen.main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert gen.main(["--write", str(stale)]) == 0 and gen.main(["--check", str(stale)]) == 0
    (tmp_path / "none.md").write_text("no markers\n")
    assert gen.main(["--check", str(tmp_path / "none.md")]) == 2


def test_the_runbooks_readiness_command_prints_why_a_worker_is_not_ready():
    """The runbook's command used urlopen, which raises on a 503 and never printed the reason."""
    from ustudents.worker import metrics

    command = re.search(r'python3 -c "(import http\.client[^"]+/readyz[^"]+)"', (ROOT / "README.md").read_text())
    assert command, "README: the runbook's /readyz command is gone"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = metrics.starting("line1", "127.0.0.1", port, "loading the model")
    try:
        done = subprocess.run([sys.executable, "-c", command.group(1).replace("9108", str(port))],
                              capture_output=True, text=True, timeout=30)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    status, body = done.stdout.split(" ", 1)
    assert status == "503" and json.loads(body) == {"ok": False, "reason": "starting: loading the model"}
