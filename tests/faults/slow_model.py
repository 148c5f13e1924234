"""A temporary Triton model repository for fault tests: the real demo model plus ``fmhct_slow``.

``fmhct_slow`` and ``fmhct_sleepy`` have the demo model's config (same input/output names, shapes
and dtypes, same ``model_card`` parameter the gateway reads) but a Python-backend `model.py` that sleeps
``sleep_s`` seconds per batch and answers constant outputs: Triton stays up and reachable while a
request takes longer than any deadline the gateway sets. No warm-up (it would sleep too).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Final

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

#: Sleeps far beyond every deadline the tests set (timeouts).
SLOW_MODEL_NAME: Final = "fmhct_slow"
#: Sleeps a few seconds: long enough to hold a request in flight (admission, draining).
SLEEPY_MODEL_NAME: Final = "fmhct_sleepy"
SLEEP_PARAMETER: Final = "sleep_s"

SLOW_MODEL_SOURCE: Final = '''"""Test model: the demo model's interface, answered after a fixed sleep."""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.sleep_s = float(config["parameters"]["sleep_s"]["string_value"])
        outputs = {tensor["name"]: tensor for tensor in config["output"]}
        self.tasks = int(outputs["probabilities"]["dims"][0])
        self.embedding_dim = int(outputs["embedding"]["dims"][0])

    def execute(self, requests):
        time.sleep(self.sleep_s)
        responses = []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().shape[0]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("probabilities", np.full((batch, self.tasks), 0.5, np.float32)),
                        pb_utils.Tensor("embedding", np.zeros((batch, self.embedding_dim), np.float32)),
                    ]
                )
            )
        return responses
'''


def write_fault_repository(source_model: Path, destination: Path, slow_models: dict[str, float]) -> Path:
    """`destination` holding a copy of `source_model` (e.g. ``model_repository/fmhct``) and one slow
    model per entry of `slow_models` (name -> seconds of sleep); returns `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        source_model, destination / source_model.name, ignore=shutil.ignore_patterns("__pycache__")
    )
    for model_name, sleep_s in slow_models.items():
        config = text_format.Parse((source_model / "config.pbtxt").read_text(), mc.ModelConfig())
        config.name = model_name
        del config.model_warmup[:]
        config.parameters[SLEEP_PARAMETER].string_value = str(sleep_s)
        slow = destination / model_name
        # The version directory the embedded card describes: the gateway refuses a card for another one.
        version = json.loads(config.parameters["model_card"].string_value)["triton_version"]
        (slow / str(version)).mkdir(parents=True)
        (slow / "config.pbtxt").write_text(text_format.MessageToString(config))
        for name in ("labels.txt", "model_card.json"):
            if (source_model / name).is_file():
                shutil.copy2(source_model / name, slow / name)
        (slow / str(version) / "model.py").write_text(SLOW_MODEL_SOURCE)
    return destination
