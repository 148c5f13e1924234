"""Strict loading (and saving) of the official FM-HCT checkpoint layouts (fm-hct-model.md §3).

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
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from export.heads import AttentiveHead, LinearHead
from export.model import FMHCTViT, ViTConfig

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
    try:
        from numpy._core.multiarray import _reconstruct, scalar  # numpy 2 (and 1.26's forward alias)
    except ImportError:
        from numpy.core.multiarray import _reconstruct, scalar
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


def load_backbone(
    path: StrPath,
    *,
    weights: Literal["student", "teacher"] = "student",
    num_heads: int | None = None,
) -> tuple[FMHCTViT, ViTConfig]:
    """Load any official backbone layout strictly; returns the float32 model in eval mode and its config.

    ``weights`` picks the DINO student (``state_dict``) or teacher (``momentum_model_state_dict``); it is an
    error to ask for the teacher of a file that has none (bare or fine-tuned).
    """
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
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
    try:
        config = infer_config(state, num_heads=num_heads)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    # Built on the meta device (no 89 M-parameter random init) and filled by assign=True.
    with torch.device("meta"):
        model = FMHCTViT(config)
    _check_and_load(model, state, source, assign=True)
    return model.eval(), config


def load_head(path: StrPath, embed_dim: int, num_heads: int | None = None) -> LinearHead | AttentiveHead:
    """Load a ``*_classifier.pt`` (bare or ``{"state_dict": ...}``); ``wkv.weight`` means attentive."""
    obj = _torch_load(path)
    raw = obj["state_dict"] if _is_training_dict(obj) else obj
    state = _strip_head_keys(_as_state_dict(raw, str(path)))
    head: LinearHead | AttentiveHead
    if "wkv.weight" in state:
        head = AttentiveHead(embed_dim, num_heads if num_heads is not None else embed_dim // 64)
    else:
        head = LinearHead(embed_dim)
    _check_and_load(head, state, str(path), assign=False)
    return head.eval()


def _compiled_layout(module: nn.Module) -> dict[str, Tensor]:
    inner = getattr(module, "_orig_mod", module)  # already torch.compile'd: avoid a double prefix
    return {_COMPILE_PREFIX + k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}


def _atomic_save(obj: Any, path: StrPath) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def sha256_file(path: StrPath) -> str:
    """Hex SHA-256 of a file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
