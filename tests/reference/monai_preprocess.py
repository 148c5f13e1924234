"""The FM-HCT training preprocessing as MONAI transforms: the reference for `headct.preprocess`.

This is the cached loading pipeline of the authors' code (NYUMedML/headCT_foundation
src/data/transforms.py), written with stock MONAI 1.3.2 dictionary transforms::

    [LoadImaged -> EnsureChannelFirstd] -> Orientationd("RAS") -> Spacingd(1 mm, mode=3)
    -> CropForegroundd(value > 0, margin 0) -> 3 x ScaleIntensityRanged(window, clip) -> concat
    -> Resized(96^3, mode="area") -> CastToTyped(float16)

The authors' `MultipleWindowScaleStack` is a custom transform; it is the three clipped linear windows
concatenated in channel order, which is what the `ScaleIntensityRanged` + `ConcatItemsd` steps below
compute. Test / benchmark dependency only: the gateway never imports torch or MONAI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from headct.volume import Volume

#: Windows (level L, width W) in HU, channel order of the training pipeline (§2.1 step 6).
WINDOWS_HU: Final = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
SPATIAL_SIZE: Final = (96, 96, 96)
_WINDOW_KEYS: Final = tuple(f"w{c}" for c in range(len(WINDOWS_HU)))


def training_transforms(*, load: bool) -> mt.Compose:
    """§2.1 as a `Compose` over key ``"image"``; the model input ends up in key ``"x"``.

    Args:
        load: start from a NIfTI path (`LoadImaged` + `EnsureChannelFirstd`, exactly as in training);
            otherwise ``"image"`` must already be a channel-first `MetaTensor` with its affine.
    """
    steps: list[Any] = []
    if load:
        steps += [
            mt.LoadImaged(keys="image", image_only=False),
            mt.EnsureChannelFirstd(keys="image"),
        ]
    steps += [
        mt.Orientationd(keys="image", axcodes="RAS"),
        mt.Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0), mode=3),  # int 3: scipy cubic spline
        mt.CropForegroundd(keys="image", source_key="image", allow_smaller=False),  # > 0 HU, margin 0
        mt.CopyItemsd(keys="image", times=len(WINDOWS_HU), names=list(_WINDOW_KEYS)),
    ]
    for key, (level, width) in zip(_WINDOW_KEYS, WINDOWS_HU, strict=True):
        steps.append(
            mt.ScaleIntensityRanged(
                keys=key, a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True
            )
        )
    steps += [
        mt.ConcatItemsd(keys=list(_WINDOW_KEYS), name="x", dim=0),
        mt.Resized(keys="x", spatial_size=SPATIAL_SIZE, mode="area"),
        mt.CastToTyped(keys="x", dtype=np.float16),
    ]
    return mt.Compose(steps)


def _result(out: dict[str, Any]) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    x = out["x"]
    array = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    start = tuple(int(v) for v in out["foreground_start_coord"])
    end = tuple(int(v) for v in out["foreground_end_coord"])
    return np.ascontiguousarray(array, dtype=np.float16), start, end


def reference_preprocess_with_crop(volume: Volume) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """§2.1 on an in-memory `Volume` -> ``(float16 (3, 96, 96, 96), crop start, crop end)``.

    The volume goes in as a float32 `MetaTensor` carrying its RAS affine, which is what `LoadImaged`
    makes of a float32 NIfTI (nibabel reader, affine = sform/qform), so no file round trip is timed.
    """
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume.hu[None])), affine=torch.from_numpy(volume.affine)
    )
    return _result(training_transforms(load=False)({"image": image}))


def reference_preprocess(volume: Volume) -> np.ndarray:
    """§2.1 on an in-memory `Volume` -> float16 ``(3, 96, 96, 96)`` in [0, 1], RAS array order."""
    return reference_preprocess_with_crop(volume)[0]


def reference_preprocess_file(path: str | Path) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """§2.1 from a NIfTI file, loaded by MONAI itself as in training; same return as the Volume form."""
    return _result(training_transforms(load=True)({"image": str(path)}))
