"""The exported synthetic demo model, run with ONNX Runtime on the CPU: findings for fidelity checks.

Loads the newest ``model_repository/fmhct/<version>/model.onnx`` (built by ``make demo``), the graph
Triton serves for the ``cpu`` target, so a probability difference measured here is one a client would see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
MODEL_DIR: Final = REPO_ROOT / "model_repository" / "fmhct"


def _served_onnx() -> Path:
    """The newest version's ONNX: what Triton serves (its version policy is `latest 1`)."""
    versions = sorted(int(p.name) for p in MODEL_DIR.glob("[1-9]*") if p.name.isdigit())
    return MODEL_DIR / str(versions[-1] if versions else 1) / "model.onnx"


DEFAULT_ONNX: Final = _served_onnx()


class DemoModel:
    """``probabilities(x)`` for float16 ``(3, 96, 96, 96)`` or ``(B, 3, 96, 96, 96)`` model inputs."""

    def __init__(self, path: Path = DEFAULT_ONNX, *, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Per-task positive-class probabilities, shape ``(B, n_tasks)`` (``(1, n)`` for one volume)."""
        batch = x[None] if x.ndim == 4 else x
        (probs,) = self.session.run(["probabilities"], {"image": np.ascontiguousarray(batch, np.float16)})
        return np.asarray(probs, dtype=np.float64)


def demo_model_or_none(path: Path = DEFAULT_ONNX) -> DemoModel | None:
    """The demo model if it has been exported (``make demo``) and onnxruntime is installed."""
    if not path.is_file():
        return None
    try:
        return DemoModel(path)
    except ImportError:
        return None
