"""A real scrape: Prometheus (the Debian package) scrapes the local gateway and Triton under load, evaluates
the Helm chart's rendered recording rules, and the series the autoscalers read (HPA via prometheus-adapter,
KEDA's Prometheus queries) come back with values.

The jobs and labels are the ones the chart's ServiceMonitors/PodMonitors produce for release `headct` in
namespace `headct`: job headct-gateway / headct-triton (relabelled), plus namespace and pod.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from demo.synthetic_head import make_head, to_nifti
from headct.local.triton import LocalTriton, free_port
from helm.check import CHART, RULES_VALUE_SET, ensure_helm, render, render_rules, value_sets

pytestmark = pytest.mark.integration

NAMESPACE = "headct"
GATEWAY_JOB, TRITON_JOB = "headct-gateway", "headct-triton"
GATEWAY_POD, TRITON_POD = "headct-gateway-0", "headct-triton-0"
# Bounded load against 127.0.0.1 only: a few seconds of concurrent predictions plus some bad requests.
CONCURRENCY = 3
PREDICTIONS = 12


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: install the Debian package `prometheus` (apt-get install -y prometheus)"
        )
    return path


@pytest.fixture(scope="module")
def chart_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart's rules for the rules value set, evaluated every second instead of every 15 s."""
    helm = ensure_helm("3")
    rules = render_rules(
        helm, value_sets()[RULES_VALUE_SET], ["--set", "monitoring.prometheusRule.interval=1s"]
    )
    path = tmp_path_factory.mktemp("rules") / "headct-rules.yaml"
    path.write_text(rules)
    return path


@pytest.fixture(scope="module")
def keda_queries() -> dict[str, str]:
    """ScaledObject name -> the Prometheus query KEDA runs (keda value set, both Triton signals)."""
    helm = ensure_helm("3")
    queries = {}
    for signal in ("queueComputeRatio", "pendingRequests"):
        manifest = render(
            helm,
            CHART / "ci" / "keda-values.yaml",
            ["--set", f"triton.autoscaling.signal={signal}", "--show-only", "templates/autoscaling.yaml"],
        )
        names = re.findall(r"^  name: (\S+)$", manifest, re.MULTILINE)
        found = [json.loads(q) for q in re.findall(r"^\s+query: (\".*\")$", manifest, re.MULTILINE)]
        assert len(names) == len(found) == 2, manifest
        queries.update({f"{name} ({signal})": query for name, query in zip(names, found, strict=True)})
    return queries


@pytest.fixture(scope="module")
def prometheus(
    triton: LocalTriton, gateway_url: str, chart_rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary, promtool = _binary("prometheus"), _binary("promtool")
    workdir = tmp_path_factory.mktemp("prometheus")
    gateway = urllib.parse.urlsplit(gateway_url).netloc
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(chart_rules)],
        "scrape_configs": [
            {
                "job_name": GATEWAY_JOB,
                "static_configs": [
                    {"targets": [gateway], "labels": {"namespace": NAMESPACE, "pod": GATEWAY_POD}}
                ],
            },
            {
                "job_name": TRITON_JOB,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{triton.ports.metrics}"],
                        "labels": {"namespace": NAMESPACE, "pod": TRITON_POD},
                    }
                ],
            },
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    checked = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(url: str, promql: str) -> list[dict]:
    params = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_value(url: str, promql: str, timeout_s: float = 60) -> list[dict]:
    """Samples of `promql` once it returns at least one finite value."""
    deadline = time.monotonic() + timeout_s
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = query(url, promql)
        if result and all(math.isfinite(float(r["value"][1])) for r in result):
            return result
        time.sleep(1)
    pytest.fail(f"no finite value for {promql} after {timeout_s:.0f} s (last: {result})")


def drive_load(gateway_url: str) -> dict[int, int]:
    """CONCURRENCY threads send PREDICTIONS scans in all, plus a few requests the gateway must reject."""
    scans = [
        to_nifti(
            make_head(np.random.default_rng(seed), hemorrhage=seed % 2 == 0, edema=seed % 3 == 0)
        ).to_bytes()
        for seed in range(CONCURRENCY)
    ]
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def worker(index: int) -> None:
        with httpx.Client(base_url=gateway_url, timeout=120) as client:
            for n in range(index, PREDICTIONS, CONCURRENCY):
                response = client.post(
                    "/v1/predict",
                    content=scans[n % len(scans)],
                    headers={"Content-Type": "application/octet-stream"},
                )
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            bad = client.post(
                "/v1/predict", content=b"", headers={"Content-Type": "application/octet-stream"}
            )
            with lock:
                statuses[bad.status_code] = statuses.get(bad.status_code, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return statuses


def test_recording_rules_for_autoscaling_and_slos_have_values(
    prometheus: str, gateway_url: str, keda_queries: dict[str, str]
) -> None:
    wait_for_value(prometheus, f'up{{job="{GATEWAY_JOB}"}} == 1')
    wait_for_value(prometheus, f'up{{job="{TRITON_JOB}"}} == 1')
    statuses = drive_load(gateway_url)
    assert statuses.get(200) == PREDICTIONS, statuses
    assert statuses.get(400) == CONCURRENCY, statuses

    selector = f'namespace="{NAMESPACE}"'
    # The autoscaling signals, per pod (prometheus-adapter maps namespace + pod onto Pods metrics).
    for series, job, pod in (
        ("headct:triton_queue_compute:ratio", TRITON_JOB, TRITON_POD),
        ("headct:triton_pending_requests:sum", TRITON_JOB, TRITON_POD),
        ("headct:gateway_inflight_requests:sum", GATEWAY_JOB, GATEWAY_POD),
        ("headct:gateway_queue_depth:sum", GATEWAY_JOB, GATEWAY_POD),
    ):
        (sample,) = wait_for_value(prometheus, f"{series}{{{selector}}}")
        assert sample["metric"] == {"__name__": series, "namespace": NAMESPACE, "job": job, "pod": pod}
        assert float(sample["value"][1]) >= 0

    # Triton really queued and computed: the ratio's inputs moved.
    (computed,) = wait_for_value(
        prometheus, f'nv_inference_compute_infer_duration_us{{job="{TRITON_JOB}"}} > 0'
    )
    assert float(computed["value"][1]) > 0

    # SLO rules the alerts and dashboard use.
    (p95,) = wait_for_value(prometheus, 'headct:request_duration_seconds:p95_rate5m{route="/v1/predict"}')
    (p99,) = wait_for_value(prometheus, 'headct:request_duration_seconds:p99_rate5m{route="/v1/predict"}')
    assert 0 < float(p95["value"][1]) <= float(p99["value"][1]) <= 120
    (errors,) = wait_for_value(prometheus, "headct:predict_errors:ratio_rate5m")
    assert float(errors["value"][1]) == 0  # no 5xx under this load: 0, not absent
    (rejections,) = wait_for_value(prometheus, "headct:predict_rejections:ratio_rate5m")
    assert float(rejections["value"][1]) == 0
    (batch,) = wait_for_value(prometheus, "headct:triton_batch_size:avg_rate5m")
    assert float(batch["value"][1]) >= 1
    codes = {r["metric"]["code"] for r in wait_for_value(prometheus, "headct:rejections:rate5m")}
    assert "empty_body" in codes
    stages = {
        r["metric"]["stage"] for r in wait_for_value(prometheus, "headct:stage_duration_seconds:p95_rate5m")
    }
    assert {"preprocess", "infer"} <= stages

    # KEDA's queries, exactly as rendered into the ScaledObjects, return one number each.
    for name, promql in keda_queries.items():
        (sample,) = wait_for_value(prometheus, promql)
        assert float(sample["value"][1]) >= 0, name

    # Every rule group evaluates without error (drift runs every 5 m and may not have run yet).
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    broken = [
        (rule.get("name"), rule.get("lastError"))
        for group in groups
        for rule in group["rules"]
        if rule.get("health") == "err"
    ]
    assert not broken, broken
    assert {g["name"] for g in groups} >= {"headct-autoscaling.rules", "headct-slo.rules", "headct.alerts"}
