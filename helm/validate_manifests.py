"""Validate rendered chart manifests against Kubernetes and CRD schemas (run in the chart tools venv).

    python helm/validate_manifests.py --kube-version 1.29.0 --kube-version 1.33.0 RENDERED.yaml...

Built-in kinds: kubernetes-validate's bundled OpenAPI schemas, strict (unknown fields are errors), once per
Kubernetes version. Custom resources (Prometheus Operator, KEDA): the cloudcoil pydantic models generated
from those projects' CRDs; a field the model does not know is an error too (detected by a round trip).
Prints one JSON summary line ({file: {kind: count}}) last; exit status 1 on any error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

_PROMETHEUS_OPERATOR = "cloudcoil.models.prometheus_operator.v1"
_KEDA = "cloudcoil.models.keda.v1alpha1"
CRD_MODELS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (_PROMETHEUS_OPERATOR, "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"): (_PROMETHEUS_OPERATOR, "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (_PROMETHEUS_OPERATOR, "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"): (_KEDA, "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): (_KEDA, "TriggerAuthentication"),
}


def _strip_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_empty(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_empty(v) for v in value]
    return value


def _unknown_fields(given: Any, known: Any, path: str = "") -> list[str]:
    """Paths present in `given` but dropped by the model (i.e. not in the CRD schema)."""
    if isinstance(given, dict) and isinstance(known, dict):
        missing = [f"{path}.{k}".lstrip(".") for k in given if k not in known]
        return missing + [
            item for k in given if k in known for item in _unknown_fields(given[k], known[k], f"{path}.{k}")
        ]
    if isinstance(given, list) and isinstance(known, list):
        return [
            item
            for i, (g, k) in enumerate(zip(given, known, strict=False))
            for item in _unknown_fields(g, k, f"{path}[{i}]")
        ]
    return []


def validate_custom(doc: dict[str, Any]) -> list[str]:
    import importlib

    import pydantic

    module_name, class_name = CRD_MODELS[(doc["apiVersion"], doc["kind"])]
    model = getattr(importlib.import_module(module_name), class_name)
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as error:
        return [str(error)]
    dumped = _strip_empty(parsed.model_dump(by_alias=True, exclude_none=True, mode="json"))
    return [f"unknown field {path}" for path in _unknown_fields(doc, dumped)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kube-version", action="append", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()

    failures = 0
    summary: dict[str, dict[str, int]] = {}
    for path in args.files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        summary[path.name] = dict(sorted(Counter(d["kind"] for d in docs).items()))
        for doc in docs:
            where = f"{path.name}: {doc['kind']}/{doc['metadata']['name']}"
            if (doc["apiVersion"], doc["kind"]) in CRD_MODELS:
                for problem in validate_custom(doc):
                    print(f"ERROR {where}: {problem}")
                    failures += 1
                continue
            for version in args.kube_version:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    print(f"ERROR {where}: no schema for {doc['apiVersion']} {doc['kind']} in {version}")
                    failures += 1
                except kubernetes_validate.ValidationError as error:
                    message = str(error).splitlines()[0]
                    path_text = "/".join(str(p) for p in error.path) if hasattr(error, "path") else ""
                    print(f"ERROR {where} (Kubernetes {version}): {path_text}: {message}")
                    failures += 1
    print(json.dumps(summary), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
