"""Train the SYNTHETIC DEMO MODEL: a reduced FM-HCT (same architecture, less width/depth) with one
linear head per finding (hemorrhage, edema), multi-task, on synthetic heads.

SYNTHETIC DEMO MODEL - NOT FOR CLINICAL USE (`headct.model_card.SYNTHETIC_DEMO_NOTICE`).

    python -m demo.train [--out build/demo/checkpoints] [--force] [--workers 2]

Pipeline:

1. plan the cases: a seeded, class-balanced list (4 combinations of the two findings) for a training
   split and a held-out split whose seeds never overlap; most heads on the 1 mm RAS grid (the
   preprocessing resample is then a no-op), a minority at a clinical anisotropic spacing and/or
   stored LPS, so the real reorient + spline path is exercised;
2. generate each head (`demo.synthetic_head`) and run the production preprocessing
   (`headct.preprocess.preprocess`, float16) -- the same tensors the server will compute; cached
   under ``build/demo/cache`` keyed by a hash of the data config and code versions;
3. train backbone + heads jointly from scratch (float16 -> float32 like the training loader; 2-class
   cross-entropy per head as in the official downstream code; AdamW, warm-up + cosine; random
   left-right flips), plus two training-only aids driven by the generator's lesion masks (see
   `train_model`): a throw-away per-patch lesion read-out and a guidance of the CLS attention onto
   lesion patches -- together they make the small, focal hemorrhage learnable from a few hundred
   volumes in minutes; the saved model is the plain architecture;
4. evaluate on the held-out split: AUC per finding (rank formula), sensitivity/specificity at the
   decision threshold 0.5 on softmax[:, 1] (classes are balanced, so the untuned argmax boundary
   is used instead of a threshold fitted on the test set);
5. save in the official fine-tuned layout (`export.checkpoint.save_finetuned`) +
   ``metrics.json``.

Reproducible: numpy `SeedSequence` per case (independent of worker scheduling), `torch.manual_seed`,
a fixed torch thread count and a seeded data order. Bit-identical weights need the same torch build
and thread count.

torch is imported only inside the training functions, so the generation workers (and anything that
only plans/generates data) never load it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import numpy as np

from headct import contract
from headct.model_card import SYNTHETIC_DEMO_NOTICE
from headct.volume import Volume

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from export.model import Block, FMHCTViT

TASKS: Final = ("hemorrhage", "edema")
CHECKPOINT_STEM: Final = "fmhct_demo"
REPO_ROOT: Final = Path(__file__).resolve().parents[1]
DEFAULT_OUT: Final = REPO_ROOT / "build" / "demo" / "checkpoints"
DEFAULT_CACHE: Final = REPO_ROOT / "build" / "demo" / "cache"
METRICS_FILENAME: Final = "metrics.json"
#: Bump when the synthetic generator changes its output for the same seed (invalidates the cache).
GENERATOR_VERSION: Final = "synthetic-head-v5"
#: Decision threshold on softmax[:, 1]; see the module docstring.
DECISION_THRESHOLD: Final = 0.5
#: Patch grid of the backbone (96 / 12 per axis): where the auxiliary patch targets live.
PATCH_SIZE: Final = 12
_X, _Y, _Z = contract.INPUT_SPATIAL
PATCH_GRID: Final = (_X // PATCH_SIZE, _Y // PATCH_SIZE, _Z // PATCH_SIZE)


def backbone_path(out_dir: Path) -> Path:
    return Path(out_dir) / f"{CHECKPOINT_STEM}.pt"


def head_path(out_dir: Path, task: str) -> Path:
    """The official naming: ``<backbone stem>_<task>_classifier.pt``."""
    return Path(out_dir) / f"{CHECKPOINT_STEM}_{task}_classifier.pt"


def output_paths(out_dir: Path) -> list[Path]:
    return [backbone_path(out_dir), *(head_path(out_dir, t) for t in TASKS), Path(out_dir) / METRICS_FILENAME]


# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """What to generate. Counts are rounded up to multiples of 4 (balanced finding combinations)."""

    seed: int = 20261129
    n_train: int = 160
    n_test: int = 64
    #: Fraction of cases generated at an anisotropic clinical spacing (in-plane 0.6-1.0 mm,
    #: slices 2-5 mm) to exercise the spline resample; capped slice counts keep them cheap.
    anisotropic_fraction: float = 0.125
    #: Fraction of cases stored in LPS array order (exercises the reorientation).
    lps_fraction: float = 0.25


@dataclass(frozen=True)
class ModelConfig:
    """Reduced FM-HCT backbone. head_dim = embed_dim / num_heads = 64, the ViT convention that
    `export.checkpoint.infer_config` assumes when a checkpoint does not say how many heads it has."""

    embed_dim: int = 192
    depth: int = 2
    num_heads: int = 3
    mlp_dim: int = 768
    patch_size: int = 12
    qkv_bias: bool = False
    #: Sub-block size of the structured patch-filter init (0 = plain Xavier); see `_init_weights`.
    structured_patch_filters: int = 4


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 17
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    #: Left-right flip probability (anatomically symmetric findings; the reference uses flips too).
    flip_prob: float = 0.5
    torch_threads: int = 2
    #: Loss weight per task (TASKS order), normalised to sum 1.
    task_loss_weights: tuple[float, ...] = (1.0, 1.0)
    #: Weight of the auxiliary per-patch lesion loss (0 disables it); see `train_model`.
    aux_patch_weight: float = 2.0
    #: Patch target = clip(gain x covered fraction, 0, 1): a patch 1/gain full counts as positive.
    aux_target_gain: float = 4.0
    #: Weight of the CLS-attention guidance loss (0 disables it); see `_cls_attention_guidance`.
    attention_guidance_weight: float = 2.0


@dataclass(frozen=True)
class DemoConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- case planning & generation (no torch) -----------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """One synthetic case: its own seed and what to put in it."""

    split: str
    index: int
    seed_entropy: int
    spawn_key: tuple[int, ...]
    hemorrhage: bool
    edema: bool
    spacing_mm: tuple[float, float, float]
    lps: bool

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed_entropy, spawn_key=self.spawn_key))


_SPLIT_IDS: Final = {"train": 0, "test": 1, "smoke": 2, "val": 3}


def plan_cases(cfg: DataConfig, split: str, n: int) -> list[CaseSpec]:
    """Seeded, class-balanced case list. Train and test use disjoint seed streams (spawn keys)."""
    split_id = _SPLIT_IDS[split]
    n = 4 * math.ceil(n / 4)
    plan_rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(split_id, 1_000_000)))
    combos = [(h, e) for h in (False, True) for e in (False, True)] * (n // 4)
    order = plan_rng.permutation(n)
    n_aniso = round(cfg.anisotropic_fraction * n)
    aniso = set(plan_rng.permutation(n)[:n_aniso].tolist())
    specs = []
    for i in range(n):
        h, e = combos[order[i]]
        if i in aniso:
            inplane = float(plan_rng.uniform(0.6, 1.0))
            spacing = (inplane, inplane, float(plan_rng.choice([2.0, 2.5, 3.0, 5.0])))
        else:
            spacing = (1.0, 1.0, 1.0)
        lps = bool(plan_rng.random() < cfg.lps_fraction)
        specs.append(
            CaseSpec(split, i, cfg.seed, (split_id, i), hemorrhage=h, edema=e, spacing_mm=spacing, lps=lps)
        )
    return specs


def patch_targets(
    masks: dict[str, np.ndarray], volume: Volume, crop_start: Sequence[int], crop_end: Sequence[int]
) -> np.ndarray:
    """Fraction of each model patch (8^3 grid of 12^3-voxel patches) covered by each finding.

    The lesion masks go through the same geometry as the image (RAS, 1 mm resample, the image's crop
    box) and are then area-averaged to the patch grid. float16 ``(len(TASKS), 8, 8, 8)``.
    """
    from headct.preprocess import area_resize, reorient_to_ras, resample_to_spacing

    out = np.zeros((len(TASKS), *PATCH_GRID), np.float16)
    box = tuple(slice(int(a), int(b)) for a, b in zip(crop_start, crop_end, strict=True))
    for k, task in enumerate(TASKS):
        mask = masks.get(task)
        if mask is None or not mask.any():
            continue
        iso = resample_to_spacing(reorient_to_ras(Volume(hu=mask, affine=volume.affine)))
        out[k] = np.clip(area_resize(iso.hu[box], PATCH_GRID), 0.0, 1.0)
    return out


def generate_case(spec: CaseSpec) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Generate + preprocess one case (worker function; numpy/scipy only).

    Returns ``(float16 model input (3, 96, 96, 96), float16 patch targets (len(TASKS), 8, 8, 8), meta)``.
    """
    from demo.synthetic_head import make_head_with_info
    from headct.preprocess import preprocess_with_info

    t0 = time.perf_counter()
    volume, info = make_head_with_info(
        spec.rng(),
        hemorrhage=spec.hemorrhage,
        edema=spec.edema,
        spacing_mm=spec.spacing_mm,
        lps=spec.lps,
        lesion_masks=True,
    )
    t1 = time.perf_counter()
    x, pinfo = preprocess_with_info(volume)
    t2 = time.perf_counter()
    targets = patch_targets(info.lesion_masks, volume, pinfo.crop_start, pinfo.crop_end)
    meta = {
        "index": spec.index,
        "hemorrhage": spec.hemorrhage,
        "edema": spec.edema,
        "spacing_mm": [round(s, 3) for s in spec.spacing_mm],
        "lps": spec.lps,
        "shape": list(volume.shape),
        "resampled": pinfo.resampled,
        "cropped_shape": list(pinfo.cropped_shape),
        "hemorrhage_ml": round(info.hemorrhage_ml, 2),
        "hemorrhage_kinds": info.hemorrhage_kinds,
        "edema_ml": round(info.edema_ml, 2),
        "generate_s": round(t1 - t0, 3),
        "preprocess_s": round(t2 - t1, 3),
    }
    return x, targets, meta


def _data_digest(cfg: DataConfig, split: str, n: int) -> str:
    payload = {
        "data": asdict(cfg),
        "split": split,
        "n": n,
        "generator": GENERATOR_VERSION,
        "preprocessing": contract.PREPROCESSING_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_THREAD_ENV: Final = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _passive_omp() -> None:
    """Make OpenMP threads sleep instead of spin while waiting (unless the user chose otherwise).

    Only effective before torch is first imported. On a shared 2-core machine another process's
    threads made spinning torch threads ~3x slower per step (measured: 3.2 s vs 1.1 s); on an idle
    machine the difference is negligible for these large kernels.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _worker_init() -> None:
    from demo.synthetic_head import canonical_head

    canonical_head()  # build the atlas-derived arrays once per worker, before the first case


def make_pool(workers: int) -> mp.pool.Pool:
    """Generation workers: spawned (never forked: torch may already own thread pools here) with
    single-threaded BLAS, so ``workers`` processes use ``workers`` cores instead of oversubscribing."""
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in _THREAD_ENV}
    os.environ.update(dict.fromkeys(_THREAD_ENV, "1"))  # read by numpy's BLAS when a worker imports it
    try:
        pool = ctx.Pool(workers, initializer=_worker_init)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return pool


def _cache_paths(cache_dir: Path, split: str, digest: str) -> tuple[Path, Path, Path]:
    base = Path(cache_dir) / f"{split}_{digest}"
    return base.with_suffix(".npy"), Path(f"{base}_patch.npy"), base.with_suffix(".json")


def load_cached(cache_dir: Path | None, split: str, digest: str, n: int) -> Dataset | None:
    """The cached split if all its files exist and hold `n` cases (inputs memory-mapped), else None."""
    if cache_dir is None:
        return None
    x_path, p_path, meta_path = _cache_paths(cache_dir, split, digest)
    if not (x_path.is_file() and p_path.is_file() and meta_path.is_file()):
        return None
    saved = json.loads(meta_path.read_text())
    meta = saved["cases"]
    x = np.load(x_path, mmap_mode="r")
    patch = np.load(p_path)
    if not x.shape[0] == n == len(meta) == patch.shape[0]:
        return None
    y = np.array([[c[t] for t in TASKS] for c in meta], dtype=np.int64)
    return Dataset(x, y, patch, meta, float(saved["seconds"]), True)


@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray
    patch: np.ndarray
    meta: list[dict[str, Any]]
    seconds: float
    cached: bool


def build_dataset(
    specs: Sequence[CaseSpec],
    *,
    cache_dir: Path | None,
    digest: str,
    pool: mp.pool.Pool | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Generate (or load from cache) the preprocessed inputs of `specs`.

    Returns ``Dataset``; ``x`` float16 (N, 3, 96, 96, 96), ``y`` int64 (N, len(TASKS)), ``patch``
    float16 (N, len(TASKS), 8, 8, 8) lesion fractions per model patch.
    """
    split = specs[0].split if specs else "empty"
    cached = load_cached(cache_dir, split, digest, len(specs))
    if cached is not None:
        log(f"[{split}] loaded {len(specs)} cached cases from {cache_dir}")
        return cached
    x_path, p_path, meta_path = _cache_paths(cache_dir, split, digest) if cache_dir else (None, None, None)

    t0 = time.perf_counter()
    x = np.empty((len(specs), contract.INPUT_CHANNELS, *contract.INPUT_SPATIAL), dtype=np.float16)
    patch = np.zeros((len(specs), len(TASKS), *PATCH_GRID), dtype=np.float16)
    metas: list[dict[str, Any]] = []
    step = max(1, len(specs) // 10)

    def consume(results: Any) -> None:
        for i, (xi, pi, meta) in enumerate(results):
            x[i] = xi
            patch[i] = pi
            metas.append(meta)
            if (i + 1) % step == 0 or i + 1 == len(specs):
                el = time.perf_counter() - t0
                log(f"[{split}] generated {i + 1}/{len(specs)} synthetic heads ({el:.0f} s)")

    if pool is not None and len(specs) > 1:
        consume(pool.imap(generate_case, specs, chunksize=1))
    else:
        consume(map(generate_case, specs))
    seconds = time.perf_counter() - t0
    y = np.array([[m[t] for t in TASKS] for m in metas], dtype=np.int64)
    if x_path is not None and p_path is not None and meta_path is not None:
        x_path.parent.mkdir(parents=True, exist_ok=True)
        for arr, path in ((x, x_path), (patch, p_path)):
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, arr)
            tmp.replace(path)
        meta_path.write_text(
            json.dumps({"notice": SYNTHETIC_DEMO_NOTICE, "seconds": seconds, "cases": metas}, indent=1)
        )
    return Dataset(x, y, patch, metas, seconds, False)


# ---- metrics (no sklearn) ----------------------------------------------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney rank formula (ties get average ranks).

    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos = sum of the positives' ranks.
    NaN when only one class is present.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over tied groups
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of 1-based ranks s+1..e
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | int]:
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp = int((pred & labels).sum())
    tn = int((~pred & ~labels).sum())
    return {
        "auc": roc_auc(scores, labels),
        "n": int(labels.size),
        "n_positive": int(labels.sum()),
        "threshold": float(threshold),
        "sensitivity": tp / max(1, int(labels.sum())),
        "specificity": tn / max(1, int((~labels).sum())),
        "accuracy": (tp + tn) / max(1, labels.size),
    }


# ---- model & training (torch) ------------------------------------------------------------------


def build_model(cfg: ModelConfig) -> tuple[FMHCTViT, dict[str, nn.Module]]:
    from export.heads import LinearHead
    from export.model import FMHCTViT, ViTConfig

    vit_cfg = ViTConfig(
        img_size=contract.INPUT_SPATIAL[0],
        patch_size=cfg.patch_size,
        in_chans=contract.INPUT_CHANNELS,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        qkv_bias=cfg.qkv_bias,
    )
    backbone = FMHCTViT(vit_cfg)
    _init_weights(backbone, cfg.structured_patch_filters)
    heads: dict[str, nn.Module] = {task: LinearHead(cfg.embed_dim) for task in TASKS}
    return backbone, heads


def _init_weights(model: FMHCTViT, structured_sub_block: int = 0) -> None:
    """ViT-style init (truncated-normal Linear, Xavier patch projection, small CLS).

    With ``structured_sub_block = s > 0`` the first ``3 * (patch/s)^3`` patch filters start as the
    per-channel mean over each ``s^3`` sub-block of the patch (all weights stay trainable). This is
    only an inductive bias for the tiny from-scratch demo: each token then starts out carrying every
    window's local averages at ~s voxels resolution, which the first MLP can threshold ("bright in
    the brain window but not bone"), instead of having to discover such filters from ~200 volumes.
    """
    import torch
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv3d):
            # like a Linear over the flattened 12^3 x 3 patch
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(model.cls_token, std=0.02)
    if structured_sub_block > 0:
        conv = model.patch_embedding.patch_embeddings
        out_ch, in_ch, p = conv.weight.shape[0], conv.weight.shape[1], conv.weight.shape[2]
        s = structured_sub_block
        if p % s:
            raise ValueError(f"structured sub-block {s} does not divide the patch size {p}")
        g = p // s
        n_struct = in_ch * g**3
        if n_struct > out_ch:
            raise ValueError(f"{n_struct} structured filters do not fit in embed_dim {out_ch}")
        with torch.no_grad():
            k = 0
            for c in range(in_ch):
                for a in range(g):
                    for b in range(g):
                        for d in range(g):
                            conv.weight[k].zero_()
                            conv.weight[
                                k, c, a * s : (a + 1) * s, b * s : (b + 1) * s, d * s : (d + 1) * s
                            ] = 1.0 / s**3
                            k += 1


def predict(
    backbone: FMHCTViT, heads: dict[str, nn.Module], x: np.ndarray, batch_size: int = 16
) -> np.ndarray:
    """Positive-class probabilities (N, len(TASKS)) in eval mode; `x` is the float16 model input."""
    import torch

    backbone.eval()
    for h in heads.values():
        h.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.array(x[i : i + batch_size], dtype=np.float32))  # fp16 -> fp32 copy
            tokens = backbone.forward_features(xb)
            out.append(torch.stack([torch.softmax(heads[t](tokens), -1)[:, 1] for t in TASKS], 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(TASKS)), np.float32)


def _cls_attention_guidance(backbone: FMHCTViT, tokens_in: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy pulling the last block's CLS attention of head k onto task k's lesion patches.

    `tokens_in` are the tokens entering the last block (B, T, D); `targets` the per-patch lesion
    weights (B, P, len(TASKS)). Only volumes with at least half a patch of the finding contribute;
    head k is steered for task k (k < num_heads), other heads are free. This teaches the CLS query to
    look where a focal finding is, instead of averaging it away over 512 patches; the saved model is
    the plain architecture, the guidance only shapes its weights during training.
    """
    import torch

    block = cast("Block", backbone.blocks[-1])  # a ModuleList's items type as plain nn.Module
    attn = block.attn
    batch, n_tok, _ = tokens_in.shape
    qkv = attn.qkv(block.att_norm(tokens_in)).reshape(batch, n_tok, 3, attn.num_heads, attn.head_dim)
    q = qkv[:, :1, 0].transpose(1, 2)  # (B, H, 1, hd): the CLS query
    k = qkv[:, :, 1].transpose(1, 2)  # (B, H, T, hd)
    logp = torch.log_softmax((q @ k.transpose(-1, -2)).squeeze(2) * attn.head_dim**-0.5, dim=-1)
    first = 1 + backbone.config.num_register_tokens
    terms = []
    for t in range(min(targets.shape[-1], attn.num_heads)):
        w = targets[:, :, t]
        mass = w.sum(1)
        pos = mass > 0.5
        if bool(pos.any()):
            dist = w[pos] / mass[pos, None]
            terms.append(-(dist * logp[pos, t, first:]).sum(1).mean())
    return torch.stack(terms).mean() if terms else tokens_in.new_zeros(())


def _aux_readout(cfg: ModelConfig) -> nn.Sequential:
    """The throw-away per-patch lesion read-out (LayerNorm + Linear), starting at "no lesion here"."""
    import torch

    norm, readout = torch.nn.LayerNorm(cfg.embed_dim), torch.nn.Linear(cfg.embed_dim, len(TASKS))
    torch.nn.init.zeros_(readout.weight)
    torch.nn.init.constant_(readout.bias, -3.0)  # most patches hold no lesion
    return torch.nn.Sequential(norm, readout)


def _optimizer(params: list[nn.Parameter], oc: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases, tokens and position table (standard ViT practice)."""
    import torch

    decay = [p for p in params if p.ndim >= 2 and p.shape[0] != 1]
    no_decay = [p for p in params if not (p.ndim >= 2 and p.shape[0] != 1)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=oc.lr,
        betas=(0.9, 0.999),
    )


@dataclass(frozen=True)
class _Schedule:
    """How many steps, and the learning rate of each: linear warm-up, then cosine decay to 0."""

    lr: float
    steps_per_epoch: int
    total: int
    warmup: int

    @classmethod
    def for_run(cls, oc: OptimConfig, n: int, max_steps: int | None) -> _Schedule:
        steps_per_epoch = max(1, n // oc.batch_size)  # drop the ragged last batch (BatchNorm heads)
        full = steps_per_epoch * oc.epochs
        total = full if max_steps is None else min(max_steps, full)
        return cls(oc.lr, steps_per_epoch, total, max(1, int(oc.warmup_epochs * steps_per_epoch)))

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _patch_target_tensor(patch: np.ndarray, grid: int, gain: float) -> Tensor:
    """Per-patch lesion fractions (N, T, g, g, g) -> soft targets (N, g^3, T) in the Conv3d token order
    (axis 0 slowest, axis 2 fastest), scaled by `gain` and clipped to [0, 1]."""
    import torch

    if tuple(patch.shape[2:]) != (grid, grid, grid):
        raise ValueError(f"patch targets {patch.shape[2:]} do not match the {grid}^3 patch grid")
    patch_t = torch.from_numpy(np.asarray(patch, dtype=np.float32)).flatten(2).transpose(1, 2)
    return (patch_t * gain).clamp_(0.0, 1.0)


def _flip_patch_targets(pt: Tensor, flipped: Tensor, grid: int) -> Tensor:
    """Flip the patch grid of the `flipped` volumes like their images: token = (a0 * g + a1) * g + a2."""
    g3 = pt[flipped].reshape(-1, grid, grid, grid, len(TASKS)).flip(1)
    pt = pt.clone()
    pt[flipped] = g3.reshape(-1, grid**3, len(TASKS))
    return pt


@dataclass
class _EpochStats:
    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    correct: np.ndarray = field(default_factory=lambda: np.zeros(len(TASKS)))
    seen: int = 0

    def record(self, epoch: int) -> dict[str, float]:
        """The epoch's `history` entry: mean loss(es) and training accuracy per task."""
        acc = self.correct / max(1, self.seen)
        rec = {"epoch": epoch + 1, "loss": float(np.mean(self.losses)) if self.losses else float("nan")}
        if self.aux_losses:
            rec["aux_patch_loss"] = float(np.mean(self.aux_losses))
        rec.update({f"train_acc_{t}": float(a) for t, a in zip(TASKS, acc, strict=True)})
        return rec


@dataclass
class _Trainer:
    """What one optimisation step touches; `step` runs one batch (see `train_model` for the loss)."""

    cfg: DemoConfig
    backbone: FMHCTViT
    heads: dict[str, nn.Module]
    aux: nn.Module | None  # the per-patch read-out; None when training without it
    patch_t: Tensor | None  # its targets (N, g^3, T)
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer

    def step(self, x: np.ndarray, y_t: Tensor, idx: np.ndarray, flips: np.ndarray, lr: float) -> _StepResult:
        import torch

        xb = torch.from_numpy(np.array(x[idx], dtype=np.float32))  # fp16 cache -> fp32, as in training
        fb = torch.from_numpy(flips[idx])
        if fb.any():
            xb[fb] = xb[fb].flip(2)  # axis 0 of the volume = Right-Left
        yb = y_t[idx]
        for g in self.opt.param_groups:
            g["lr"] = lr
        tokens, hidden = self.backbone(xb)
        logits = [self.heads[t](tokens) for t in TASKS]
        loss = self._task_loss(logits, yb)
        aux_loss = None
        if self.aux is not None:
            loss, aux_loss = self._add_aux_losses(loss, hidden, idx, fb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.opt.step()
        correct = np.array([(lg.argmax(1) == yb[:, k]).sum().item() for k, lg in enumerate(logits)])
        return _StepResult(float(loss.detach()), aux_loss, correct)

    def _task_loss(self, logits: list[Tensor], yb: Tensor) -> Tensor:
        """Weighted 2-class cross-entropy of each task's head (weights normalised to sum 1)."""
        import torch.nn.functional as F

        task_weights = self.cfg.optim.task_loss_weights
        weights = [w / sum(task_weights) for w in task_weights]
        losses = [
            w * F.cross_entropy(lg, yb[:, k]) for k, (w, lg) in enumerate(zip(weights, logits, strict=True))
        ]
        return sum(losses[1:], start=losses[0])

    def _add_aux_losses(
        self, loss: Tensor, hidden: list[Tensor], idx: np.ndarray, fb: Tensor
    ) -> tuple[Tensor, float]:
        """`loss` + the weighted per-patch read-out loss (+ the CLS-attention guidance); the read-out loss."""
        import torch
        import torch.nn.functional as F

        assert self.aux is not None and self.patch_t is not None
        oc, config = self.cfg.optim, self.backbone.config
        pt = self.patch_t[torch.from_numpy(idx)]
        if fb.any():
            pt = _flip_patch_targets(pt, fb, config.grid_size)
        # The read-out sits on the tokens *entering* the last block, so the CLS token's last attention
        # can find lesion patches by their keys (a read-out after the last block could be served by its
        # MLP alone, leaving the CLS query nothing to match).
        aux_layer = max(0, self.cfg.model.depth - 2)
        aux_logits = self.aux(hidden[aux_layer][:, 1 + config.num_register_tokens :, :])
        aux_loss = F.binary_cross_entropy_with_logits(aux_logits, pt)
        loss = loss + oc.aux_patch_weight * aux_loss
        if oc.attention_guidance_weight > 0 and self.cfg.model.depth >= 2:
            guide = _cls_attention_guidance(self.backbone, hidden[-2], pt)
            loss = loss + oc.attention_guidance_weight * guide
        return loss, float(aux_loss.detach())


@dataclass(frozen=True)
class _StepResult:
    loss: float
    aux_loss: float | None
    correct: np.ndarray  # correct predictions per task in the batch


def train_model(
    cfg: DemoConfig,
    x: np.ndarray,
    y: np.ndarray,
    patch: np.ndarray | None = None,
    *,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[FMHCTViT, dict[str, nn.Module], dict[str, Any]]:
    """Multi-task training from scratch; returns (backbone, heads, training summary).

    Loss = weighted 2-class cross-entropy of each task's `LinearHead` on the CLS token (the official
    downstream objective)
    + ``aux_patch_weight`` x a per-patch auxiliary loss: a throw-away LayerNorm + Linear on the
      tokens entering the last block predicts, per patch, the covered fraction of each finding (soft
      binary cross-entropy against `patch`; ~512 supervised locations per volume instead of one label);
    + ``attention_guidance_weight`` x `_cls_attention_guidance` (last block, head k -> finding k).

    Without the two aids a from-scratch ViT of this size learns the large edema quickly but the
    focal hemorrhage only erratically (held-out AUC 0.5-0.98 across otherwise equal runs): its few
    lesion patches are averaged away among 512 tokens. Neither aid is saved; the checkpoint is the
    plain FM-HCT backbone + linear heads.
    """
    _passive_omp()
    import torch

    oc = cfg.optim
    torch.manual_seed(cfg.data.seed)
    torch.set_num_threads(oc.torch_threads)
    order_rng = np.random.default_rng(np.random.SeedSequence(cfg.data.seed, spawn_key=(9, 0)))
    backbone, heads = build_model(cfg.model)
    use_aux = patch is not None and oc.aux_patch_weight > 0
    aux = _aux_readout(cfg.model)  # built even when unused: the torch random stream stays the same
    params = list(backbone.parameters()) + [p for h in heads.values() for p in h.parameters()]
    if use_aux:
        params += list(aux.parameters())
    opt = _optimizer(params, oc)
    n = len(x)
    schedule = _Schedule.for_run(oc, n, max_steps)
    y_t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    patch_t = None
    if use_aux:
        assert patch is not None
        patch_t = _patch_target_tensor(patch, backbone.config.grid_size, oc.aux_target_gain)
    trainer = _Trainer(cfg, backbone, heads, aux if use_aux else None, patch_t, params, opt)
    step = 0
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    backbone.train()
    for h in heads.values():
        h.train()
    for epoch in range(oc.epochs):
        if step >= schedule.total:
            break
        perm = order_rng.permutation(n)
        flips = order_rng.random(n) < oc.flip_prob
        stats = _EpochStats()
        for b in range(schedule.steps_per_epoch):
            if step >= schedule.total:
                break
            idx = np.sort(perm[b * oc.batch_size : (b + 1) * oc.batch_size])
            result = trainer.step(x, y_t, idx, flips, schedule.lr_at(step))
            step += 1
            stats.losses.append(result.loss)
            if result.aux_loss is not None:
                stats.aux_losses.append(result.aux_loss)
            stats.correct += result.correct
            stats.seen += len(idx)
        history.append(stats.record(epoch))
        log(_epoch_line(history[-1], oc.epochs, schedule.lr_at(max(0, step - 1)), time.perf_counter() - t0))
    summary = {"steps": step, "seconds": time.perf_counter() - t0, "history": history}
    return backbone, heads, summary


def _epoch_line(rec: dict[str, float], epochs: int, lr: float, elapsed_s: float) -> str:
    accs = " ".join(f"{t}={rec[f'train_acc_{t}']:.2f}" for t in TASKS)
    return (
        f"epoch {rec['epoch']:2d}/{epochs} loss {rec['loss']:.4f} "
        f"(aux {rec.get('aux_patch_loss', float('nan')):.4f}) train-acc {accs} "
        f"lr {lr:.2e} ({elapsed_s:.0f} s)"
    )


# ---- the whole run -----------------------------------------------------------------------------


def save_outputs(
    out_dir: Path, backbone: FMHCTViT, heads: dict[str, nn.Module], metrics: dict[str, Any], epoch: int
) -> dict[str, str]:
    """Write the official fine-tuned layout + metrics.json; returns {filename: sha256}."""
    from export.checkpoint import save_finetuned, sha256_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean_auc = float(np.nanmean([metrics["tasks"][t]["auc"] for t in TASKS]))
    for task in TASKS:
        # One backbone file shared by all heads: written with the first head, rewritten identically.
        save_finetuned(
            backbone,
            heads[task],
            backbone_path(out_dir),
            head_path(out_dir, task),
            epoch=epoch,
            best_metric=mean_auc,
        )
    hashes = {
        p.name: sha256_file(p) for p in [backbone_path(out_dir), *(head_path(out_dir, t) for t in TASKS)]
    }
    metrics["files"] = hashes
    tmp = out_dir / (METRICS_FILENAME + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    tmp.replace(out_dir / METRICS_FILENAME)
    return hashes


def _build_datasets(
    data: DataConfig, *, workers: int, cache_dir: Path | None, log: Callable[[str], None]
) -> tuple[Dataset, Dataset]:
    """The training and held-out datasets, from the cache or generated (one worker pool for both)."""
    datasets: dict[str, Dataset] = {}
    pool: mp.pool.Pool | None = None
    try:
        for split, n in (("train", data.n_train), ("test", data.n_test)):
            specs = plan_cases(data, split, n)
            digest = _data_digest(data, split, len(specs))
            if pool is None and workers > 0 and load_cached(cache_dir, split, digest, len(specs)) is None:
                pool = make_pool(workers)  # one pool (and one atlas build per worker) for both splits
            datasets[split] = build_dataset(specs, cache_dir=cache_dir, digest=digest, pool=pool, log=log)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return datasets["train"], datasets["test"]


def _evaluate(
    backbone: FMHCTViT, heads: dict[str, nn.Module], test_ds: Dataset, log: Callable[[str], None]
) -> tuple[np.ndarray, dict[str, dict[str, float | int]]]:
    """Held-out probabilities (N, len(TASKS)) and the metrics of each task at the decision threshold."""
    probs = predict(backbone, heads, test_ds.x)
    tasks = {t: binary_metrics(probs[:, k], test_ds.y[:, k], DECISION_THRESHOLD) for k, t in enumerate(TASKS)}
    for t in TASKS:
        m = tasks[t]
        log(
            f"held-out {t}: AUC {m['auc']:.4f} (n={m['n']}, {m['n_positive']} positive) "
            f"sens {m['sensitivity']:.2f} spec {m['specificity']:.2f} @ {DECISION_THRESHOLD}"
        )
    return probs, tasks


def _composition(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """What a split holds: findings, resampled / LPS cases and mean generation times."""
    return {
        "n": len(metas),
        "hemorrhage_positive": sum(bool(m["hemorrhage"]) for m in metas),
        "edema_positive": sum(bool(m["edema"]) for m in metas),
        "anisotropic_resampled": sum(bool(m["resampled"]) for m in metas),
        "lps": sum(bool(m["lps"]) for m in metas),
        "mean_generate_s": round(float(np.mean([m["generate_s"] for m in metas])), 3),
        "mean_preprocess_s": round(float(np.mean([m["preprocess_s"] for m in metas])), 3),
    }


@dataclass(frozen=True)
class _RunTimes:
    """Wall-clock seconds of a run's phases."""

    data: float  # generation + preprocessing, or loading the cache
    training: float
    evaluation: float
    total: float

    def to_dict(self, train_ds: Dataset, test_ds: Dataset) -> dict[str, float]:
        return {
            "data_generation_and_preprocessing": round(self.data, 1),
            "generation_train_uncached": round(train_ds.seconds, 1),
            "generation_test_uncached": round(test_ds.seconds, 1),
            "training": round(self.training, 1),
            "evaluation": round(self.evaluation, 1),
            "total": round(self.total, 1),
            # what this run would have taken without the tensor cache
            "total_uncached_estimate": round(
                train_ds.seconds + test_ds.seconds + self.training + self.evaluation, 1
            ),
        }


def _metrics(
    cfg: DemoConfig,
    *,
    train_ds: Dataset,
    test_ds: Dataset,
    tasks: dict[str, dict[str, float | int]],
    probs: np.ndarray,
    training: dict[str, Any],
    times: _RunTimes,
    workers: int,
) -> dict[str, Any]:
    """The content of metrics.json (`save_outputs` adds the file hashes)."""
    import torch

    return {
        "notice": SYNTHETIC_DEMO_NOTICE,
        "synthetic_demo": True,
        "tasks": tasks,
        "task_order": list(TASKS),
        "decision_threshold_rule": "fixed 0.5 on softmax[:, 1] (balanced classes; not fitted on test data)",
        "auc_method": "Mann-Whitney rank formula, average ranks for ties",
        "seed": cfg.data.seed,
        "config": cfg.to_dict(),
        "architecture": {
            "img_size": contract.INPUT_SPATIAL[0],
            "in_chans": contract.INPUT_CHANNELS,
            **asdict(cfg.model),
            "head": "linear",
            "num_register_tokens": 0,
        },
        "data": {
            "train": _composition(train_ds.meta),
            "test": _composition(test_ds.meta),
            "train_cached": train_ds.cached,
            "test_cached": test_ds.cached,
            "generator_version": GENERATOR_VERSION,
            "preprocessing_version": contract.PREPROCESSING_VERSION,
            "test_seeds": "SeedSequence(seed, spawn_key=(1, i)); train uses spawn_key=(0, i)",
        },
        "training": {"steps": training["steps"], "history": training["history"]},
        "heldout_predictions": [
            {
                "index": m["index"],
                **{t: bool(m[t]) for t in TASKS},
                **{f"p_{t}": float(probs[i, k]) for k, t in enumerate(TASKS)},
            }
            for i, m in enumerate(test_ds.meta)
        ],
        "wall_time_s": times.to_dict(train_ds, test_ds),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "torch_threads": cfg.optim.torch_threads,
            "generation_workers": workers,
            "cpu_count": os.cpu_count(),
        },
    }


def run(
    out_dir: Path = DEFAULT_OUT,
    cfg: DemoConfig | None = None,
    *,
    force: bool = False,
    workers: int = 2,
    cache_dir: Path | None = DEFAULT_CACHE,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Generate data, train, evaluate and save. Skips (returns the saved metrics) when outputs exist."""
    cfg = cfg if cfg is not None else DemoConfig()
    out_dir = Path(out_dir)
    if not force and all(p.is_file() for p in output_paths(out_dir)):
        log(f"{SYNTHETIC_DEMO_NOTICE}\noutputs exist in {out_dir}; skipping (use --force to retrain)")
        return json.loads((out_dir / METRICS_FILENAME).read_text())

    log(SYNTHETIC_DEMO_NOTICE)
    t_start = time.perf_counter()
    train_ds, test_ds = _build_datasets(cfg.data, workers=workers, cache_dir=cache_dir, log=log)
    t_data = time.perf_counter() - t_start

    backbone, heads, summary = train_model(
        cfg, train_ds.x, train_ds.y, train_ds.patch, max_steps=max_steps, log=log
    )
    t_eval = time.perf_counter()
    probs, tasks = _evaluate(backbone, heads, test_ds, log)
    eval_s = time.perf_counter() - t_eval
    total_s = time.perf_counter() - t_start
    metrics = _metrics(
        cfg,
        train_ds=train_ds,
        test_ds=test_ds,
        tasks=tasks,
        probs=probs,
        training=summary,
        times=_RunTimes(data=t_data, training=summary["seconds"], evaluation=eval_s, total=total_s),
        workers=workers,
    )
    hashes = save_outputs(out_dir, backbone, heads, metrics, epoch=cfg.optim.epochs)
    log(f"saved {', '.join(hashes)} and {METRICS_FILENAME} to {out_dir} ({total_s:.0f} s total)")
    log(SYNTHETIC_DEMO_NOTICE)
    return metrics


def main(argv: list[str] | None = None) -> int:
    _passive_omp()
    parser = argparse.ArgumentParser(
        description="Train the synthetic demo FM-HCT model. " + SYNTHETIC_DEMO_NOTICE,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory")
    parser.add_argument("--force", action="store_true", help="retrain even if the outputs exist")
    parser.add_argument("--workers", type=int, default=2, help="data generation processes (0 = in-process)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="preprocessed-tensor cache")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the tensor cache")
    parser.add_argument("--seed", type=int, default=DataConfig.seed)
    parser.add_argument("--n-train", type=int, default=DataConfig.n_train)
    parser.add_argument("--n-test", type=int, default=DataConfig.n_test)
    parser.add_argument("--epochs", type=int, default=OptimConfig.epochs)
    args = parser.parse_args(argv)
    cfg = DemoConfig(
        data=DataConfig(seed=args.seed, n_train=args.n_train, n_test=args.n_test),
        optim=OptimConfig(epochs=args.epochs),
    )
    run(
        args.out,
        cfg,
        force=args.force,
        workers=args.workers,
        cache_dir=None if args.no_cache else args.cache_dir,
        log=lambda s: print(s, flush=True),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
