"""headct.explain.nifti and headct.explain.preview: the maps as a NIfTI file and as a PNG preview."""

from __future__ import annotations

import gzip
import io
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from demo.dicom_writer import phantom_head, reorient
from headct.explain.nifti import COMMENT_EXTENSION, attention_nifti, read_attention_nifti, task_names
from headct.explain.preview import PAD, PANEL_PX, TITLE_PX, attention_preview, preview_size
from headct.volume import Volume

TASKS = ("hemorrhage", "edema", "midline_shift")


def _volume(axcodes: str = "LPS", spacing: tuple[float, float, float] = (0.9, 0.9, 5.0)) -> Volume:
    return reorient(phantom_head(shape=(200, 220, 30), spacing_mm=spacing), axcodes)


def _spot(volume: Volume, centre_mm: tuple[float, float, float], sigma_mm: float = 12.0) -> np.ndarray:
    """A Gaussian map centred at a world point (RAS mm), on the volume's grid, Fortran-ordered."""
    ijk = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in volume.shape], indexing="ij", sparse=True)
    world = [sum(volume.affine[w, a] * ijk[a] for a in range(3)) + volume.affine[w, 3] for w in range(3)]
    d2 = sum((world[w] - centre_mm[w]) ** 2 for w in range(3))
    return np.asfortranarray(np.exp(-d2 / (2 * sigma_mm**2)).astype(np.float32))


# ---- NIfTI ------------------------------------------------------------------------------------------


def test_nifti_round_trip() -> None:
    volume = _volume()
    maps = {name: _spot(volume, (10.0 * t, -20.0, 5.0 * t)) for t, name in enumerate(TASKS)}
    maps["edema"] = np.ascontiguousarray(maps["edema"])  # any memory order in
    payload = attention_nifti(maps, volume.affine)
    assert payload[:2] == b"\x1f\x8b"  # gzip
    img = nib.Nifti1Image.from_bytes(gzip.decompress(payload))
    assert img.shape == (*volume.shape, len(TASKS))
    assert img.get_data_dtype() == np.float32
    stored = volume.affine.astype(np.float32).astype(np.float64)  # NIfTI-1 holds the affine in float32
    np.testing.assert_array_equal(img.affine, stored)
    np.testing.assert_array_equal(img.get_sform(), stored)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert task_names(img) == list(TASKS)
    assert img.header.get_intent()[0] == "estimate" and img.header.get_intent()[2] == "attention"
    assert bytes(img.header["descrip"]).startswith(b"attention: hemorrhage,edema")
    sidecar = json.loads(
        next(e for e in img.header.extensions if e.get_code() == COMMENT_EXTENSION).get_content()
    )
    assert sidecar["tasks"] == list(TASKS)
    read, affine = read_attention_nifti(payload)
    assert list(read) == list(TASKS)
    np.testing.assert_array_equal(affine, stored)
    for name in TASKS:
        np.testing.assert_array_equal(read[name], maps[name])
    # gzip carries no time stamp: same maps, same bytes
    assert attention_nifti(maps, volume.affine) == payload


def test_nifti_refuses_bad_maps() -> None:
    volume = _volume()
    good = _spot(volume, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="no maps"):
        attention_nifti({}, volume.affine)
    with pytest.raises(ValueError, match="same 3-D shape"):
        attention_nifti({"a": good, "b": good[:-1]}, volume.affine)
    with pytest.raises(ValueError, match="NaN"):
        attention_nifti({"a": np.full(volume.shape, np.nan, np.float32)}, volume.affine)
    with pytest.raises(ValueError, match="not an attention NIfTI"):
        read_attention_nifti(volume.to_nifti().to_bytes())


# ---- PNG preview ------------------------------------------------------------------------------------


def _decode(payload: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(payload))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def _colourful(rgb: np.ndarray) -> np.ndarray:
    """Pixels the overlay tinted: channels far apart (the CT is grey, the background nearly so)."""
    rgb = rgb.astype(np.int32)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > 40


def _cell(rgb: np.ndarray, row: int, column: int) -> np.ndarray:
    top = PAD + row * (TITLE_PX + PANEL_PX + PAD) + TITLE_PX
    left = PAD + column * (PANEL_PX + PAD)
    return rgb[top : top + PANEL_PX, left : left + PANEL_PX]


@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "PIR"])
def test_preview_size_colour_and_orientation(axcodes: str) -> None:
    """The spot, on the patient's right, anterior and superior, is coloured in every panel, on the
    image's left (axial, coronal: radiological), top (axial: anterior; coronal, sagittal: superior) and
    left (sagittal: anterior)."""
    volume = _volume(axcodes)
    centre = (45.0, 50.0, 30.0)  # R, A, S of the head's centre
    maps = {"hemorrhage": _spot(volume, centre), "edema": _spot(volume, (-45.0, -50.0, -30.0))}
    rgb = _decode(attention_preview(volume.hu, volume.affine, maps))
    assert (rgb.shape[1], rgb.shape[0]) == preview_size(2)
    for column, (x_is, y_is) in enumerate([("left", "top"), ("left", "top"), ("left", "top")]):
        hot = _colourful(_cell(rgb, 0, column))
        cold = _colourful(_cell(rgb, 1, column))
        assert hot.sum() > 50 and cold.sum() > 50
        rows, cols = np.nonzero(hot)
        assert (cols.mean() < PANEL_PX / 2) == (x_is == "left")
        assert (rows.mean() < PANEL_PX / 2) == (y_is == "top")
        # the second task's spot is on the opposite side
        rows, cols = np.nonzero(cold)
        assert cols.mean() > PANEL_PX / 2 and rows.mean() > PANEL_PX / 2
        # the hottest pixel of the first task is red-ish: the top of the colour scale
        tint = _cell(rgb, 0, column).astype(np.int32)
        redness = tint[..., 0] - tint[..., 2]
        assert redness.max() > 100


def test_preview_keeps_the_physical_aspect() -> None:
    """5 mm slices: the coronal panel is as tall as the scan is long in mm, not in slices."""
    volume = _volume("LPS", spacing=(0.9, 0.9, 5.0))  # 180 x 198 x 150 mm
    rgb = _decode(attention_preview(volume.hu, volume.affine, {"t": _spot(volume, (0.0, 0.0, 0.0))}))
    coronal = _cell(rgb, 0, 1).astype(np.int32)
    drawn = np.any(np.abs(coronal - np.array([20, 20, 28])) > 0, axis=-1)
    rows, cols = np.nonzero(drawn)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    scale = PANEL_PX / 198.0  # pixels per mm: the largest side (A-P) fills the cell
    assert width == pytest.approx(180.0 * scale, abs=2)
    assert height == pytest.approx(150.0 * scale, abs=2)


def test_preview_refuses_bad_input() -> None:
    volume = _volume()
    with pytest.raises(ValueError, match="no maps"):
        attention_preview(volume.hu, volume.affine, {})
    with pytest.raises(ValueError, match="shape"):
        attention_preview(volume.hu, volume.affine, {"t": np.zeros((2, 2, 2), np.float32)})
