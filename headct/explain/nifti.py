"""Attention maps as one gzip NIfTI-1 file: `attention_nifti`, read back by `read_attention_nifti`.

Layout: a 4-D float32 image ``(X, Y, Z, T)``, volume ``t`` = the map of task ``t``, on the source's
voxel grid with the source's affine (sform and qform, code 1 "scanner"; NIfTI-1 stores it in float32,
as it does the source's own affine), so it overlays the CT in any NIfTI viewer. Which volume is
which task is recorded in three places, from most to least machine-readable:

* a NIfTI header extension, code 6 ("comment"), holding JSON ``{"format": "headct-attention/1",
  "tasks": [...], "description": ...}`` -- the authoritative list, any length;
* ``intent_code`` 1001 (NIFTI_INTENT_ESTIMATE) with ``intent_name`` "attention";
* ``descrip`` (80 characters): "attention: " and the task names, comma-separated, cut at 80.

Compressed with ISA-L's gzip (`isal.igzip`, level 1; the maps are smooth and mostly zero, so level 1
already gets most of the ratio, at several times zlib's speed).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Mapping
from typing import Final

import nibabel as nib
import numpy as np
from isal import igzip

#: The JSON extension's ``format`` value; bump if its keys change.
FORMAT: Final = "headct-attention/1"
#: NIfTI header extension code 6: "comment" (free text; ours is JSON).
COMMENT_EXTENSION: Final = 6
INTENT_NAME: Final = "attention"
GZIP_LEVEL: Final = 1
_DESCRIP_MAX: Final = 80


def attention_nifti(
    maps: Mapping[str, np.ndarray], affine: np.ndarray, *, description: str = "FM-HCT attention"
) -> bytes:
    """The maps (task name -> array in the source grid, all the same 3-D shape) as .nii.gz bytes.

    `affine`: the source Volume's affine (voxel index -> RAS mm). Values are written as float32.

    Raises:
        ValueError: no maps, shapes differ or are not 3-D, a task name is empty, or a value is not finite.
    """
    if not maps:
        raise ValueError("no maps to write")
    names = list(maps)
    shapes = {np.shape(m) for m in maps.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"maps must all have the same 3-D shape, got {sorted(shapes)}")
    if any(not name for name in names):
        raise ValueError("task names must not be empty")
    shape = next(iter(shapes))
    # Fortran-ordered, as NIfTI stores it (x fastest) and as `map_to_source` returns maps: each task
    # is one contiguous copy, and nibabel writes the array without reordering it
    data = np.empty((*shape, len(names)), dtype=np.float32, order="F")
    for t, name in enumerate(names):
        data[..., t] = maps[name]
    if not np.all(np.isfinite(data)):
        raise ValueError("maps contain NaN or infinite values")
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(data, affine)
    header = img.header
    header.set_xyzt_units("mm", "unknown")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    header.set_intent("estimate", name=INTENT_NAME)
    header["descrip"] = _descrip(names)
    sidecar = {"format": FORMAT, "tasks": names, "description": description, "units": "attention weight"}
    header.extensions.append(
        nib.nifti1.Nifti1Extension(COMMENT_EXTENSION, json.dumps(sidecar, separators=(",", ":")).encode())
    )
    buffer = io.BytesIO()
    # streamed into the compressor: no uncompressed copy of the whole file
    with igzip.IGzipFile(fileobj=buffer, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
        img.to_file_map({"image": nib.FileHolder(fileobj=gz), "header": nib.FileHolder(fileobj=gz)})
    return buffer.getvalue()


def read_attention_nifti(payload: bytes) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(task name -> 3-D float32 map, affine)`` from `attention_nifti`'s bytes (gzip or plain)."""
    raw = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
    img = nib.Nifti1Image.from_bytes(raw)
    tasks = task_names(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 3:
        data = data[..., None]
    if data.shape[3] != len(tasks):
        raise ValueError(f"{data.shape[3]} volumes but {len(tasks)} task names")
    return {name: data[..., t] for t, name in enumerate(tasks)}, np.asarray(img.affine, dtype=np.float64)


def task_names(img: nib.Nifti1Image) -> list[str]:
    """The task of each volume, from the JSON extension of `attention_nifti`.

    Raises:
        ValueError: the image has no such extension.
    """
    for extension in img.header.extensions:
        if extension.get_code() != COMMENT_EXTENSION:
            continue
        try:
            sidecar = json.loads(extension.get_content())
        except ValueError:
            continue
        if isinstance(sidecar, dict) and sidecar.get("format") == FORMAT:
            return [str(name) for name in sidecar["tasks"]]
    raise ValueError(f"no {FORMAT} extension: not an attention NIfTI")


def _descrip(names: list[str]) -> bytes:
    text = ("attention: " + ",".join(names)).encode("ascii", "replace")
    return text[:_DESCRIP_MAX]
