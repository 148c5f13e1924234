"""Print the gateway image's requirements: pyproject.toml's pinned [project].dependencies, minus what only
the local (embedded) Triton needs. Standard library only; used by gateway.Dockerfile and tests/helm.

    python docker/gateway_requirements.py [pyproject.toml] > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Only for `make serve`/`make test`'s embedded tritonserver (its binary and the Python-backend model):
# the gateway talks to a separate Triton over gRPC.
# And the `headct batch` cohort client's table and progress bar (headct/client/batch/), which runs on
# the caller's machine.
EXCLUDED = {"nvidia-pytriton", "onnxruntime", "pyarrow", "rich"}
# Never in the gateway image, whatever pyproject says (the gateway does not import them).
FORBIDDEN = {"torch", "torchvision", "onnx", "tensorrt", "nvidia-pytriton", "onnxruntime"}
# The gateway uses tritonclient's gRPC client only; the http extra would add aiohttp/gevent.
EXTRAS = {"tritonclient": "grpc"}


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def gateway_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = []
    for requirement in project["dependencies"]:
        name = _name(requirement)
        if name in EXCLUDED:
            continue
        if name in FORBIDDEN:
            raise SystemExit(f"{requirement!r} must not reach the gateway image")
        if "==" not in requirement:
            raise SystemExit(f"{requirement!r} is not pinned (==) in {pyproject}")
        if name in EXTRAS:
            requirement = re.sub(r"\[[^\]]*\]", f"[{EXTRAS[name]}]", requirement, count=1)
        requirements.append(requirement)
    return requirements


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "pyproject.toml"
    print("\n".join(gateway_requirements(path)))
