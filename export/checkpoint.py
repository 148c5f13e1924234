"""Strict loading (and saving) of the official FM-HCT checkpoint layouts (official
NYUMedML/headCT_foundation src/utils/misc.py ``save_checkpoint`` / ``load_model``).

Backbone files come in three layouts, all accepted by ``load_backbone``:

* a bare backbone state_dict (the file the authors hand out), possibly ``module.``/``backbone.``-prefixed;
* a DINO training dict: ``state_dict`` = student, ``momentum_model_state_dict`` = teacher, keys
  ``module.backbone.*`` plus ``module.head.*`` DINO-head keys (ignored);
* a fine-tuned dict: ``state_dict`` with ``_orig_mod.`` keys (torch.compile), no teacher.

The official loader strips prefixes as substrings and loads with ``strict=False``, which silently drops
register tokens / qkv biases. Here the architecture is built from the keys present and every tensor must
match: any missing or unexpected key or wrong shape raises ``CheckpointError``.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from export.heads import AttentiveHead, LinearHead
from export.model import FMHCTViT, ViTConfig
from headct.files import atomic_write_bytes, sha256_file

StrPath = str | os.PathLike[str]

# Wrapper components added by DDP and torch.compile; stripped only as whole leading components.
_WRAPPER_PREFIXES = frozenset({"module", "_orig_mod"})
_COMPILE_PREFIX = "_orig_mod."
_ANCHOR_KEYS = ("cls_token", "patch_embedding.patch_embeddings.weight", "patch_embedding.position_embeddings")
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """The file is not a checkpoint of the expected kind, or its tensors do not match the model exactly."""


# --------------------------------------------------------------------------------------------- reading


def _numpy_safe_globals() -> list[Any]:
    """numpy reconstructors that the official files need under ``weights_only=True``.

    Fine-tuned checkpoints store ``best_loss`` as a numpy float (mean AUROC from a numpy array), and
    optimizer/scheduler dicts may hold numeric arrays. These entries rebuild numeric scalars/arrays only;
    object arrays still need ``ObjectDType``, which stays refused, so no arbitrary code can run. Names are
    registered under both numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) module paths.
    """
    try:
        import numpy as np
    except ImportError:  # numpy absent: such files cannot be read, and torch will say which global failed
        return []
    try:  # numpy 2 (and 1.26's forward alias); by name, as numpy's stubs do not declare these private names
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    scalar, _reconstruct = multiarray.scalar, multiarray._reconstruct
    allowed: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(scalar, f"{module}.scalar"), (_reconstruct, f"{module}._reconstruct")]
    allowed += sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdg"}, key=str)
    return allowed


def _torch_load(path: StrPath) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises KeyError, EOFError, RuntimeError... on non-checkpoints
        raise _load_failure(path, exc) from exc


def _load_failure(path: Path, exc: Exception) -> CheckpointError:
    """Tell "weights_only refused a Python object" apart from "these bytes are no checkpoint"."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused or "allowlisted" in text:
        what = f"the Python object {refused.group(1)}" if refused else "a non-tensor Python object"
        # Never retried with weights_only=False: that would execute whatever the pickle names.
        return CheckpointError(
            f"{path}: torch.load(weights_only=True) refused {what}. A file that holds more than tensors, "
            "numbers and plain containers must be re-saved as a plain state_dict (in a trusted environment) "
            "before it can be served."
        )
    detail = next((line for line in lines if "WeightsUnpickler error" not in line), type(exc).__name__)
    return CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {detail[:200]})")


def _as_state_dict(obj: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{what} is not a non-empty state_dict (got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{what} is not a state_dict: non-tensor entries {_fmt_list(bad)}")
    return dict(obj)


def _is_training_dict(obj: Any) -> bool:
    """The ``save_checkpoint`` layout: a dict whose ``state_dict`` entry is itself a mapping."""
    return isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)


def _strip_wrappers(parts: list[str]) -> list[str]:
    i = 0
    while i < len(parts) - 1 and parts[i] in _WRAPPER_PREFIXES:
        i += 1
    return parts[i:]


def _normalise_backbone_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip DDP/compile wrappers and the MultiCropWrapper ``backbone.`` level; drop DINO ``head.*``.

    ``head.*`` keys are ignored only when the file really is a MultiCropWrapper (it has ``backbone.*`` keys);
    in any other file they are reported as unexpected like every other stray key.
    """
    stripped: list[tuple[str, str, bool, bool]] = []  # (original, new, under backbone, dino head)
    for key in state:
        parts = _strip_wrappers(key.split("."))
        under_backbone = len(parts) > 1 and parts[0] == "backbone"
        if under_backbone:
            parts = _strip_wrappers(parts[1:])
        is_head = len(parts) > 1 and parts[0] == "head"
        stripped.append((key, ".".join(parts), under_backbone, is_head))
    wrapped = any(under for _, _, under, _ in stripped)
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, new, under_backbone, is_head in stripped:
        if wrapped and is_head and not under_backbone:
            continue
        if new in out:
            raise CheckpointError(f"keys {origin[new]!r} and {key!r} both become {new!r} without prefixes")
        out[new] = state[key]
        origin[new] = key
    return out


def _strip_head_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = ".".join(_strip_wrappers(key.split(".")))
        if new in out:
            raise CheckpointError(f"keys {origin[new]!r} and {key!r} both become {new!r} without prefixes")
        out[new] = value
        origin[new] = key
    return out


# ------------------------------------------------------------------------------------ strict matching


def _fmt_list(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"({len(items)}) {shown}{more}"


def _check_and_load(module: nn.Module, state: dict[str, Tensor], source: str, *, assign: bool) -> None:
    """Compare keys and shapes ourselves (one complete message), then ``load_state_dict(strict=True)``."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match {type(module).__name__} exactly:"]
        if missing:
            lines.append(f"  missing keys {_fmt_list(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys {_fmt_list(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches {_fmt_list(mismatched)}")
        raise CheckpointError("\n".join(lines))
    # Floating tensors (e.g. a half-precision export) become float32: the serving graph computes in fp32.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:  # e.g. a dtype the parameter cannot take
        raise CheckpointError(f"{source}: {exc}") from exc


def _shape(state: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not an FM-HCT backbone state_dict: key {key!r} is missing")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{key} has shape {shape}; expected a {ndim}-D tensor")
    return shape


def infer_config(state: Mapping[str, Tensor], num_heads: int | None = None) -> ViTConfig:
    """Build the ViTConfig a (prefix-stripped) backbone state_dict was saved from, from keys and shapes."""
    embed_dim, in_chans, *kernel = _shape(state, "patch_embedding.patch_embeddings.weight", 5)
    if len(set(kernel)) != 1:
        raise CheckpointError(f"patch conv kernel {tuple(kernel)} is not cubic")
    num_patches = _shape(state, "patch_embedding.position_embeddings", 3)[1]
    grid = round(num_patches ** (1 / 3))
    if grid**3 != num_patches:
        raise CheckpointError(f"position table has {num_patches} patch tokens, not a cubic grid")
    _shape(state, "cls_token", 3)
    block_ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not block_ids:
        raise CheckpointError("not an FM-HCT backbone state_dict: no blocks.N.* keys")
    # depth = highest index + 1, so a gap shows up as missing keys instead of a silently shorter model.
    depth = max(block_ids) + 1
    # Read from the first block that has it, so one block's missing key is reported by the strict check.
    mlp_keys = [f"blocks.{i}.mlp.linear1.weight" for i in sorted(block_ids)]
    mlp_dim = _shape(state, next((k for k in mlp_keys if k in state), mlp_keys[0]), 2)[0]
    qkv_bias = any(f"blocks.{i}.attn.qkv.bias" in state for i in block_ids)
    registers = _shape(state, "register_tokens", 3)[1] if "register_tokens" in state else 0
    heads = num_heads if num_heads is not None else embed_dim // 64  # ViT convention: head dim 64
    try:
        return ViTConfig(
            img_size=grid * kernel[0],
            patch_size=kernel[0],
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=heads,
            mlp_dim=mlp_dim,
            qkv_bias=qkv_bias,
            num_register_tokens=registers,
        )
    except ValueError as exc:
        raise CheckpointError(f"inconsistent backbone shapes: {exc}") from exc


# ----------------------------------------------------------------------------------------- public API


Registers = Literal["drop", "keep"]


@dataclass(frozen=True)
class RunInfo:
    """What the official ``save_checkpoint`` stores beside the weights; equal in both files of one run.

    The downstream code writes ``vit_<task>.pt`` and ``<task>_classifier.pt`` in the same step with the
    same ``epoch`` and ``best_loss`` (the best mean validation AUROC), so a differing pair means the head
    was trained on another run's backbone.
    """

    epoch: int
    best_loss: float

    def describe(self) -> str:
        return f"epoch {self.epoch}, best_loss {self.best_loss:.6g}"


@dataclass(frozen=True)
class LoadedBackbone:
    path: Path
    model: FMHCTViT
    config: ViTConfig
    file_sha256: str
    weights_sha256: str  # of the tensors as served (after prefix stripping and register handling)
    run: RunInfo | None
    registers: Literal["none", "dropped", "kept"]


@dataclass(frozen=True)
class LoadedHead:
    path: Path
    module: LinearHead | AttentiveHead
    file_sha256: str
    run: RunInfo | None


def _run_info(obj: Any) -> RunInfo | None:
    """``epoch``/``best_loss`` of a training dict; None for a bare state_dict or non-numeric values."""
    if not _is_training_dict(obj):
        return None
    epoch, best = obj.get("epoch"), obj.get("best_loss")
    try:
        return RunInfo(epoch=int(epoch), best_loss=float(best))
    except (TypeError, ValueError):
        return None


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in state_dict order.

    Two files hold the same backbone exactly when this matches, whatever their wrapper, prefixes or
    training metadata: it is what groups tasks onto one shared backbone.
    """
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def load_backbone_checkpoint(
    path: StrPath,
    *,
    weights: Literal["student", "teacher"] = "student",
    num_heads: int | None = None,
    registers: Registers = "keep",
    file_sha256: str | None = None,
) -> LoadedBackbone:
    """Load any official backbone layout strictly, with what serving needs to know about the file.

    ``registers="drop"`` builds the model without the file's register tokens, as the official downstream
    configs do (``NUM_REGISTER_TOKENS: 0``, loaded with ``strict=False``): a DINO checkpoint's 4 registers
    then never enter the sequence (513 tokens, not 517). ``"keep"`` serves them. Only ``register_tokens``
    may be dropped; every other tensor must still match exactly. `file_sha256`: the file's hash when the
    caller has it already (a ViT-B file is ~360 MB), else it is computed here.
    """
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    if registers not in ("drop", "keep"):
        raise ValueError(f"registers must be 'drop' or 'keep', got {registers!r}")
    path = Path(path)
    obj = _torch_load(path)
    if _is_training_dict(obj):
        entry = "state_dict" if weights == "student" else "momentum_model_state_dict"
        if obj.get(entry) is None:
            raise CheckpointError(f"{path}: weights={weights!r} requested but {entry!r} is absent or None")
        raw = _as_state_dict(obj[entry], f"{path}[{entry!r}]")
        source = f"{path}[{entry!r}]"
    else:
        if weights == "teacher":
            raise CheckpointError(f"{path}: a bare state_dict holds one set of weights; there is no teacher")
        raw = _as_state_dict(obj, str(path))
        source = str(path)
    state = _normalise_backbone_keys(raw)
    register_state: Literal["none", "dropped", "kept"] = "none"
    if "register_tokens" in state:
        register_state = "kept" if registers == "keep" else "dropped"
        if registers == "drop":
            state = {k: v for k, v in state.items() if k != "register_tokens"}
    try:
        config = infer_config(state, num_heads=num_heads)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    # Built on the meta device (no 89 M-parameter random init) and filled by assign=True.
    with torch.device("meta"):
        model = FMHCTViT(config)
    _check_and_load(model, state, source, assign=True)
    model.eval()
    return LoadedBackbone(
        path=path,
        model=model,
        config=config,
        file_sha256=file_sha256 if file_sha256 is not None else sha256_file(path),
        weights_sha256=weights_sha256(model),
        run=_run_info(obj),
        registers=register_state,
    )


def load_backbone(
    path: StrPath,
    *,
    weights: Literal["student", "teacher"] = "student",
    num_heads: int | None = None,
) -> tuple[FMHCTViT, ViTConfig]:
    """Load any official backbone layout strictly (registers kept); returns the float32 model and config.

    ``weights`` picks the DINO student (``state_dict``) or teacher (``momentum_model_state_dict``); it is an
    error to ask for the teacher of a file that has none (bare or fine-tuned).
    """
    loaded = load_backbone_checkpoint(path, weights=weights, num_heads=num_heads, registers="keep")
    return loaded.model, loaded.config


def load_head_checkpoint(path: StrPath, embed_dim: int, num_heads: int | None = None) -> LoadedHead:
    """Load a ``*_classifier.pt`` (bare or ``{"state_dict": ...}``); ``wkv.weight`` means attentive."""
    path = Path(path)
    obj = _torch_load(path)
    raw = obj["state_dict"] if _is_training_dict(obj) else obj
    state = _strip_head_keys(_as_state_dict(raw, str(path)))
    head: LinearHead | AttentiveHead
    if "wkv.weight" in state:
        head = AttentiveHead(embed_dim, num_heads if num_heads is not None else embed_dim // 64)
    else:
        head = LinearHead(embed_dim)
    _check_and_load(head, state, str(path), assign=False)
    return LoadedHead(path=path, module=head.eval(), file_sha256=sha256_file(path), run=_run_info(obj))


def load_head(path: StrPath, embed_dim: int, num_heads: int | None = None) -> LinearHead | AttentiveHead:
    """Load a ``*_classifier.pt`` (bare or ``{"state_dict": ...}``); ``wkv.weight`` means attentive."""
    return load_head_checkpoint(path, embed_dim, num_heads).module


def _compiled_layout(module: nn.Module) -> dict[str, Tensor]:
    inner = getattr(module, "_orig_mod", module)  # already torch.compile'd: avoid a double prefix
    return {_COMPILE_PREFIX + k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}


def _atomic_save(obj: Any, path: StrPath) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_finetuned(
    backbone: nn.Module,
    head: nn.Module,
    backbone_path: StrPath,
    head_path: StrPath,
    *,
    epoch: int = 0,
    best_metric: float = 0.0,
) -> None:
    """Write the official fine-tuned layout: two training dicts with ``_orig_mod.``-prefixed state_dicts.

    ``best_metric`` goes to ``best_loss`` (the official code stores the best mean validation AUROC there).
    """
    for module, path in ((backbone, backbone_path), (head, head_path)):
        _atomic_save(
            {
                "epoch": int(epoch),
                "best_loss": float(best_metric),
                "state_dict": _compiled_layout(module),
                "momentum_model_state_dict": None,
                "optimizer": {},
                "scheduler": {},
            },
            path,
        )
