"""The Dockerfiles: the gateway image is slim, non-root and torch-free; the engine-build image is NVIDIA's
Triton image of the tag the chart serves with (an engine only loads in the TensorRT that built it)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.helm.conftest import CHART, ROOT

DOCKER = ROOT / "docker"
sys.path.insert(0, str(DOCKER))
from gateway_requirements import FORBIDDEN, gateway_requirements  # noqa: E402


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_gateway_requirements_are_pinned_and_torch_free() -> None:
    requirements = gateway_requirements(ROOT / "pyproject.toml")
    names = {re.split(r"[\[=]", r)[0].lower() for r in requirements}
    assert not names & FORBIDDEN
    assert {"fastapi", "uvicorn", "numpy", "scipy", "nibabel", "prometheus-client", "tritonclient"} <= names
    assert all("==" in r for r in requirements)
    assert "tritonclient[grpc]==" in " ".join(requirements)  # no http extra (aiohttp, gevent)


def test_gateway_image_is_slim_and_non_root() -> None:
    steps = instructions(DOCKER / "gateway.Dockerfile")
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 2  # build stage + runtime stage: no compilers or pip caches in the runtime image
    base = next(arg for op, arg in steps if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm", base)
    user = [arg for op, arg in steps if op == "USER"]
    assert user == ["10001:10001"]
    entrypoint = next(arg for op, arg in steps if op == "ENTRYPOINT")
    assert entrypoint == '["python", "-m", "api"]'  # exec form: SIGTERM reaches the server
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert installs and all("-r /tmp/requirements.txt" in arg for arg in installs)  # only the filtered pins


def test_engine_build_image_matches_the_served_triton() -> None:
    text = (DOCKER / "engine-build.Dockerfile").read_text()
    default = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.MULTILINE)
    values = (CHART / "values.yaml").read_text()
    repository = re.search(r"repository: (nvcr\.io/nvidia/tritonserver)\n\s+tag: \"([^\"]+)\"", values)
    assert default and repository
    assert default.group(1) == f"{repository.group(1)}:{repository.group(2)}"
    steps = instructions(DOCKER / "engine-build.Dockerfile")
    assert [arg for op, arg in steps if op == "USER"][-1] == "1000:1000"
    assert "export build-engine --help" in text  # the image proves it can run the builder's CLI
