"""Benchmark inputs: seeded synthetic head CTs written as NIfTI.gz, raw NIfTI and DICOM zips.

SYNTHETIC DATA - NOT FOR CLINICAL USE. Built with `demo.synthetic_head` (atlas-based head, skull,
table) so decode, resample, crop and the model see realistic shapes and HU, and cached under
``build/bench-inputs/`` (generation of a 512×512×200 series takes tens of seconds; the files never change
for the same spec, so a second run starts measuring at once).
"""

from __future__ import annotations

import gzip
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from headct.volume import Volume

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / "build" / "bench-inputs"
#: Bump when the way inputs are generated changes, so stale cached files are not reused.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class ScanSpec:
    """One synthetic scan: exact array shape and voxel size (mm), generated from `seed`."""

    name: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    seed: int = 7

    @property
    def key(self) -> str:
        sx, sy, sz = self.spacing_mm
        nx, ny, nz = self.shape
        return f"{self.name}-{nx}x{ny}x{nz}-{sx:g}x{sy:g}x{sz:g}-s{self.seed}-v{GENERATOR_VERSION}"


@dataclass(frozen=True)
class ScanFiles:
    """The same scan in every upload format the gateway accepts that we benchmark."""

    spec: ScanSpec
    nifti_gz: Path
    nifti_raw: Path
    dicom_zip: Path

    def path(self, fmt: str) -> Path:
        return {"nifti_gz": self.nifti_gz, "nifti_raw": self.nifti_raw, "dicom_zip": self.dicom_zip}[fmt]


#: Content type the benchmark sends per format (NIfTI is sniffed by its magic bytes).
CONTENT_TYPES = {
    "nifti_gz": "application/octet-stream",
    "nifti_raw": "application/octet-stream",
    "dicom_zip": "application/zip",
}


def _fit_shape(hu: np.ndarray, shape: tuple[int, int, int], fill: float) -> np.ndarray:
    """Crop the array's far ends / pad them with `fill` to exactly `shape`.

    Only the *end* of each axis changes, so the affine (index 0 -> world) stays valid.
    """
    out = np.full(shape, fill, dtype=np.float32)
    common = tuple(slice(0, min(a, b)) for a, b in zip(hu.shape, shape, strict=True))
    out[common] = hu[common]
    return out


def synthesize(spec: ScanSpec) -> Volume:
    """The synthetic head of `spec` in LPS array order (as DICOM series are stored), exactly `spec.shape`."""
    from demo.synthetic_head import AIR_HU, make_head_with_info

    rng = np.random.default_rng(spec.seed)
    volume, _ = make_head_with_info(
        rng, hemorrhage=True, edema=False, spacing_mm=spec.spacing_mm, lps=True, circular_fov=True
    )
    return Volume(hu=_fit_shape(volume.hu, spec.shape, AIR_HU), affine=volume.affine)


def _nifti_int16(volume: Volume) -> nib.Nifti1Image:
    """int16 HU NIfTI, as dcm2niix writes CT (half the bytes of float32, the realistic upload)."""
    hu = np.clip(np.round(volume.hu), -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(hu, volume.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    return img


def ensure_scan(spec: ScanSpec, cache_dir: Path = CACHE_DIR) -> ScanFiles:
    """Generate (once) and return the cached files of `spec`."""

    # Appended, not `with_suffix`: the key itself contains dots (spacings).
    def named(suffix: str) -> Path:
        return cache_dir / f"{spec.key}{suffix}"

    files = ScanFiles(spec=spec, nifti_gz=named(".nii.gz"), nifti_raw=named(".nii"), dicom_zip=named(".zip"))
    meta = named(".json")
    if meta.is_file() and all(p.is_file() for p in (files.nifti_gz, files.nifti_raw, files.dicom_zip)):
        return files
    from demo.dicom_writer import ct_series, write_zip

    cache_dir.mkdir(parents=True, exist_ok=True)
    volume = synthesize(spec)
    img = _nifti_int16(volume)
    raw_path = named(".tmp.nii")
    nib.save(img, str(raw_path))
    files.nifti_gz.write_bytes(gzip.compress(raw_path.read_bytes(), compresslevel=6))
    raw_path.replace(files.nifti_raw)
    tmp_zip = named(".zip.tmp")
    write_zip(ct_series(volume, seed=spec.seed), tmp_zip, compression=zipfile.ZIP_DEFLATED)
    tmp_zip.replace(files.dicom_zip)
    meta.write_text(json.dumps({**asdict(spec), "synthetic": True}, indent=1))
    return files
