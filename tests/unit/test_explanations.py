"""`render_explanations`: the model's maps back on the upload's own grid, in each format."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from api.inference.explanations import render_explanations
from api.ingest import IngestLimits, decode_upload
from api.results.dicom_sr import Algorithm
from demo.dicom_writer import ct_series, phantom_head, reorient, zip_bytes
from headct.explain import read_attention_nifti
from headct.preprocess import preprocess_with_info

ALGORITHM = Algorithm(name="FM-HCT demo", version="1", model_sha256="ab" * 32, synthetic_demo=True)


@pytest.fixture
def dicom_upload(tmp_path: Path) -> Path:
    head = phantom_head(shape=(64, 64, 24), spacing_mm=(3.5, 3.5, 5.0), lesion_hu=1800.0)
    volume = reorient(head.with_hu(np.rint(head.hu)), "LPS")
    path = tmp_path / "upload"
    path.write_bytes(zip_bytes(ct_series(volume, seed="explanations")))
    return path


def _hot_cell_maps(upload: Path) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """A map hot at the patch cell where the lesion lands in the model input, one cold map."""
    scan = decode_upload(upload, "application/zip")
    model_input, _ = preprocess_with_info(scan.volume)
    peak = np.unravel_index(int(np.argmax(model_input[2])), model_input.shape[1:])  # bone window: lesion
    hot = np.zeros((8, 8, 8), np.float32)
    hot[tuple(int(p) // 12 for p in peak)] = 1.0
    return {"hemorrhage": hot, "fracture": np.full((8, 8, 8), 1 / 512, np.float32)}, scan.volume.shape


def test_every_format_on_the_uploads_grid(dicom_upload: Path) -> None:
    maps, shape = _hot_cell_maps(dicom_upload)
    out = render_explanations(
        str(dicom_upload), "application/zip", None, IngestLimits(), maps, ("nifti", "png", "dicom"), ALGORITHM
    )
    assert set(out) == {"nifti", "png", "dicom"}
    volumes, affine = read_attention_nifti(out["nifti"])
    assert list(volumes) == ["hemorrhage", "fracture"]
    assert volumes["hemorrhage"].shape == shape and volumes["hemorrhage"].max() > 0
    np.testing.assert_allclose(
        affine, decode_upload(dicom_upload, "application/zip").volume.affine, atol=1e-4
    )
    assert Image.open(io.BytesIO(out["png"])).format == "PNG"
    pm = pydicom.dcmread(io.BytesIO(out["dicom"]))
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert int(pm.NumberOfFrames) == shape[2] * 2


def test_nifti_upload_gets_nifti_and_png(dicom_upload: Path, tmp_path: Path) -> None:
    maps, _ = _hot_cell_maps(dicom_upload)
    volume = decode_upload(dicom_upload, "application/zip").volume
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.hu.astype(np.int16), volume.affine), nifti)
    out = render_explanations(str(nifti), "application/gzip", None, IngestLimits(), maps, ("nifti", "png"))
    volumes, affine = read_attention_nifti(out["nifti"])
    np.testing.assert_allclose(affine, volume.affine, atol=1e-4)
    # the same head as the DICOM series: the same map on the same voxels
    np.testing.assert_allclose(volumes["hemorrhage"], _dicom_map(dicom_upload, maps), atol=1e-6)
    with pytest.raises(ValueError, match="DICOM upload"):
        render_explanations(str(nifti), "application/gzip", None, IngestLimits(), maps, ("dicom",), ALGORITHM)


def _dicom_map(upload: Path, maps: dict[str, np.ndarray]) -> np.ndarray:
    out = render_explanations(str(upload), "application/zip", None, IngestLimits(), maps, ("nifti",))
    return read_attention_nifti(out["nifti"])[0]["hemorrhage"]
