"""Assertions on the manifests the chart renders for every value set (helm/headct/ci/*-values.yaml and the
defaults): security, GPU scheduling, engine build, probes, autoscaling, monitoring, network policy."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.conftest import CHART, ROOT, Docs, container, containers, find, one, pod_spec

WORKLOADS = ("Deployment", "Pod")
GATEWAY, TRITON = "headct-gateway", "headct-triton"
GPU_SETS = ("defaults", "gpu-trt", "keda", "hpa-adapter")


def workloads(docs: Docs) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def args(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def rules(docs: Docs) -> list[dict[str, Any]]:
    return [r for pr in find(docs, "PrometheusRule") for g in pr["spec"]["groups"] for r in g["rules"]]


# --- every value set -------------------------------------------------------------------------------------


def test_value_sets_cover_the_issue(rendered: dict[str, Docs]) -> None:
    assert set(rendered) >= {"defaults", "cpu-onnx", "gpu-trt", "keda", "hpa-adapter", "ingress-auth"}


def test_restricted_security_everywhere(rendered: dict[str, Docs]) -> None:
    for name, docs in rendered.items():
        for doc in workloads(docs):
            spec = pod_spec(doc)
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            assert spec["automountServiceAccountToken"] is False, where
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] >= 10000, where
            assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
            for c in containers(doc):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, f"{where} {c['name']}"
                assert sc["allowPrivilegeEscalation"] is False, f"{where} {c['name']}"
                assert sc["capabilities"]["drop"] == ["ALL"], f"{where} {c['name']}"
                assert "add" not in sc["capabilities"], f"{where} {c['name']}"
                assert sc["seccompProfile"]["type"] == "RuntimeDefault", f"{where} {c['name']}"
        for sa in find(docs, "ServiceAccount"):
            assert sa["automountServiceAccountToken"] is False, f"{name}: {sa['metadata']['name']}"


def test_every_container_has_requests_and_memory_limits(rendered: dict[str, Docs]) -> None:
    for name, docs in rendered.items():
        for doc in workloads(docs):
            for c in containers(doc):
                resources = c["resources"]
                where = f"{name}: {doc['metadata']['name']}/{c['name']}"
                assert {"cpu", "memory"} <= set(resources["requests"]), where
                assert {"cpu", "memory"} <= set(resources["limits"]), where
                assert "ephemeral-storage" in resources["limits"], where


def test_no_secret_value_in_pod_specs(rendered: dict[str, Docs]) -> None:
    """Keys reach containers as mounted files only: never as env values or in args."""
    for name, docs in rendered.items():
        for doc in workloads(docs):
            for c in containers(doc):
                assert "envFrom" not in c, f"{name}: {c['name']}"
                for variable in c.get("env", []):
                    assert "secretKeyRef" not in variable.get("valueFrom", {}), f"{name}: {variable}"
                assert not any("admin-key=" in a for a in args(c)), f"{name}: {c['name']} shows the admin key"


def test_standard_labels_on_every_resource(rendered: dict[str, Docs]) -> None:
    for name, docs in rendered.items():
        for doc in docs:
            labels = doc["metadata"].get("labels", {})
            for key in (
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
            ):
                assert key in labels, f"{name}: {doc['kind']}/{doc['metadata']['name']} lacks {key}"


def test_every_pod_is_covered_by_a_network_policy(rendered: dict[str, Docs]) -> None:
    for name, docs in rendered.items():
        selectors = [np["spec"]["podSelector"]["matchLabels"] for np in find(docs, "NetworkPolicy")]
        for doc in workloads(docs):
            labels = (
                doc["metadata"]["labels"]
                if doc["kind"] == "Pod"
                else doc["spec"]["template"]["metadata"]["labels"]
            )
            assert any(sel.items() <= labels.items() for sel in selectors), (
                f"{name}: {doc['metadata']['name']}"
            )


def test_pdbs_and_topology_spread(rendered: dict[str, Docs]) -> None:
    docs = rendered["defaults"]
    for name in (GATEWAY, TRITON):
        pdb = one(docs, "PodDisruptionBudget", name)
        deployment = one(docs, "Deployment", name)
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        spread = pod_spec(deployment)["topologySpreadConstraints"]
        assert {s["topologyKey"] for s in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_helm4_renders_what_helm3_renders(rendered: dict[str, Docs]) -> None:
    import os

    directory = os.environ.get("HEADCT_CHART_RENDERED_HELM4")
    if not directory:
        pytest.skip("run by `make chart-check`, which renders with both helm majors")

    def comparable(docs: Docs) -> dict[tuple[str, str], Any]:
        out = {}
        for doc in docs:
            doc = json.loads(json.dumps(doc))
            if doc["kind"] == "Secret":
                doc["data"] = sorted(doc.get("data", {}))  # random keys differ per render
            out[(doc["kind"], doc["metadata"]["name"])] = doc
        return out

    for name, docs in rendered.items():
        helm4 = [d for d in yaml.safe_load_all((Path(directory) / f"{name}.yaml").read_text()) if d]
        assert comparable(helm4) == comparable(docs), name


# --- gateway ---------------------------------------------------------------------------------------------

GATEWAY_SETTINGS = {
    "HEADCT_HOST", "HEADCT_PORT", "HEADCT_GRPC_PORT", "HEADCT_TRITON_GRPC_URL", "HEADCT_MODEL_NAME",
    "HEADCT_MODEL_VERSION", "HEADCT_INFERENCE_TIMEOUT_S", "HEADCT_MAX_UPLOAD_BYTES", "HEADCT_SPOOL_DIR",
    "HEADCT_PREPROCESS_WORKERS", "HEADCT_RETRY_AFTER_S", "HEADCT_MAX_INFLIGHT", "HEADCT_MAX_QUEUE",
    "HEADCT_BATCH_MAX_SIZE", "HEADCT_BATCH_MAX_DELAY_MS", "HEADCT_WORKERS", "HEADCT_API_KEYS_FILE",
    "HEADCT_BUSY_RETRY_AFTER_S", "HEADCT_REQUEST_TIMEOUT_S", "HEADCT_SHUTDOWN_GRACE_S",
    "HEADCT_BATCHING_ENABLED", "HEADCT_PER_KEY_CONCURRENCY", "HEADCT_LOG_LEVEL", "HEADCT_LOG_FORMAT",
    "HEADCT_MAX_ARCHIVE_MEMBERS", "HEADCT_MAX_UNCOMPRESSED_BYTES", "HEADCT_MAX_MEMBER_BYTES",
    "HEADCT_MAX_COMPRESSION_RATIO", "HEADCT_MAX_VOXELS", "HEADCT_TRITON_SHARED_MEMORY",
}  # fmt: skip


def gateway_setting_names() -> set[str]:
    """HEADCT_* names api/settings.py reads (parsed, not imported: this venv lacks the gateway's deps)."""
    tree = ast.parse((ROOT / "api" / "settings.py").read_text())
    (settings,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    return {
        f"HEADCT_{node.target.id.upper()}"
        for node in settings.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def test_every_gateway_setting_the_chart_sets_exists(rendered: dict[str, Docs]) -> None:
    """A renamed setting would be ignored silently (pydantic-settings skips unknown env): catch it here."""
    known = gateway_setting_names()
    assert "HEADCT_PREPROCESS_WORKERS" in known
    for name, docs in rendered.items():
        settings = env(container(one(docs, "Deployment", GATEWAY), "gateway"))
        unknown = {key for key in settings if key.startswith("HEADCT_")} - known
        assert not unknown, (name, unknown)


def test_gateway_settings_and_probes(rendered: dict[str, Docs]) -> None:
    deployment = one(rendered["defaults"], "Deployment", GATEWAY)
    gateway = container(deployment, "gateway")
    settings = env(gateway)
    assert set(settings) >= GATEWAY_SETTINGS
    assert settings["HEADCT_TRITON_GRPC_URL"] == "headct-triton:8001"
    assert settings["HEADCT_MAX_UPLOAD_BYTES"] == "1073741824"  # not 1.073741824e+09
    assert settings["HEADCT_HOST"] == "0.0.0.0"
    assert gateway["startupProbe"]["httpGet"]["path"] == "/livez"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {p["containerPort"] for p in gateway["ports"]} == {8080, 50051}
    # API keys: a file from a Secret, mounted as a directory so rotation reaches the pod.
    keys_file = Path(settings["HEADCT_API_KEYS_FILE"])
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "api-keys")
    assert keys_file.parent == Path(mount["mountPath"]) and mount["readOnly"] and "subPath" not in mount
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "api-keys")
    secret = one(rendered["defaults"], "Secret", volume["secret"]["secretName"])
    assert keys_file.name in secret["data"]
    # Graceful shutdown: leave the endpoints, then drain, within the grace period.
    sleep = int(gateway["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] >= sleep + 30
    # Read-only root: every written path is a volume.
    mounted = {m["mountPath"] for m in gateway["volumeMounts"]}
    assert {"/tmp", settings["HEADCT_SPOOL_DIR"]} <= mounted
    # The workers' result slots live in /dev/shm: a memory emptyDir larger than the runtime's 64 MB.
    assert {"name": "shm", "mountPath": "/dev/shm"} in gateway["volumeMounts"]
    shm = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Mi"}
    # Triton runs in pods of its own: it cannot map the gateway's shared memory.
    assert settings["HEADCT_TRITON_SHARED_MEMORY"] == "off"


def test_gateway_existing_key_secret_and_multiprocess_metrics(rendered: dict[str, Docs]) -> None:
    docs = rendered["ingress-auth"]
    assert not find(docs, "Secret", "headct-api-keys")  # the user's Secret is used, none is created
    gateway = container(one(docs, "Deployment", GATEWAY), "gateway")
    assert env(gateway)["HEADCT_API_KEYS_FILE"] == "/etc/headct/api-keys/keys.txt"
    multi = container(one(rendered["gpu-trt"], "Deployment", GATEWAY), "gateway")
    assert env(multi)["HEADCT_WORKERS"] == "2"
    assert env(multi)["PROMETHEUS_MULTIPROC_DIR"] in {m["mountPath"] for m in multi["volumeMounts"]}
    assert "PROMETHEUS_MULTIPROC_DIR" not in env(gateway)


def test_pacs_url_and_credentials_from_an_existing_secret(rendered: dict[str, Docs]) -> None:
    """The PACS round trip: URL and deadline as values, the credentials as files of the user's Secret."""
    deployment = one(rendered["ingress-auth"], "Deployment", GATEWAY)
    gateway = container(deployment, "gateway")
    settings = env(gateway)
    assert settings["HEADCT_DICOMWEB_URL"] == "http://orthanc.pacs.svc:8042/dicom-web"
    assert settings["HEADCT_DICOMWEB_TIMEOUT_S"] == "30"
    directory = settings["HEADCT_DICOMWEB_CREDENTIALS_DIR"]
    (mount,) = (m for m in gateway["volumeMounts"] if m["mountPath"] == directory)
    assert mount["readOnly"] is True
    (volume,) = (v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "headct-pacs-credentials"
    assert {item["path"]: item["key"] for item in volume["secret"]["items"]} == {
        "username": "username",
        "password": "password",
    }  # no tokenKey: no token file
    defaults = one(rendered["defaults"], "Deployment", GATEWAY)
    assert not {name for name in env(container(defaults, "gateway")) if name.startswith("HEADCT_DICOMWEB_")}
    assert "pacs-credentials" not in {v["name"] for v in pod_spec(defaults)["volumes"]}


def test_auth_can_be_switched_off(template: Any) -> None:
    docs = template("--set", "gateway.auth.enabled=false")
    gateway = container(one(docs, "Deployment", GATEWAY), "gateway")
    assert "HEADCT_API_KEYS_FILE" not in env(gateway)
    assert not find(docs, "Secret", "headct-api-keys")


# --- Triton ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", GPU_SETS)
def test_triton_on_gpu(rendered: dict[str, Docs], value_set: str) -> None:
    deployment = one(rendered[value_set], "Deployment", TRITON)
    spec = pod_spec(deployment)
    triton = container(deployment, "triton")
    for c in (triton, container(deployment, "prepare-model")):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 == c["resources"]["requests"]["nvidia.com/gpu"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    # GPU pods are replaced one at a time without asking for a spare GPU.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_triton_server_flags(rendered: dict[str, Docs]) -> None:
    triton = container(one(rendered["defaults"], "Deployment", TRITON), "triton")
    command = args(triton)
    server = command[command.index("tritonserver") :]
    assert "--model-control-mode=explicit" in server and "--load-model=fmhct" in server
    assert "--model-repository=/models" in server and "--disable-auto-complete-config" in server
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(server)
    # Admin APIs restricted: the wrapper adds the flags with the key from the mounted Secret file.
    wrapper = command[: command.index("tritonserver")]
    assert "--admin-key-file=/etc/headct/triton-admin/admin-key" in wrapper
    restricted = next(a for a in wrapper if a.startswith("--restricted-apis="))
    assert set(restricted.split("=", 1)[1].split(",")) >= {
        "model-repository",
        "shared-memory",
        "trace",
        "logging",
    }
    assert not any(a.startswith("--allow-client-shm") for a in server)


def test_triton_probes_sized_for_load_and_warmup(rendered: dict[str, Docs]) -> None:
    triton = container(one(rendered["defaults"], "Deployment", TRITON), "triton")
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert (
        startup["httpGet"]["path"] == triton["readinessProbe"]["httpGet"]["path"] == "/v2/models/fmhct/ready"
    )
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_engine_build_init_container(rendered: dict[str, Docs]) -> None:
    deployment = one(rendered["gpu-trt"], "Deployment", TRITON)
    prepare = container(deployment, "prepare-model")
    assert prepare["image"].startswith("ghcr.io/headct-serve/engine-build:0.1.0-triton26.07-py3@sha256:")
    command = args(prepare)
    assert command[:2] == ["python3", "/opt/headct/scripts/prepare_repository.py"]
    assert {"prepare", "--format=trt", "--device=gpu", "--cache=/engine-cache", "--precision=fp16"} <= set(
        command
    )
    assert "--no-fallback" not in command
    cache = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "engine-cache")
    pvc = one(rendered["gpu-trt"], "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pod_spec(deployment)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    # The script is the chart's own file, and a change to it rolls the pods.
    script = one(rendered["gpu-trt"], "ConfigMap", "headct-triton-scripts")["data"]["prepare_repository.py"]
    assert script == (CHART / "files" / "prepare_repository.py").read_text()
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/prepare-script"]
    # Without a cache PVC (defaults) the engine is rebuilt per pod on an emptyDir.
    default_cache = next(
        v
        for v in pod_spec(one(rendered["defaults"], "Deployment", TRITON))["volumes"]
        if v["name"] == "engine-cache"
    )
    assert "emptyDir" in default_cache
    keda = next(
        v
        for v in pod_spec(one(rendered["keda"], "Deployment", TRITON))["volumes"]
        if v["name"] == "engine-cache"
    )
    assert keda["persistentVolumeClaim"]["claimName"] == "headct-engines"
    assert not find(rendered["keda"], "PersistentVolumeClaim")


def test_fallback_can_be_refused(template: Any) -> None:
    docs = template("--set", "engineBuild.fallbackToOnnx=false")
    assert "--no-fallback" in args(container(one(docs, "Deployment", TRITON), "prepare-model"))


def test_cpu_only_onnx(rendered: dict[str, Docs]) -> None:
    deployment = one(rendered["cpu-onnx"], "Deployment", TRITON)
    spec = pod_spec(deployment)
    for c in containers(deployment):
        assert not any("nvidia.com" in k for k in c["resources"]["limits"]), c["name"]
    assert "tolerations" not in spec and "nodeSelector" not in spec
    prepare = container(deployment, "prepare-model")
    assert prepare["image"] == "nvcr.io/nvidia/tritonserver:26.07-py3"  # no engine-build image needed
    assert {"--format=onnx", "--device=cpu"} <= set(args(prepare))
    assert "--pinned-memory-pool-byte-size=0" in args(container(deployment, "triton"))
    assert "--allow-gpu-metrics=false" in args(container(deployment, "triton"))
    assert not any(v["name"] == "engine-cache" for v in spec["volumes"])


def test_model_repository_from_object_store(rendered: dict[str, Docs]) -> None:
    docs = rendered["ingress-auth"]
    deployment = one(docs, "Deployment", TRITON)
    fetch = container(deployment, "fetch-model")
    assert fetch["args"][:3] == [
        "copy",
        ":s3,env_auth=true:imaging-models/headct/fmhct",
        "/model-source/fmhct",
    ]
    assert "--s3-region=eu-west-1" in fetch["args"]
    assert env(fetch)["AWS_SHARED_CREDENTIALS_FILE"].startswith("/etc/headct/object-store/")
    names = [c["name"] for c in pod_spec(deployment)["initContainers"]]
    assert names == ["fetch-model", "prepare-model"]
    source = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "model-source")
    assert "emptyDir" in source
    policy = one(docs, "NetworkPolicy", TRITON)
    assert any(p.get("port") == 443 for rule in policy["spec"]["egress"] for p in rule.get("ports", []))
    # The PVC source (defaults) mounts the claim read-only and needs no egress beyond DNS.
    default_source = next(
        v
        for v in pod_spec(one(rendered["defaults"], "Deployment", TRITON))["volumes"]
        if v["name"] == "model-source"
    )
    assert default_source["persistentVolumeClaim"] == {
        "claimName": "headct-model-repository",
        "readOnly": True,
    }


# --- network policy --------------------------------------------------------------------------------------


def test_only_the_gateway_reaches_triton_inference_and_only_prometheus_metrics(
    rendered: dict[str, Docs],
) -> None:
    docs = rendered["defaults"]
    policy = one(docs, "NetworkPolicy", TRITON)["spec"]
    gateway_pods = one(docs, "Deployment", GATEWAY)["spec"]["selector"]["matchLabels"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(by_port) == {"grpc", "metrics"}
    assert by_port["grpc"] == [{"podSelector": {"matchLabels": gateway_pods}}]
    assert by_port["metrics"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    gateway_policy = one(docs, "NetworkPolicy", GATEWAY)["spec"]
    egress_ports = {p["port"] for rule in gateway_policy["egress"] for p in rule["ports"]}
    assert egress_ports == {8001, 53}


def test_gateway_clients_when_same_namespace_is_not_trusted(rendered: dict[str, Docs]) -> None:
    policy = one(rendered["ingress-auth"], "NetworkPolicy", GATEWAY)["spec"]
    peers = policy["ingress"][0]["from"]
    assert {"podSelector": {}} not in peers
    assert {"podSelector": {"matchLabels": {"headct-gateway-client": "true"}}} in peers
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pacs-bridge"}}} in peers
    test_pod = one(rendered["ingress-auth"], "Pod", "headct-test")
    assert test_pod["metadata"]["labels"]["headct-gateway-client"] == "true"


# --- ingress ---------------------------------------------------------------------------------------------


def test_ingress_exposes_only_the_public_api(rendered: dict[str, Docs]) -> None:
    ingress = one(rendered["ingress-auth"], "Ingress", GATEWAY)
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1", "/docs", "/openapi.json"]
    assert ingress["spec"]["tls"][0]["secretName"] == "headct-tls"
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "1024m"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert not find(rendered["defaults"], "Ingress")


# --- autoscaling -----------------------------------------------------------------------------------------


def recorded(docs: Docs) -> set[str]:
    return {r["record"] for r in rules(docs) if "record" in r}


def test_hpa_autoscaling_v2_with_behavior(rendered: dict[str, Docs]) -> None:
    docs = rendered["hpa-adapter"]
    hpas = {h["metadata"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {GATEWAY, TRITON}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert {"scaleUp", "scaleDown"} <= set(hpa["spec"]["behavior"])
        assert "replicas" not in one(docs, "Deployment", name)["spec"]  # the HPA owns replicas
    triton = hpas[TRITON]["spec"]
    assert triton["metrics"] == [
        {"type": "Pods", "pods": {"metric": {"name": "headct_triton_queue_compute_ratio"},
                                  "target": {"type": "AverageValue", "averageValue": "1"}}}
    ]  # fmt: skip
    assert triton["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 600  # GPU pods scale in slowly
    gateway_metrics = {m["type"]: m for m in hpas[GATEWAY]["spec"]["metrics"]}
    assert gateway_metrics["Pods"]["pods"]["metric"]["name"] == "headct_gateway_inflight_requests"
    assert gateway_metrics["Resource"]["resource"]["name"] == "cpu"
    # The adapter names map onto this chart's recording rules (docs/deploy.md has the adapter config).
    assert {"headct:triton_queue_compute:ratio", "headct:gateway_inflight_requests:sum"} <= recorded(docs)
    assert not find(docs, "ScaledObject")
    assert "replicas" in one(rendered["defaults"], "Deployment", TRITON)["spec"]


def test_keda_scaled_objects_query_the_recording_rules(rendered: dict[str, Docs]) -> None:
    docs = rendered["keda"]
    assert not find(docs, "HorizontalPodAutoscaler")
    scaled = {s["metadata"]["name"]: s for s in find(docs, "ScaledObject")}
    assert set(scaled) == {GATEWAY, TRITON}
    names = recorded(docs)
    for name, obj in scaled.items():
        spec = obj["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["name"] == name
        assert "scaleDown" in spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        prometheus = [t for t in spec["triggers"] if t["type"] == "prometheus"]
        assert len(prometheus) == 1
        query = prometheus[0]["metadata"]["query"]
        series = re.match(r"sum\(([a-z_:]+)\{", query)
        assert series and series.group(1) in names, query
        assert f'job="{name}"' in query and 'namespace="headct"' in query
    assert "headct:triton_pending_requests:sum" in scaled[TRITON]["spec"]["triggers"][0]["metadata"]["query"]
    assert [t["type"] for t in scaled[GATEWAY]["spec"]["triggers"]] == ["prometheus", "cpu"]
    assert (scaled[TRITON]["spec"]["minReplicaCount"], scaled[TRITON]["spec"]["maxReplicaCount"]) == (1, 6)


# --- monitoring ------------------------------------------------------------------------------------------


def test_monitors_relabel_job_to_what_the_rules_select(rendered: dict[str, Docs]) -> None:
    for value_set, kind, key in (
        ("gpu-trt", "ServiceMonitor", "endpoints"),
        ("keda", "PodMonitor", "podMetricsEndpoints"),
    ):
        docs = rendered[value_set]
        monitors = {m["metadata"]["name"]: m for m in find(docs, kind)}
        assert set(monitors) == {GATEWAY, TRITON}
        ports = {}
        for name, monitor in monitors.items():
            (endpoint,) = monitor["spec"][key]
            assert endpoint["relabelings"] == [
                {"action": "replace", "targetLabel": "job", "replacement": name}
            ]
            ports[name] = endpoint["port"]
        assert ports == {GATEWAY: "http", TRITON: "metrics"}
        exprs = " ".join(r["expr"] for r in rules(docs))
        jobs = set(re.findall(r'job="([^"]+)"', exprs))
        assert jobs == {GATEWAY, TRITON}


def test_alerts_have_runbook_entries_and_severities(rendered: dict[str, Docs]) -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in runbook.splitlines()
        if line.startswith("## ")
    }
    alerts = [r for r in rules(rendered["hpa-adapter"]) if "alert" in r]
    assert len(alerts) >= 10
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url.endswith("#" + alert["alert"].lower()), url
        assert alert["alert"].lower() in anchors, f"docs/runbook.md has no '## {alert['alert']}'"
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_recording_rules_required_by_the_issue(rendered: dict[str, Docs]) -> None:
    names = recorded(rendered["gpu-trt"])
    assert {
        "headct:triton_queue_compute:ratio",
        "headct:request_duration_seconds:p95_rate5m",
        "headct:request_duration_seconds:p99_rate5m",
        "headct:predict_errors:ratio_rate5m",
        "headct:predict_rejections:ratio_rate5m",
    } <= names
    # The at-max alert needs an autoscaler; without one it is not rendered.
    assert not any(r.get("alert") == "HeadCTAutoscalerAtMax" for r in rules(rendered["gpu-trt"]))


def known_metric_names() -> set[str]:
    """Gateway metric families from api/metrics.py (+ histogram/counter series) and Triton's."""
    source = (ROOT / "api" / "metrics.py").read_text()
    families = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"([a-z_]+)"', source))
    series = set(families)
    for family in families:
        series |= {f"{family}_bucket", f"{family}_sum", f"{family}_count", f"{family}_total"}
    triton = {
        "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
        "nv_inference_exec_count", "nv_inference_pending_request_count", "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
        "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
    }  # fmt: skip
    return series | triton | {"up"}


PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "clamp_min", "avg", "max", "min", "count", "abs",
    "absent", "and", "or", "on", "le", "label_values", "without", "bool",
}  # fmt: skip


def metric_names_in(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # selectors
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"e\d*", n)}


def test_rules_and_dashboard_use_only_real_metrics(rendered: dict[str, Docs]) -> None:
    docs = rendered["hpa-adapter"]
    known = (
        known_metric_names()
        | recorded(docs)
        | {
            "kube_horizontalpodautoscaler_status_current_replicas",
            "kube_horizontalpodautoscaler_spec_max_replicas",
        }
    )
    for rule in rules(docs):
        unknown = metric_names_in(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"
    dashboard = json.loads(one(docs, "ConfigMap", "headct-dashboard")["data"]["headct.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for expr in exprs:
        unknown = metric_names_in(expr.replace("$", "")) - known
        assert not unknown, f"dashboard: {expr}: {unknown}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["namespace"]["current"]["value"] == "headct"
    assert variables["gateway_job"]["current"]["value"] == GATEWAY
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("latency", "queue", "batch", "errors", "gpu", "finding", "requests per second"):
        assert topic in titles, topic


# --- values schema and guards ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "gateway.replicaz=3",  # typo at component level
        "triton.gpu.prodcut=NVIDIA-H200",  # typo nested
        "monitoring.prometheusRule.thresholds.errorRate=0.1",
        "unknownTopLevel=1",
        "triton.model.format=tensorrt",  # not an enum value
        "autoscaling.engine=knative",
        "gateway.image.digest=latest",
        "triton.modelRepository.objectStore.url=http://example.org/x",
    ],
)
def test_schema_rejects_unknown_keys_and_bad_values(template: Any, setting: str) -> None:
    with pytest.raises(subprocess.CalledProcessError) as error:
        template("--set", setting)
    assert (
        "schema" in error.value.stderr
        or "must be" in error.value.stderr
        or "not allowed" in error.value.stderr
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["triton.gpu.enabled=false"], "needs triton.gpu.enabled=true"),
        (["triton.modelRepository.source=objectStore"], "needs triton.modelRepository.objectStore.url"),
        (["monitoring.serviceMonitor.enabled=true", "monitoring.podMonitor.enabled=true"], "not both"),
        (
            [
                "gateway.autoscaling.enabled=true",
                "gateway.autoscaling.minReplicas=5",
                "gateway.autoscaling.maxReplicas=2",
            ],
            "must not exceed",
        ),
        (["ingress.enabled=true"], "ingress.hosts"),
        (["gateway.terminationGracePeriodSeconds=10"], "preStopSleepSeconds"),
    ],
)
def test_inconsistent_values_fail_with_a_message(template: Any, settings: list[str], message: str) -> None:
    with pytest.raises(subprocess.CalledProcessError) as error:
        template(*[arg for s in settings for arg in ("--set", s)])
    assert message in error.value.stderr


def test_kubernetes_older_than_1_29_is_refused(template: Any) -> None:
    with pytest.raises(subprocess.CalledProcessError) as error:
        template("--kube-version", "1.28.0")
    assert "kubeVersion" in error.value.stderr or "incompatible" in error.value.stderr


def test_long_release_names_fit_kubernetes_limits(helm: Path) -> None:
    name = "headct-imaging-platform-production-eu-west-1-blue-v2"  # 52 of helm's 53 characters
    assert len(name) <= 53
    keda = CHART / "ci" / "keda-values.yaml"
    result = subprocess.run(
        [str(helm), "template", name, str(CHART), "-n", "headct", "-f", str(keda)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for doc in (d for d in yaml.safe_load_all(result.stdout) if d):
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        for key, value in doc["metadata"].get("labels", {}).items():
            assert len(value) <= 63 and len(key.split("/")[-1]) <= 63, (key, value)


def test_defaults_file_is_documented() -> None:
    """Every values.yaml key is in the schema (additionalProperties false makes the reverse hold)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: Any, schema_node: dict[str, Any], path: str) -> None:
        if "$ref" in schema_node:
            schema_node = schema["$defs"][schema_node["$ref"].split("/")[-1]]
        if not isinstance(node, dict) or "properties" not in schema_node:
            return
        for key, value in node.items():
            assert key in schema_node["properties"], f"{path}{key} is not in values.schema.json"
            walk(value, schema_node["properties"][key], f"{path}{key}.")

    walk(values, schema, "")


def test_values_reference_in_the_deploy_guide_is_complete() -> None:
    """docs/deploy.md's values table names every key of values.yaml (objects of Kubernetes types whole)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = set(re.findall(r"^\| `([^`]+)` \|", (ROOT / "docs" / "deploy.md").read_text(), re.MULTILINE))

    def covered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1))

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node:
            return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}.")]
        return [prefix.rstrip(".")]

    missing = [path for path in leaves(values) if not covered(path)]
    assert not missing, f"docs/deploy.md 'Values reference' lacks {missing}"
