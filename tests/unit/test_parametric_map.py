"""api.results.parametric_map: attention maps as a DICOM Parametric Map on the source series' grid.

Valid for dciodvfy (zero errors), and read back with pydicom / highdicom each frame is the right task's
map on the right source slice, at that slice's position."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from api.ingest import decode_upload
from api.results.dicom_sr import Algorithm
from api.results.parametric_map import SERIES_NUMBER, parametric_map, sort_slices
from demo.dicom_writer import ct_series, phantom_head, reorient, tilt_gantry, zip_bytes
from headct.dicom_geometry import LPS_TO_RAS, stack_geometry
from headct.explain import map_to_source
from headct.preprocess import preprocess_with_info
from headct.volume import Volume
from tests.unit.test_dicom_sr import dciodvfy

ALGORITHM = Algorithm(
    name="fm-hct-demo", version="0.1.0", model_sha256=hashlib.sha256(b"synthetic weights").hexdigest()
)
TASKS = ("hemorrhage", "edema", "midline_shift")


def _series(axcodes: str, seed: str) -> tuple[Volume, list[Dataset]]:
    """A small CT series (headers only) of a phantom stored with array axes `axcodes` ("LPS-tilt": LPS
    on a 12 deg gantry tilt)."""
    volume = reorient(phantom_head(shape=(40, 36, 9), spacing_mm=(5.0, 5.5, 6.0)), axcodes[:3])
    if axcodes.endswith("-tilt"):
        volume = tilt_gantry(volume, 12.0)
    series = ct_series(volume.with_hu(np.rint(volume.hu)), seed=seed)
    for ds in series:
        del ds.PixelData
    return volume, series


def _maps(shape: tuple[int, ...], tasks: tuple[str, ...] = TASKS) -> dict[str, np.ndarray]:
    """Distinct, recognisable maps: value = task number + a code of the voxel index / 1e4."""
    i, j, k = np.indices(shape, dtype=np.float32)
    return {name: (t + (i + 100 * j + 10000 * k) / 1e6).astype(np.float32) for t, name in enumerate(tasks)}


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "LAI", "LPS-tilt"])
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_dciodvfy_finds_no_error(tmp_path: Path, axcodes: str, n_tasks: int) -> None:
    volume, series = _series(axcodes, seed=f"pm-{axcodes}")
    random.Random(0).shuffle(series)  # any order in
    pm = parametric_map(series, _maps(volume.shape, TASKS[:n_tasks]), ALGORITHM)
    path = tmp_path / "pm.dcm"
    path.write_bytes(_encode(pm))
    errors, _warnings = dciodvfy(path)
    assert errors == []


@pytest.mark.parametrize("axcodes", ["LPS", "LAI", "LPS-tilt"])
def test_frames_read_back_on_the_source_geometry(axcodes: str) -> None:
    volume, series = _series(axcodes, seed=f"pm-read-{axcodes}")
    maps = _maps(volume.shape)
    shuffled = list(series)
    random.Random(1).shuffle(shuffled)
    pm = parametric_map(shuffled, maps, ALGORITHM, series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.5")
    ds = pydicom.dcmread(io.BytesIO(_encode(pm)))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert "FloatPixelData" in ds and ds.BitsAllocated == 32
    assert ds.StudyInstanceUID == series[0].StudyInstanceUID
    assert ds.PatientID == series[0].PatientID
    assert ds.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == ("1.2.3.4", "1.2.3.5")
    assert ds.SeriesNumber == SERIES_NUMBER
    assert ds.SeriesDescription == "fm-hct-demo 0.1.0 attention"
    assert ds.BodyPartExamined == "HEAD" and ds.ContentLabel == "ATTENTION"
    assert ds.Manufacturer == "HeadCT-Serve" and ds.ManufacturerModelName == ALGORITHM.name
    assert ds.SoftwareVersions == ALGORITHM.version and ds.DeviceSerialNumber == ALGORITHM.model_sha256
    assert int(ds.NumberOfFrames) == len(series) * len(TASKS)
    assert (ds.Rows, ds.Columns) == (series[0].Rows, series[0].Columns)
    # the Volume the gateway builds from this series (api.ingest.dicom): its affine and slice order
    geometry = stack_geometry(
        [[float(v) for v in s.ImagePositionPatient] for s in series],
        [float(v) for v in series[0].ImageOrientationPatient],
        [float(v) for v in series[0].PixelSpacing],
    )
    np.testing.assert_allclose(geometry.affine, volume.affine, atol=1e-4)
    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in series[0].ImageOrientationPatient],
    )
    pixels = ds.pixel_array
    seen: set[tuple[str, int]] = set()
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        task = frame.RealWorldValueMappingSequence[0].LUTLabel
        position = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        # which slice of the Volume is at this position: solve the affine
        index = np.linalg.solve(volume.affine, [*(LPS_TO_RAS[:3, :3] @ position), 1.0])[:3]
        np.testing.assert_allclose(index[:2], 0.0, atol=1e-3)
        k = round(float(index[2]))
        np.testing.assert_array_equal(pixels[f], maps[task][:, :, k].T)
        # the frame's source image is the slice at that position
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source == sort_slices(series)[k].SOPInstanceUID
        seen.add((task, k))
    assert seen == {(t, k) for t in TASKS for k in range(volume.shape[2])}


def test_highdicom_reads_it_back() -> None:
    volume, series = _series("LPS", seed="pm-hd")
    maps = _maps(volume.shape, TASKS[:2])
    pm = hd.pm.ParametricMap.from_dataset(
        pydicom.dcmread(io.BytesIO(_encode(parametric_map(series, maps, ALGORITHM))))
    )
    assert isinstance(pm, hd.pm.ParametricMap)
    labels = {item.RealWorldValueMappingSequence[0].LUTLabel for item in pm.PerFrameFunctionalGroupsSequence}
    assert labels == set(TASKS[:2])
    mapping = pm.PerFrameFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"  # UCUM: unitless
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
    assert {str(uid) for _, _, uid in pm.get_source_image_uids()} == {s.SOPInstanceUID for s in series}


def test_synthetic_model_notice() -> None:
    volume, series = _series("LPS", seed="pm-notice")
    demo = Algorithm("x" * 64, "0.1.0", ALGORITHM.model_sha256, synthetic_demo=True)
    pm = parametric_map(series, _maps(volume.shape, TASKS[:1]), demo)
    assert pm.SeriesDescription.endswith(" attention - NOT FOR CLINICAL USE")
    assert len(pm.SeriesDescription) <= 64


def test_refuses_bad_inputs() -> None:
    volume, series = _series("LPS", seed="pm-bad")
    maps = _maps(volume.shape, TASKS[:1])
    with pytest.raises(ValueError, match="shape"):
        parametric_map(series, {"hemorrhage": np.zeros((3, 3, 3), np.float32)}, ALGORITHM)
    with pytest.raises(ValueError, match="no maps"):
        parametric_map(series, {}, ALGORITHM)
    with pytest.raises(ValueError, match="no evidence"):
        parametric_map([], maps, ALGORITHM)
    _, other = _series("LPS", seed="pm-other")
    with pytest.raises(ValueError, match="series"):
        parametric_map([*series[:-1], other[-1]], maps, ALGORITHM)
    with pytest.raises(ValueError, match="NaN"):
        parametric_map(series, {"hemorrhage": np.full(volume.shape, np.nan, np.float32)}, ALGORITHM)
    with pytest.raises(ValueError, match="task name"):
        parametric_map(series, {"bad\\name": maps["hemorrhage"]}, ALGORITHM)


@pytest.mark.parametrize("axcodes", ["LPS", "LPS-tilt"])
def test_end_to_end_from_a_dicom_upload(tmp_path: Path, axcodes: str) -> None:
    """Upload (zip) -> ingest -> preprocess -> a hot patch cell where a dense lesion lands in the model
    input -> `map_to_source` -> parametric map: its hottest pixel, placed by the frame's own position
    and orientation, is on the lesion."""
    head = phantom_head(shape=(64, 64, 24), spacing_mm=(3.5, 3.5, 5.0), lesion_hu=1800.0)
    semi = np.minimum([75.0, 92.0, 80.0], np.array([64 * 3.5, 64 * 3.5, 24 * 5.0]) * [0.4, 0.4, 0.45])
    lesion_mm = np.array([semi[0] / 3, semi[1] / 4, 0.0])  # RAS (phantom_head's blob)
    volume = reorient(head.with_hu(np.rint(head.hu)), "LPS")
    if axcodes.endswith("-tilt"):
        volume = tilt_gantry(volume, 12.0)
    upload = tmp_path / "upload"
    upload.write_bytes(zip_bytes(ct_series(volume, seed=f"e2e-{axcodes}")))
    scan = decode_upload(upload, "application/zip", evidence=True)
    assert scan.evidence is not None
    model_input, info = preprocess_with_info(scan.volume)
    peak = np.unravel_index(int(np.argmax(model_input[2])), model_input.shape[1:])  # bone window: lesion
    grid_map = np.zeros((8, 8, 8), np.float32)
    grid_map[tuple(int(p) // 12 for p in peak)] = 1.0
    pm = parametric_map(scan.evidence, {"hemorrhage": map_to_source(grid_map, info)}, ALGORITHM)
    ds = pydicom.dcmread(io.BytesIO(_encode(pm)))
    frame, row, col = np.unravel_index(int(np.argmax(ds.pixel_array)), ds.pixel_array.shape)
    item = ds.PerFrameFunctionalGroupsSequence[frame]
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
    lps = ipp + iop[:3] * col * col_mm + iop[3:] * row * row_mm
    ras = LPS_TO_RAS[:3, :3] @ lps
    cell_mm = np.asarray(info.cropped_shape) / 8.0
    assert (
        np.linalg.norm(ras - lesion_mm) <= np.linalg.norm(cell_mm / 2) + np.linalg.norm(volume.spacing_mm) / 2
    )
