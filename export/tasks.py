"""Which backbone feeds which task head: task specs, run pairing and backbone groups.

The official downstream code (NYUMedML/headCT_foundation ``main_downstream.py``) fine-tunes a whole
backbone for every task run (its ``--freeze`` flag is ignored) and saves ``vit_<task>.pt`` beside
``<task>_classifier.pt``. A head is only right on the backbone of its own run, so:

* every task names its backbone (``--task NAME=BACKBONE,HEAD[:THRESHOLD]``), or uses the shared
  ``--backbone`` (``--head NAME=HEAD[:THRESHOLD]``);
* a head is paired with its backbone only when both files carry the same run metadata (``epoch`` and
  ``best_loss``, written by the same ``save_checkpoint`` step); otherwise the export is refused, naming
  both files, unless ``--allow-unpaired`` records the override in the model card;
* tasks whose backbones hold identical weights (``weights_sha256``) share one backbone group, so a
  frozen backbone with N linear-probe heads still costs one backbone forward.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from headct import contract

if TYPE_CHECKING:
    from export.checkpoint import LoadedBackbone, LoadedHead

DEFAULT_THRESHOLD = 0.5
_GROUP_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


class ExportError(RuntimeError):
    """The request itself is wrong (bad --task/--head spec, duplicate task, unpaired head, ...)."""


class PairingError(ExportError):
    """A head and the backbone it was given to do not come from the same training run."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: its head file, its backbone file (None: the shared ``--backbone``) and threshold."""

    name: str
    head: Path
    backbone: Path | None = None
    threshold: float = DEFAULT_THRESHOLD
    heldout_auc: float | None = None
    threshold_given: bool = True

    @classmethod
    def parse(cls, text: str) -> TaskSpec:
        """``NAME=BACKBONE,HEAD[:THRESHOLD]`` (``--task``)."""
        name, files, threshold, given = _split_spec(text, "--task", "NAME=BACKBONE,HEAD[:THRESHOLD]")
        backbone, comma, head = files.partition(",")
        if not comma or not backbone or not head:
            raise ExportError(f"--task {text!r}: expected NAME=BACKBONE,HEAD[:THRESHOLD]")
        return cls(name, Path(head), Path(backbone), threshold, threshold_given=given)

    @classmethod
    def parse_head(cls, text: str) -> TaskSpec:
        """``NAME=HEAD[:THRESHOLD]`` (``--head``): a head on the shared ``--backbone``."""
        name, head, threshold, given = _split_spec(text, "--head", "NAME=PATH[:THRESHOLD]")
        return cls(name, Path(head), None, threshold, threshold_given=given)


def _split_spec(text: str, flag: str, form: str) -> tuple[str, str, float, bool]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ExportError(f"{flag} {text!r}: expected {form}")
    files, threshold, given = rest, DEFAULT_THRESHOLD, False
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        with contextlib.suppress(ValueError):  # else the ':' is part of a path, no threshold
            threshold, files, given = float(tail), head, True
    if not 0.0 <= threshold <= 1.0:
        raise ExportError(f"{flag} {text!r}: threshold {threshold} is outside [0, 1]")
    return name, files, threshold, given


@dataclass(frozen=True)
class Pairing:
    status: Literal["verified", "override"]
    detail: str


def check_pairing(task: str, backbone: LoadedBackbone, head: LoadedHead, *, allow_unpaired: bool) -> Pairing:
    """Is `head` the classifier of the run that saved `backbone`? Raise PairingError when not provable."""
    if backbone.run is not None and head.run is not None:
        if backbone.run == head.run:
            return Pairing("verified", f"same run ({head.run.describe()})")
        problem = (
            f"task {task!r}: head {head.path} ({head.run.describe()}) and backbone {backbone.path} "
            f"({backbone.run.describe()}) come from different training runs; the head is only right on "
            "its own run's backbone (give that run's vit_<task>.pt with --task NAME=BACKBONE,HEAD)"
        )
    elif not backbone.config.qkv_bias:
        # The official downstream model is built with qkv bias on and loaded strict=False: a bias-less
        # (released, pretrained) backbone got random qkv biases there, trained with the head, which exist
        # only in that run's saved vit_<task>.pt.
        problem = (
            f"task {task!r}: backbone {backbone.path} has no qkv bias, so it is not the backbone head "
            f"{head.path} was trained on: the official downstream code builds the ViT with qkv bias and "
            "fine-tunes it, and those biases exist only in that run's vit_<task>.pt; give it with "
            "--task NAME=vit_<task>.pt,HEAD"
        )
    else:
        missing = [str(f.path) for f in (backbone, head) if f.run is None]
        problem = (
            f"task {task!r}: cannot verify that head {head.path} was trained on backbone {backbone.path}: "
            f"no epoch/best_loss run metadata in {', '.join(missing)}"
        )
    if not allow_unpaired:
        raise PairingError(problem + ". Pass --allow-unpaired to export anyway (recorded in the card).")
    return Pairing("override", problem)


@dataclass
class BackboneGroup:
    """Tasks sharing one backbone (identical weights); built by `group_backbones`."""

    name: str
    backbone: LoadedBackbone
    checkpoints: list[LoadedBackbone]
    tasks: list[str] = field(default_factory=list)
    probabilities_output: str | None = None
    embedding_output: str = contract.EMBEDDING_NAME
    attention_output: str | None = None


def group_backbones(
    assignments: Sequence[tuple[str | None, LoadedBackbone]],
) -> list[BackboneGroup]:
    """Group (task or None for the embedding-only backbone, backbone) pairs by weights, in first-seen order.

    Output names: one group keeps the contract's plain ``probabilities``/``embedding``; several get
    ``probabilities__<group>``/``embedding__<group>``, the group named after its first backbone file.
    """
    groups: dict[str, BackboneGroup] = {}
    for task, loaded in assignments:
        group = groups.get(loaded.weights_sha256)
        if group is None:
            group = groups[loaded.weights_sha256] = BackboneGroup("", loaded, [])
        if all(c.file_sha256 != loaded.file_sha256 for c in group.checkpoints):
            group.checkpoints.append(loaded)
        if task is not None:
            group.tasks.append(task)
    result = list(groups.values())
    used: set[str] = set()
    for group in result:
        base = _GROUP_NAME_UNSAFE.sub("_", group.backbone.path.stem).strip("_") or "backbone"
        name, n = base, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        group.name = name
        single = len(result) == 1
        group.embedding_output = contract.embedding_output(None if single else name)
        if group.tasks:
            group.probabilities_output = contract.probabilities_output(None if single else name)
            group.attention_output = contract.attention_output(None if single else name)
    return result
