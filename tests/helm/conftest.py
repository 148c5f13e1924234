"""Fixtures for the chart tests.

Two kinds of tests live here:
- manifest tests (test_chart*.py) parse `helm template` output and need PyYAML + helm: `make chart-check`
  runs them in its tools venv (build/tools/venv), pointing HEADCT_CHART_RENDERED at the manifests it
  rendered. Without PyYAML (the project's .venv) they are not collected: chart-check runs them.
- test_prepare_repository.py and test_images.py need only the project's own packages and run anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "headct"

if importlib.util.find_spec("yaml") is None:
    collect_ignore_glob = ["test_chart*.py"]


def pytest_report_header() -> str | None:
    if importlib.util.find_spec("yaml") is None:
        return "tests/helm: manifest tests skipped here (no PyYAML); `make chart-check` runs them"
    return None


Docs = list[dict[str, Any]]


def _helm() -> Path:
    from helm.check import ensure_helm

    return Path(os.environ["HEADCT_HELM"]) if os.environ.get("HEADCT_HELM") else ensure_helm("3")


def _load(text: str) -> Docs:
    import yaml

    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def helm() -> Path:
    return _helm()


@pytest.fixture(scope="session")
def rendered(helm: Path) -> dict[str, Docs]:
    """Value-set name -> rendered documents (chart-check's output, or rendered here)."""
    from helm.check import render, value_sets

    directory = os.environ.get("HEADCT_CHART_RENDERED")
    result = {}
    for name, path in value_sets().items():
        text = (Path(directory) / f"{name}.yaml").read_text() if directory else render(helm, path)
        result[name] = _load(text)
    return result


@pytest.fixture(scope="session")
def template(helm: Path) -> Callable[..., Docs]:
    """Render the chart with --set/--values arguments; raises CalledProcessError with helm's stderr."""

    def run(*args: str, values: Path | None = None) -> Docs:
        command = [str(helm), "template", "headct", str(CHART), "--namespace", "headct"]
        if values is not None:
            command += ["--values", str(values)]
        result = subprocess.run([*command, *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
        return _load(result.stdout)

    return run


def find(docs: Docs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [c for c in containers(doc) if c["name"] == name]
    assert len(matches) == 1, f"no container {name} in {doc['metadata']['name']}"
    return matches[0]
