"""demo.atlas + demo.synthetic_head: atlas integrity, tissue HU ranges, reproducibility,
finding signatures, and that the generated heads go through the production preprocessing."""

from __future__ import annotations

import subprocess
import sys
from functools import cache

import numpy as np
import pytest

from demo import atlas as A
from demo import synthetic_head as S
from headct import preprocess as P
from headct.volume import Volume


@cache
def _atlas_path() -> str:
    try:
        return str(A.ensure_atlas())
    except A.AtlasError as exc:  # offline and not cached yet
        pytest.fail(
            f"brain CT atlas unavailable ({exc}): `python -m demo.atlas` (run by `make test`) gets it"
        )


@pytest.fixture(scope="module")
def atlas() -> str:
    return _atlas_path()


@cache
def _head(seed: int, hemorrhage: bool, edema: bool, lps: bool = False) -> tuple[Volume, S.SyntheticHeadInfo]:
    return S.make_head_with_info(
        np.random.default_rng(seed), hemorrhage=hemorrhage, edema=edema, lps=lps, circular_fov=False
    )


def _brain_window_mean(hu: np.ndarray) -> float:
    return float(np.clip(hu / 80.0, 0.0, 1.0).mean(dtype=np.float64))


# ---- atlas -------------------------------------------------------------------------------------


def test_atlas_is_pinned_and_verified(atlas: str) -> None:
    assert A.TOTALSEGMENTATOR_VERSION == "2.18.0"
    assert A.sha256_file(A.Path(atlas)) == A.ATLAS_SHA256
    assert A.ensure_atlas() == A.Path(atlas)  # idempotent: found, not re-extracted


def test_atlas_cli_prints_path(atlas: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "demo.atlas"],
        capture_output=True,
        text=True,
        check=True,
        cwd=A.REPO_ROOT,
    )
    assert out.stdout.strip() == atlas


def test_atlas_override_must_match_hash(tmp_path: A.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = tmp_path / "atlas.nii.gz"
    bogus.write_bytes(b"not an atlas")
    monkeypatch.setenv(A.ATLAS_ENV_VAR, str(bogus))
    with pytest.raises(A.AtlasError):
        A.ensure_atlas()


# ---- anatomy / HU ranges -----------------------------------------------------------------------


def test_canonical_tissue_hu_ranges(atlas: str) -> None:
    can = S.canonical_head(atlas)
    info = S.SyntheticHeadInfo(
        hemorrhage=False, edema=False, spacing_mm=(1.0, 1.0, 1.0), shape=(0, 0, 0), lps=False
    )
    rng = np.random.default_rng(0)
    geo, hem, ede = rng.spawn(3)
    hu = S._compose_head(can, geo, hem, ede, hemorrhage=False, edema=False, info=info)
    brain = hu[can.brain]
    assert np.median(brain) == pytest.approx(38, abs=6)  # parenchyma ~ 30-45 HU
    outside = hu[~can.brain]
    tissue = outside[outside > S.AIR_HU]
    assert tissue.min() >= 0.0 and tissue.max() <= S.CORTICAL_BONE_HU[1]
    cortical = ((tissue >= 700) & (tissue <= 1500)).sum()
    scalp = ((tissue >= 20) & (tissue <= 60)).sum()
    csf = (tissue <= 10).sum()
    diploe = ((tissue >= S.DIPLOE_HU[0]) & (tissue <= S.DIPLOE_HU[1])).sum()
    assert min(cortical, scalp, csf, diploe) > 10_000  # every layer is present with real volume
    assert np.all(np.isin(outside[outside <= S.AIR_HU], [S.AIR_HU]))  # air is exactly -1000 before noise


def test_generated_volume_hu_ranges(atlas: str) -> None:
    v, info = _head(11, False, False)
    hu = v.hu
    assert v.axcodes == ("R", "A", "S") and v.spacing_mm == pytest.approx((1.0, 1.0, 1.0))
    assert np.median(hu[:5, -5:, :]) == pytest.approx(-1000, abs=5)  # air in a corner (no circular FOV)
    assert 700 < np.percentile(hu, 99.9) < 1600  # cortical bone
    assert hu.min() > -1100 and hu.max() < 1700
    # soft tissue and brain: a large population in 0..80 HU
    assert ((hu > 0) & (hu < 80)).mean() > 0.1
    # the table/holder lies behind (-y of) the head and is > 0 HU, so the foreground crop includes it
    start, _ = P.foreground_bbox(hu)
    rows = hu[:, start[1] : start[1] + 3, :]
    assert (rows > 100).any()
    assert info.params["fov_mm"] >= 225


# ---- reproducibility and findings --------------------------------------------------------------


def test_seeded_reproducibility(atlas: str) -> None:
    a = S.make_head(np.random.default_rng(123), hemorrhage=True, edema=True)
    b = S.make_head(np.random.default_rng(123), hemorrhage=True, edema=True)
    c = S.make_head(np.random.default_rng(124), hemorrhage=True, edema=True)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.shape != c.shape or not np.array_equal(a.hu, c.hu)


def test_hemorrhage_raises_brain_window_mean(atlas: str) -> None:
    base, _ = _head(21, False, False)
    bleed, info = _head(21, True, False)
    assert base.shape == bleed.shape  # same seed: same head, only the finding differs
    assert info.hemorrhage_ml > 1.0 and info.hemorrhage_kinds
    diff = bleed.hu - base.hu
    assert diff.max() > 20 and diff.min() > -5  # hyperdense only
    assert _brain_window_mean(bleed.hu) > _brain_window_mean(base.hu)
    xb, xh = P.preprocess(base).astype(np.float32), P.preprocess(bleed).astype(np.float32)
    assert xh[0].mean() > xb[0].mean()  # brain-window channel of the model input


def test_edema_lowers_brain_window_mean(atlas: str) -> None:
    base, _ = _head(21, False, False)
    swollen, info = _head(21, False, True)
    assert info.edema_ml > 20.0
    diff = swollen.hu - base.hu
    assert diff.min() < -10 and diff.max() < 5  # hypodense only
    changed = np.abs(diff) > 0.5
    assert swollen.hu[changed].mean() < base.hu[changed].mean()
    assert _brain_window_mean(swollen.hu) < _brain_window_mean(base.hu)
    xb, xe = P.preprocess(base).astype(np.float32), P.preprocess(swollen).astype(np.float32)
    assert xe[0].mean() < xb[0].mean()


def test_findings_have_different_signatures(atlas: str) -> None:
    base, _ = _head(33, False, False)
    bleed, _ = _head(33, True, False)
    swollen, info_e = _head(33, False, True)
    d_bleed = bleed.hu - base.hu
    d_edema = swollen.hu - base.hu
    bleed_vals = bleed.hu[d_bleed > 10]
    edema_vals = swollen.hu[d_edema < -5]
    # hemorrhage 55-90 HU (plus noise), edema 5-20 HU (soft edge blends toward brain values)
    assert 50 < np.median(bleed_vals) < 95
    assert np.median(edema_vals) < 28
    # edema is the larger, softer finding
    assert info_e.edema_ml > 0
    assert (d_edema < -5).sum() > 0.5 * (d_bleed > 10).sum()


def test_lps_storage_same_head(atlas: str) -> None:
    ras, _ = _head(44, True, True)
    lps, _ = _head(44, True, True, lps=True)
    assert lps.axcodes == ("L", "P", "S")
    np.testing.assert_array_equal(lps.hu, ras.hu[::-1, ::-1, :])
    np.testing.assert_array_equal(P.preprocess(lps), P.preprocess(ras))


def test_clinical_spacing_goes_through_resample(atlas: str) -> None:
    v = S.make_head(np.random.default_rng(5), hemorrhage=False, edema=False, spacing_mm=(0.8, 0.8, 5.0))
    assert v.spacing_mm == pytest.approx((0.8, 0.8, 5.0))
    x, info = P.preprocess_with_info(v)
    assert info.resampled and x.shape == (3, 96, 96, 96)
    spacing = S.random_clinical_spacing(np.random.default_rng(0))
    assert 0.4 <= spacing[0] <= 1.0 and spacing[0] == spacing[1] and 1.0 <= spacing[2] <= 5.0


def test_to_nifti_roundtrip(atlas: str) -> None:
    v, _ = _head(11, False, False)
    img = S.to_nifti(v)
    back = Volume.from_nifti(img)
    np.testing.assert_array_equal(back.hu, v.hu)
    np.testing.assert_allclose(back.affine, v.affine, atol=1e-5)


def test_generator_does_not_import_torch() -> None:
    code = "import sys, demo.synthetic_head, demo.atlas; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, cwd=A.REPO_ROOT).returncode == 0
