"""Seeded synthetic head CT built from the brain CT atlas, with optional hemorrhage and edema.

SYNTHETIC DEMO DATA - NOT FOR CLINICAL USE. These volumes exist to exercise the serving stack and to
train the synthetic demo model; they are plausible-looking, not anatomically faithful.

Anatomy (a "canonical head", built once per process from the atlas on its 1 mm RAS grid):

* brain: the atlas HU as they are (parenchyma ~20-45 HU, ventricles/CSF ~0-15 HU), except the
  hyperdense skull-stripping residue along the atlas surface, which is replaced by parenchyma
  (our own skull takes its place);
* a CSF layer filling a smoothed envelope of the brain (sulci, convexity), ~0-10 HU;
* skull: inner table / diploe / outer table shells at increasing distance from that envelope
  (cortical bone 900-1500 HU, diploe 350-700 HU), thickness modulated smoothly around the head;
* scalp: soft tissue 20-60 HU; a neck below the skull base (muscle, cord in CSF, vertebral bone);
* everything else air (-1000 HU).

Per case (all from the caller's `numpy.random.Generator`):

* geometry: head scale +-8 %, small rotations (pitch +-12 deg, roll +-6 deg, yaw +-8 deg),
  translation, field of view 225-265 mm, z coverage 145-180 mm; voxel spacing either the requested
  one (1 mm RAS by default: then `headct.preprocess` skips its spline resample) or, with
  ``spacing_mm=None``, a random clinical one (in-plane 0.4-1.0 mm, slices 1-5 mm);
* scanner-fixed parts: a carbon-fibre table (dense skins > 0 HU, foam core) and a curved head
  holder under the occiput (> 0 HU), so the > 0 HU foreground crop includes them as in real scans;
  optionally the circular reconstruction field (outside = -3024 HU padding);
* intensity: global offset, Gaussian noise, a smooth cupping (beam-hardening-like) term;
* findings, each independently present:

  - ``hemorrhage`` -- hyperdense (55-90 HU), sharp-edged: 1-2 irregular intraparenchymal blobs
    (semi-axes 10-20 mm) and/or an extra-axial crescent (subdural-like, up to 8-16 mm thick) over
    the convexity;
  - ``edema`` -- hypodense (5-20 HU), larger (radius 15-35 mm), soft-edged region in the white
    matter, sparing the ventricles.

The random streams for geometry, hemorrhage, edema and noise are independent children of the caller's
generator, so toggling a finding with the same seed changes only that finding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

from headct.volume import Volume

AIR_HU: Final = -1000.0
OUTSIDE_FOV_HU: Final = -3024.0  # common padding value outside the reconstruction circle
#: Tissue HU ranges used by the generator (per-case values are drawn inside them).
CSF_HU: Final = (0.0, 10.0)
CORTICAL_BONE_HU: Final = (900.0, 1500.0)
DIPLOE_HU: Final = (350.0, 700.0)
SCALP_HU: Final = (20.0, 60.0)
HEMORRHAGE_HU: Final = (55.0, 90.0)
EDEMA_HU: Final = (5.0, 20.0)
TABLE_SKIN_HU: Final = (250.0, 500.0)
HOLDER_HU: Final = (120.0, 300.0)

_MARGIN_MM: Final = 28  # canonical grid margin around the brain for CSF + skull + scalp
_NECK_MM: Final = 70  # canonical grid extension below the brain for the neck
_RESIDUE_HU: Final = 60.0  # atlas voxels denser than this near its surface are stripping residue
_RESIDUE_DEPTH_MM: Final = 12.0
_MAX_SHELL_MM: Final = 18.0  # CSF + inner table + diploe + outer table + scalp, upper bound (mm)


# ---- canonical head (once per process) ---------------------------------------------------------


@dataclass(frozen=True)
class CanonicalHead:
    """Atlas-derived arrays on the canonical 1 mm RAS grid (index -> world via `affine`)."""

    base_hu: np.ndarray  # float32 atlas HU inside the brain, air elsewhere
    brain: np.ndarray  # bool, atlas brain (incl. ventricles)
    parenchyma: np.ndarray  # bool, brain tissue (not CSF), edema/hemorrhage substrate
    dist_out: np.ndarray  # float32 mm outside the envelope (0 inside)
    dist_in: np.ndarray  # float32 mm inside the envelope (0 outside)
    direction: np.ndarray  # float32 (3, X, Y, Z) unit vector from the head centre (for skull/crescent)
    csf_idx: np.ndarray  # flat indices: envelope but not brain (sulcal / convexity CSF)
    shell_idx: np.ndarray  # flat indices outside the envelope that any skull + scalp can reach
    shell_dist: np.ndarray  # dist_out at shell_idx (mm)
    shell_dir: np.ndarray  # (3, n) direction at shell_idx
    neck_idx: tuple[np.ndarray, ...]  # flat indices of neck labels 1 soft tissue, 2 CSF, 3 cord, 4 bone
    nonair_box: tuple[np.ndarray, np.ndarray]  # index bbox (lo, hi exclusive) of everything not air
    affine: np.ndarray  # canonical index -> world mm
    center_world: np.ndarray  # head centre (brain bbox centre), world mm
    iph_candidates: np.ndarray  # flat indices of deep parenchyma voxels (hemorrhage centres)
    edema_candidates: np.ndarray  # flat indices of deep supratentorial parenchyma (edema centres)
    surface_points: np.ndarray  # (N, 3) world mm points on the outer scalp bound (for placement)


def canonical_head(atlas_path: str | Path | None = None) -> CanonicalHead:
    """The canonical head built from the atlas (default: `demo.atlas.ensure_atlas()`).

    Cached per process and per atlas file; building it takes a few seconds (distance transforms).
    """
    if atlas_path is None:
        from demo.atlas import ensure_atlas

        atlas_path = ensure_atlas()
    return _build_canonical_head(str(Path(atlas_path).resolve()))


def _load_cropped_atlas(atlas_path: str) -> tuple[np.ndarray, np.ndarray]:
    """The 1 mm RAS atlas (HU) on its brain bounding box + margin (+ neck below), padded where that box
    leaves the atlas array; and the affine of that grid."""
    img = nib.load(atlas_path)
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image too
        raise ValueError(f"expected a NIfTI brain CT atlas, got {type(img).__name__}")
    atlas = np.asanyarray(img.dataobj, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    if "".join(nib.aff2axcodes(affine)) != "RAS" or not np.allclose(np.abs(np.diag(affine)[:3]), 1.0):
        raise ValueError("expected the 1 mm RAS brain CT atlas")

    idx = np.argwhere(atlas != 0)
    lo, hi = idx.min(0), idx.max(0) + 1
    start = lo - np.array([_MARGIN_MM, _MARGIN_MM, _NECK_MM])
    stop = hi + _MARGIN_MM
    pad = [(int(max(0, -s)), int(max(0, e - n))) for s, e, n in zip(start, stop, atlas.shape, strict=True)]
    atlas = np.pad(atlas, pad)
    shift = np.array([p[0] for p in pad])
    start, stop = start + shift, stop + shift
    sl = tuple(slice(int(s), int(e)) for s, e in zip(start, stop, strict=True))
    atlas = np.ascontiguousarray(atlas[sl])
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ (start - shift) + affine[:3, 3]
    return atlas, new_affine


def _replace_skull_strip_residue(atlas: np.ndarray, brain: np.ndarray, dist_in: np.ndarray) -> np.ndarray:
    """The atlas with its skull-stripping residue replaced by the local parenchymal mean.

    The atlas keeps a hyperdense (60-385 HU) rim of bone/dura along the skull base and the vertex,
    within a few mm of its surface (~15 ml). Our own skull replaces it, and left in place it would look
    like an extra-axial bleed in every normal head. Such voxels get the local parenchymal mean instead
    (normalised Gaussian average of the other brain voxels); deeper hyperdense spots (choroid plexus /
    pineal calcifications) are kept.
    """
    residue = brain & (atlas > _RESIDUE_HU) & (dist_in <= _RESIDUE_DEPTH_MM)
    if residue.any():
        keep = (brain & ~residue).astype(np.float32)
        num = ndi.gaussian_filter(atlas * keep, sigma=3.0)
        den = ndi.gaussian_filter(keep, sigma=3.0)
        atlas = atlas.copy()
        atlas[residue] = np.clip(num[residue] / np.maximum(den[residue], 1e-3), 20.0, 45.0)
    return atlas


def _outward_directions(
    shape: tuple[int, ...], center_idx: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Sparse index grids of `shape`, and the unit vector (3, *shape) from `center_idx` to each voxel."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    rel = [g - np.float32(c) for g, c in zip(grids, center_idx, strict=True)]
    norm = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) + np.float32(1e-3)
    direction = np.stack([np.broadcast_to(r / norm, shape) for r in rel]).astype(np.float32)
    return grids, direction


def _neck_labels(
    brain: np.ndarray, grids: list[np.ndarray], z_bottom: int, center_idx: np.ndarray
) -> np.ndarray:
    """Neck labels (1 soft tissue, 2 CSF around the cord, 3 cord, 4 bone; 0 elsewhere): an elliptic
    cylinder below the brain's bottom slice `z_bottom`, centred under the brainstem."""
    shape = brain.shape
    stem = brain[:, :, z_bottom : z_bottom + 4].any(axis=2)
    sx, sy = np.argwhere(stem).mean(0) if stem.any() else center_idx[:2]
    gx, gy = grids[0][:, :, 0], grids[1][:, :, 0]
    ell = ((gx - sx) / 58.0) ** 2 + ((gy - (sy + 8.0)) / 52.0) ** 2
    r_canal = np.sqrt((gx - sx) ** 2 + (gy - sy) ** 2)
    body = np.sqrt((gx - sx) ** 2 + (gy - (sy + 22.0)) ** 2)  # vertebral body anterior to the canal
    label2d = np.zeros(shape[:2], np.int8)
    label2d[ell <= 1.0] = 1
    label2d[(r_canal <= 16.0) | (body <= 14.0)] = 4
    label2d[r_canal <= 9.0] = 2
    label2d[r_canal <= 5.5] = 3
    neck = np.zeros(shape, np.int8)
    neck_top = z_bottom + 12  # overlaps the skull base a little so there is no air gap
    neck[:, :, :neck_top] = label2d[:, :, None]
    # The canal continues up through the skull base (foramen magnum) into the brainstem.
    canal_top = z_bottom + 25
    neck[:, :, neck_top:canal_top][(r_canal <= 9.0)[:, :, None].repeat(canal_top - neck_top, 2)] = 2
    return neck


def _lesion_candidates(
    parenchyma: np.ndarray, dist_in: np.ndarray, blo: np.ndarray, bhi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices where an intraparenchymal hemorrhage / an edema may be centred: supratentorial
    parenchyma at least 14 / 18 mm inside the brain envelope."""
    flat_par = parenchyma.ravel()
    supra = np.zeros(parenchyma.shape, bool)
    supra[:, :, int(blo[2] + 0.35 * (bhi[2] - blo[2])) :] = True  # above the posterior fossa, roughly
    iph = np.flatnonzero(flat_par & (dist_in.ravel() >= 14.0) & supra.ravel())
    edema = np.flatnonzero(flat_par & (dist_in.ravel() >= 18.0) & supra.ravel())
    return iph, edema


@functools.lru_cache(maxsize=2)
def _build_canonical_head(atlas_path: str) -> CanonicalHead:
    atlas, new_affine = _load_cropped_atlas(atlas_path)
    brain = atlas != 0
    parenchyma = brain & (atlas >= 18.0)
    # Smooth envelope: the skull's inner surface follows the brain's convex hull-ish outline, not sulci.
    smooth = ndi.gaussian_filter(ndi.binary_fill_holes(brain).astype(np.float32), sigma=3.0)
    envelope = ndi.binary_fill_holes((smooth > 0.25) | brain)
    dist_out = ndi.distance_transform_edt(~envelope).astype(np.float32)
    dist_in = ndi.distance_transform_edt(envelope).astype(np.float32)
    atlas = _replace_skull_strip_residue(atlas, brain, dist_in)

    shape = atlas.shape
    bidx = np.argwhere(brain)
    blo, bhi = bidx.min(0), bidx.max(0)
    center_idx = (blo + bhi) / 2.0
    # Centre slightly above the bbox centre: the brain is wider up top, the skull is rounder that way.
    center_idx[2] += 0.1 * (bhi[2] - blo[2])
    grids, direction = _outward_directions(shape, center_idx)
    neck = _neck_labels(brain, grids, int(blo[2]), center_idx)
    iph, edema = _lesion_candidates(parenchyma, dist_in, blo, bhi)

    # Points just outside the thickest possible scalp: used to rest the head on its holder.
    shell = (dist_out > 17.0) & (dist_out <= 18.5)
    pts = np.argwhere(shell)[:: max(1, int(shell.sum()) // 4000)].astype(np.float64)
    surface_points = (new_affine[:3, :3] @ pts.T).T + new_affine[:3, 3]
    center_world = new_affine[:3, :3] @ center_idx + new_affine[:3, 3]

    base_hu = np.where(brain, atlas, np.float32(AIR_HU)).astype(np.float32)
    csf_idx = np.flatnonzero(envelope & ~brain)
    # Thickest possible skull + scalp: 2 + 2.2 + 4 + 2.2 + 7.5 mm, stretched by the modulation (<= 1.45).
    reach = _MAX_SHELL_MM * 1.45
    shell_idx = np.flatnonzero(~envelope & (dist_out <= reach))
    not_brain = ~brain.ravel()
    neck_flat = neck.ravel()
    neck_idx = tuple(np.flatnonzero((neck_flat == label) & not_brain) for label in (1, 2, 3, 4))
    solid = np.zeros(shape, bool)
    solid.ravel()[shell_idx] = True
    solid |= envelope | (neck > 0)
    sidx = np.argwhere(solid)
    nonair_box = (sidx.min(0), sidx.max(0) + 1)

    return CanonicalHead(
        base_hu=base_hu,
        brain=brain,
        parenchyma=parenchyma,
        dist_out=dist_out,
        dist_in=dist_in,
        direction=direction,
        csf_idx=csf_idx,
        shell_idx=shell_idx,
        shell_dist=dist_out.ravel()[shell_idx],
        shell_dir=direction.reshape(3, -1)[:, shell_idx],
        neck_idx=neck_idx,
        nonair_box=nonair_box,
        affine=new_affine,
        center_world=center_world,
        iph_candidates=iph,
        edema_candidates=edema,
        surface_points=surface_points,
    )


# ---- helpers -----------------------------------------------------------------------------------


def _rotation(pitch: float, roll: float, yaw: float) -> np.ndarray:
    """Rotation matrix (radians): pitch about x (R-L axis), roll about y (A-P), yaw about z (S-I)."""
    cx, sx = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(roll), math.sin(roll)
    cz, sz = math.cos(yaw), math.sin(yaw)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (for lesion shapes)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _blob_field(
    rng: np.random.Generator, radii: np.ndarray, irregularity: float, soft_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """An irregular ellipsoid as a weight field in [0, 1] on a local 1 mm box.

    Returns ``(weights, half_extent)``; the box is ``2 * half_extent + 1`` voxels per axis, centred on
    the blob. The level set ``|R (x / r)|^2 + noise <= 1`` is blurred over `soft_mm` mm.
    """
    half = np.ceil(radii.max() * (1.0 + irregularity) + 2.0 * soft_mm + 2.0).astype(int)
    ax = np.arange(-half, half + 1, dtype=np.float32)
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    pts = np.stack([x, y, z], axis=-1) @ _random_rotation(rng).astype(np.float32)
    f = np.sqrt(((pts / radii.astype(np.float32)) ** 2).sum(-1))
    if irregularity > 0:
        # Smooth random field for an irregular outline: white noise on a 4x coarser grid, blurred,
        # then linearly upsampled (much cheaper than blurring at full resolution, same look).
        c = rng.normal(size=((x.shape[0] + 3) // 4 + 1,) * 3).astype(np.float32)
        c = ndi.gaussian_filter(c, sigma=max(0.5, float(radii.min()) * 0.125))
        noise = ndi.zoom(c, x.shape[0] / c.shape[0], order=1, grid_mode=True, mode="nearest")[
            : x.shape[0], : x.shape[0], : x.shape[0]
        ]
        noise /= noise.std() + 1e-6
        f = f + np.float32(irregularity) * noise * 0.5
    # signed distance-ish in mm from the surface (negative inside)
    sd = (f - 1.0) * np.float32(radii.mean())
    if soft_mm <= 0.5:
        weights = np.clip(0.5 - sd, 0.0, 1.0)  # ~1 voxel partial-volume edge
    else:
        weights = 1.0 / (1.0 + np.exp(np.clip(sd / np.float32(soft_mm / 2.0), -30, 30)))
    return weights.astype(np.float32), np.full(3, half)


@dataclass(frozen=True)
class _Piece:
    """Lesion weights (fraction of each voxel replaced, 0..1) on a box of the canonical grid."""

    lo: np.ndarray  # box origin, canonical voxel index
    weights: np.ndarray  # float32, box-shaped

    @property
    def voxels(self) -> float:
        return float(self.weights.sum(dtype=np.float64))


def _paste(
    target: np.ndarray,
    mask: np.ndarray | None,
    center: np.ndarray,
    weights: np.ndarray,
    value: np.ndarray | np.floating | float,
) -> _Piece | None:
    """Blend ``target = target + w * (value - target)`` around `center` (voxel index), clipped to the array.

    `mask` (same shape as target) restricts where the blend applies. Returns the applied weights as a
    `_Piece` (their sum is the blended volume in voxels), or None if nothing landed in the array.
    """
    half = np.array(weights.shape) // 2
    lo = center - half
    hi = lo + np.array(weights.shape)
    t_lo = np.maximum(lo, 0)
    t_hi = np.minimum(hi, target.shape)
    if np.any(t_hi <= t_lo):
        return None
    w_sl = tuple(slice(int(a - b), int(c - b)) for a, b, c in zip(t_lo, lo, t_hi, strict=True))
    t_sl = tuple(slice(int(a), int(c)) for a, c in zip(t_lo, t_hi, strict=True))
    w = weights[w_sl]
    if mask is not None:
        w = w * mask[t_sl]
    region = target[t_sl]
    val = value[w_sl] if isinstance(value, np.ndarray) else np.float32(value)
    region += w * (val - region)
    return _Piece(lo=t_lo.astype(int), weights=np.asarray(w, np.float32))


# ---- case parameters ---------------------------------------------------------------------------


@dataclass
class SyntheticHeadInfo:
    """What was generated (for tests, debugging and dataset manifests)."""

    hemorrhage: bool
    edema: bool
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    lps: bool
    hemorrhage_ml: float = 0.0
    hemorrhage_kinds: list[str] = field(default_factory=list)
    edema_ml: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    #: With ``lesion_masks=True``: per finding, the fraction (0..1) of each voxel of the returned
    #: volume that the finding replaced (same array order as the volume). Empty otherwise.
    lesion_masks: dict[str, np.ndarray] = field(default_factory=dict)


def random_clinical_spacing(rng: np.random.Generator) -> tuple[float, float, float]:
    """In-plane 0.4-1.0 mm (square pixels), slice 1-5 mm, like clinical head CT reconstructions."""
    inplane = float(rng.uniform(0.4, 1.0))
    slice_mm = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
    return (inplane, inplane, slice_mm)


def _compose_head(
    can: CanonicalHead,
    geo: np.random.Generator,
    hem_rng: np.random.Generator,
    ede_rng: np.random.Generator,
    *,
    hemorrhage: bool,
    edema: bool,
    info: SyntheticHeadInfo,
    pieces: dict[str, list[_Piece]] | None = None,
) -> np.ndarray:
    """The canonical-space HU volume of this case: brain (+ lesions), CSF, skull, scalp, neck.

    The lesion weights are appended to ``pieces[finding]`` when `pieces` is given.
    """
    pieces = pieces if pieces is not None else {}
    pieces.setdefault("hemorrhage", [])
    pieces.setdefault("edema", [])
    hu = can.base_hu.copy()
    csf_t = _paint_coverings(can, hu, geo, info)
    vox_ml = float(abs(np.linalg.det(can.affine[:3, :3]))) / 1000.0
    if edema:
        info.edema_ml = _add_edema(can, hu, ede_rng, pieces["edema"]) * vox_ml
    if hemorrhage:
        voxels, info.hemorrhage_kinds = _add_hemorrhage(can, hu, hem_rng, pieces["hemorrhage"], csf_t=csf_t)
        info.hemorrhage_ml = voxels * vox_ml
    return hu


def _paint_coverings(
    can: CanonicalHead, hu: np.ndarray, geo: np.random.Generator, info: SyntheticHeadInfo
) -> float:
    """Paint the CSF layer, skull, scalp and neck of this case into `hu`; returns the CSF layer (mm)."""
    flat = hu.reshape(-1)
    # Skull thickness varies smoothly around the head: a random low-order function of direction,
    # thicker towards the occiput (-y) and thinner over the temporal squama, like real skulls.
    coeff = geo.normal(0.0, 0.12, size=3).astype(np.float32)
    d = can.shell_dir
    modulation = np.clip(1.0 + coeff @ d, 0.7, 1.3)
    modulation += np.float32(0.15) * np.maximum(-d[1], 0) - np.float32(0.12) * np.abs(d[0]) * (
        np.abs(d[2]) < 0.3
    )
    d_eff = can.shell_dist / modulation

    csf_t = geo.uniform(0.8, 2.0)
    inner_t = geo.uniform(1.2, 2.2)
    diploe_t = geo.uniform(2.0, 4.0)
    outer_t = geo.uniform(1.2, 2.2)
    scalp_t = geo.uniform(4.0, 7.5)
    csf_hu = geo.uniform(*CSF_HU)
    cortical_hu = geo.uniform(*CORTICAL_BONE_HU)
    diploe_hu = geo.uniform(*DIPLOE_HU)
    scalp_hu = geo.uniform(*SCALP_HU)
    b1 = csf_t
    b2 = b1 + inner_t
    b3 = b2 + diploe_t
    b4 = b3 + outer_t
    b5 = b4 + scalp_t
    info.params.update(
        skull_mm=round(inner_t + diploe_t + outer_t, 2),
        scalp_mm=round(scalp_t, 2),
        csf_layer_mm=round(csf_t, 2),
    )

    # Envelope voxels that are not atlas brain are sulcal/convexity CSF.
    flat[can.csf_idx] = csf_hu
    # Layer lookup by (modulated) distance from the envelope: CSF, inner table, diploe, outer table, scalp.
    bounds = np.array([b1, b2, b3, b4, b5], np.float32)
    values = np.array([csf_hu, cortical_hu, diploe_hu, cortical_hu, scalp_hu, AIR_HU], np.float32)
    flat[can.shell_idx] = values[np.searchsorted(bounds, d_eff, side="left")]

    # Neck (below the skull base): soft tissue where still air, then CSF, cord and vertebral bone.
    soft = can.neck_idx[0]
    soft = soft[flat[soft] <= AIR_HU + 1]
    flat[soft] = geo.uniform(30, 55)
    flat[can.neck_idx[1]] = csf_hu
    flat[can.neck_idx[2]] = geo.uniform(25, 35)
    flat[can.neck_idx[3]] = geo.uniform(300, 600)
    return b1


def _add_edema(can: CanonicalHead, hu: np.ndarray, rng: np.random.Generator, pieces: list[_Piece]) -> float:
    """Paint 1-2 hypodense, soft-edged edema regions into `hu`; returns their volume in voxels."""
    n_regions = 1 if rng.random() < 0.75 else 2
    total = 0.0
    for _ in range(n_regions):
        center = np.array(np.unravel_index(rng.choice(can.edema_candidates), hu.shape))
        radii = rng.uniform(15.0, 35.0, size=3)
        weights, _ = _blob_field(rng, radii, irregularity=0.5, soft_mm=rng.uniform(4.0, 8.0))
        target = np.float32(rng.uniform(*EDEMA_HU))
        # Only parenchyma darkens; ventricles/CSF keep their values (vasogenic edema spares them).
        piece = _paste(hu, can.parenchyma, center, weights, target)
        if piece is not None:
            pieces.append(piece)
            total += piece.voxels
    return total


def _add_hemorrhage(
    can: CanonicalHead, hu: np.ndarray, rng: np.random.Generator, pieces: list[_Piece], *, csf_t: float
) -> tuple[float, list[str]]:
    """Paint intraparenchymal blob(s) and/or an extra-axial crescent into `hu`; returns the volume in
    voxels and the kinds painted."""
    kinds: list[str] = []
    u = rng.random()
    if u < 0.6:
        kinds.append("intraparenchymal")
    elif u < 0.85:
        kinds.append("extra_axial")
    else:
        kinds += ["intraparenchymal", "extra_axial"]
    total = 0.0
    if "intraparenchymal" in kinds:
        for _ in range(1 if rng.random() < 0.7 else 2):
            center = np.array(np.unravel_index(rng.choice(can.iph_candidates), hu.shape))
            radii = rng.uniform(10.0, 20.0, size=3)
            weights, _ = _blob_field(rng, radii, irregularity=0.35, soft_mm=0.0)
            value = np.float32(rng.uniform(*HEMORRHAGE_HU))
            piece = _paste(hu, can.brain, center, weights, value)
            if piece is not None:
                pieces.append(piece)
                total += piece.voxels
    if "extra_axial" in kinds:
        piece = _crescent(can, hu, rng, csf_t=csf_t)
        if piece is not None:
            pieces.append(piece)
            total += piece.voxels
    return total, kinds


def _crescent(can: CanonicalHead, hu: np.ndarray, rng: np.random.Generator, *, csf_t: float) -> _Piece | None:
    """Paint a subdural-like crescent over the convexity; returns its weights (None if empty)."""
    # Direction: lateral / superior hemisphere (convexities), not the skull base.
    while True:
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        if v[2] > -0.1 and abs(v[0]) > 0.3:
            break
    half_angle = rng.uniform(math.radians(35), math.radians(60))
    t_max = rng.uniform(8.0, 16.0)
    value = np.float32(rng.uniform(*HEMORRHAGE_HU))
    # Work only in a band around the envelope surface to keep this cheap.
    band = (can.dist_in <= t_max + 1.0) & (can.dist_out <= csf_t)
    idx = np.flatnonzero(band)
    d = can.direction.reshape(3, -1)[:, idx]
    cosang = v @ d
    inside_cap = cosang > math.cos(half_angle)
    idx, cosang = idx[inside_cap], cosang[inside_cap]
    ang = np.arccos(np.clip(cosang, -1, 1))
    # Crescent profile: thickest at the cap centre, tapering to 0 at its rim.
    thickness = t_max * np.cos(0.5 * math.pi * ang / half_angle) ** 0.7
    depth = can.dist_in.ravel()[idx]
    w = np.clip(thickness - depth + 0.5, 0.0, 1.0).astype(np.float32)
    flat = hu.reshape(-1)
    flat[idx] += w * (value - flat[idx])
    keep = w > 0
    if not keep.any():
        return None
    coords = np.array(np.unravel_index(idx[keep], hu.shape))
    lo = coords.min(1)
    box = np.zeros(coords.max(1) - lo + 1, np.float32)
    box[tuple(coords - lo[:, None])] = w[keep]
    return _Piece(lo=lo, weights=box)


def _warp_pieces(pieces: list[_Piece], m: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample canonical-grid lesion pieces onto the output grid (linear, like the head itself).

    `m` maps output voxel indices to canonical voxel indices. Only each piece's own box is resampled.
    """
    out = np.zeros(shape, np.float32)
    lin, off = m[:3, :3], m[:3, 3]
    for piece in pieces:
        hi = piece.lo + np.array(piece.weights.shape)
        corners = np.array(
            np.meshgrid(*[(a - 1.0, b) for a, b in zip(piece.lo, hi, strict=True)], indexing="ij")
        ).reshape(3, -1)
        out_corners = np.linalg.solve(lin, corners - off[:, None])
        o_lo = np.clip(np.floor(out_corners.min(1)).astype(int), 0, shape)
        o_hi = np.clip(np.ceil(out_corners.max(1)).astype(int) + 1, 0, shape)
        if np.any(o_hi <= o_lo):
            continue
        box = tuple(slice(int(a), int(b)) for a, b in zip(o_lo, o_hi, strict=True))
        warped = ndi.affine_transform(
            piece.weights,
            lin,
            offset=off + lin @ o_lo - piece.lo,
            output_shape=tuple(int(b - a) for a, b in zip(o_lo, o_hi, strict=True)),
            order=1,
            mode="constant",
            cval=0.0,
            prefilter=False,
        )
        np.maximum(out[box], warped, out=out[box])
    return out


# ---- public API --------------------------------------------------------------------------------


def make_head_with_info(
    rng: np.random.Generator,
    *,
    hemorrhage: bool,
    edema: bool,
    spacing_mm: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    lps: bool = False,
    circular_fov: bool | None = None,
    atlas_path: str | Path | None = None,
    lesion_masks: bool = False,
) -> tuple[Volume, SyntheticHeadInfo]:
    """Generate one synthetic head CT; see the module docstring. Also returns what was generated.

    Args:
        rng: source of all randomness (same state -> same volume).
        hemorrhage: add a hyperdense hemorrhage (intraparenchymal blob(s) and/or extra-axial crescent).
        edema: add a hypodense, soft-edged edema region.
        spacing_mm: voxel size (mm) along the array axes; ``None`` draws a clinical spacing. The default
            1 mm grid in RAS order is what `headct.preprocess` expects, so it skips its resample.
        lps: store the array in LPS order (first axis toward patient Left, second Posterior), as DICOM
            series usually are; the affine describes the same physical head either way.
        circular_fov: blank the corners outside the reconstruction circle to -3024 HU; ``None`` = random.
        atlas_path: atlas NIfTI; default `demo.atlas.ensure_atlas()`.
        lesion_masks: also return each finding's voxel fractions in ``info.lesion_masks`` (costs a
            small resample per lesion; does not change the volume or the random streams).

    Returns:
        ``(volume, info)``: float32 HU `Volume` and a `SyntheticHeadInfo`.
    """
    can = canonical_head(atlas_path)
    geo, hem_rng, ede_rng, noise_rng = rng.spawn(4)
    if spacing_mm is None:
        spacing = random_clinical_spacing(geo)
    else:
        sx, sy, sz = spacing_mm
        spacing = (float(sx), float(sy), float(sz))
    if circular_fov is None:
        circular_fov = bool(geo.random() < 0.5)
    info = SyntheticHeadInfo(hemorrhage=hemorrhage, edema=edema, spacing_mm=spacing, shape=(0, 0, 0), lps=lps)
    pose = _random_pose(can, geo, info)
    pieces: dict[str, list[_Piece]] = {}
    hu_can = _compose_head(
        can, geo, hem_rng, ede_rng, hemorrhage=hemorrhage, edema=edema, info=info, pieces=pieces
    )
    frame = _ScannerFrame.draw(can, pose, geo, spacing)
    info.params.update(
        fov_mm=round(frame.fov, 1), coverage_mm=round(frame.coverage, 1), circular_fov=circular_fov
    )

    # canonical voxel <- output voxel
    m = np.linalg.inv(can.affine) @ np.linalg.inv(pose) @ frame.affine
    hu = _sample_posed_head(can, hu_can, m, frame.shape)
    gx, gy = frame.plane_grid()
    _paint_scanner_objects(hu, frame, gx, gy)
    _add_intensity_effects(hu, frame, gx, gy, geo, noise_rng, info)
    if circular_fov:
        outside = ((gx - (frame.x0 + frame.fov / 2)) ** 2 + (gy - (frame.y0 + frame.fov / 2)) ** 2) > (
            frame.fov / 2
        ) ** 2
        hu[outside] = OUTSIDE_FOV_HU

    hu = hu.astype(np.float32)
    if lesion_masks:
        info.lesion_masks = {name: _warp_pieces(p, m, frame.shape) for name, p in pieces.items()}
    affine = frame.affine
    if lps:
        hu, affine = _stored_lps(hu, affine, info)
    info.shape = frame.shape
    return Volume(hu=hu, affine=affine), info


def _random_pose(can: CanonicalHead, geo: np.random.Generator, info: SyntheticHeadInfo) -> np.ndarray:
    """Canonical -> world (4 x 4): scale and rotate about the head centre, then translate."""
    scale = geo.uniform(0.92, 1.08) * geo.uniform(0.98, 1.02, size=3)
    rot = _rotation(
        math.radians(geo.uniform(-12, 12)), math.radians(geo.uniform(-6, 6)), math.radians(geo.uniform(-8, 8))
    )
    lin = rot @ np.diag(scale)
    c = can.center_world
    shift = geo.uniform(-12, 12, size=3)
    pose = np.eye(4)
    pose[:3, :3] = lin
    pose[:3, 3] = c + shift - lin @ c
    info.params.update(scale=np.round(scale, 4).tolist(), shift_mm=np.round(shift, 2).tolist())
    return pose


@dataclass(frozen=True)
class _ScannerFrame:
    """The output grid of one case and the scanner-fixed objects in it (world mm, RAS)."""

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    affine: np.ndarray  # output voxel -> world
    fov: float  # in-plane field of view
    coverage: float  # z coverage
    x0: float  # world x, y of the field of view's corner
    y0: float
    x_mid: float  # head midline
    y_back: float  # back of the head (posterior = -y)
    y_front: float
    holder_axis_y: float  # the curved head holder under the occiput: a cylinder shell about this axis
    holder_r: float
    holder_t: float
    holder_hu: float
    table_top: float  # the carbon-fibre table below it
    table_t: float
    skin_hu: float

    @classmethod
    def draw(
        cls,
        can: CanonicalHead,
        pose: np.ndarray,
        geo: np.random.Generator,
        spacing: tuple[float, float, float],
    ) -> _ScannerFrame:
        """Head holder and table under the occiput, and a field of view around the posed head."""
        scalp_pts = (pose[:3, :3] @ can.surface_points.T).T + pose[:3, 3]  # ~ outer scalp (slightly generous)
        y_back = float(scalp_pts[:, 1].min())
        x_mid = float(np.median(scalp_pts[:, 0]))
        holder_gap = geo.uniform(0.0, 4.0)
        holder_r = geo.uniform(85.0, 105.0)
        holder_t = geo.uniform(5.0, 9.0)
        holder_axis_y = y_back - holder_gap + holder_r
        table_top = y_back - holder_gap - holder_t - geo.uniform(2.0, 25.0)
        table_t = geo.uniform(10.0, 20.0)
        holder_hu, skin_hu = geo.uniform(*HOLDER_HU), geo.uniform(*TABLE_SKIN_HU)

        fov = geo.uniform(225.0, 265.0)
        y_front = float(scalp_pts[:, 1].max())
        # Put the head's front inside the field of view; whatever remains shows holder and table.
        y0 = y_front + geo.uniform(3.0, 15.0) - fov
        x0 = x_mid + geo.uniform(-10.0, 10.0) - fov / 2.0
        z_top = float(scalp_pts[:, 2].max()) + geo.uniform(3.0, 15.0)
        coverage = geo.uniform(145.0, 180.0)
        n_xy = max(8, round(fov / spacing[0]))
        n_y = max(8, round(fov / spacing[1]))
        n_z = max(4, round(coverage / spacing[2]))
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = (x0, y0, z_top - (n_z - 1) * spacing[2])
        return cls(
            spacing, (n_xy, n_y, n_z), affine, fov, coverage, x0, y0, x_mid, y_back, y_front,
            holder_axis_y, holder_r, holder_t, holder_hu, table_top, table_t, skin_hu,
        )  # fmt: skip

    def plane_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """World x and y of every in-plane voxel, (shape[0], shape[1]) each."""
        xs = self.affine[0, 3] + self.spacing[0] * np.arange(self.shape[0])
        ys = self.affine[1, 3] + self.spacing[1] * np.arange(self.shape[1])
        x, y = np.meshgrid(xs, ys, indexing="ij")
        return x, y


def _sample_posed_head(
    can: CanonicalHead, hu_can: np.ndarray, m: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:
    """`hu_can` sampled on the output grid (linear interpolation; air outside the canonical box);
    `m` maps output voxels to canonical ones."""
    # Only the part of the output that the posed head can reach is interpolated; the rest is air.
    lo, hi = can.nonair_box
    corners = np.array(
        np.meshgrid(*[(a - 1.0, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    ).reshape(3, -1)
    out_corners = np.linalg.solve(m[:3, :3], corners - m[:3, 3:4])
    o_lo = np.clip(np.floor(out_corners.min(1)).astype(int), 0, shape)
    o_hi = np.clip(np.ceil(out_corners.max(1)).astype(int) + 1, 0, shape)
    hu = np.full(shape, AIR_HU, np.float32)
    if np.all(o_hi > o_lo):
        box = tuple(slice(int(a), int(b)) for a, b in zip(o_lo, o_hi, strict=True))
        hu[box] = ndi.affine_transform(
            hu_can,
            m[:3, :3],
            offset=m[:3, 3] + m[:3, :3] @ o_lo,
            output_shape=tuple(int(b - a) for a, b in zip(o_lo, o_hi, strict=True)),
            order=1,
            mode="constant",
            cval=AIR_HU,
            prefilter=False,
        )
    return hu


def _paint_scanner_objects(hu: np.ndarray, frame: _ScannerFrame, gx: np.ndarray, gy: np.ndarray) -> None:
    """Head holder and table, computed on the in-plane grid and broadcast along z."""
    r = np.hypot(gx - frame.x_mid, gy - frame.holder_axis_y)
    holder = (
        (r >= frame.holder_r)
        & (r <= frame.holder_r + frame.holder_t)
        & (gy <= frame.holder_axis_y - 0.55 * frame.holder_r)
    )
    table_top, table_t = frame.table_top, frame.table_t
    table_skin = ((gy <= table_top) & (gy > table_top - 2.0)) | (
        (gy <= table_top - table_t + 2.0) & (gy > table_top - table_t)
    )
    table_core = (gy <= table_top - 2.0) & (gy > table_top - table_t + 2.0)
    plane = np.full(frame.shape[:2], np.nan, np.float32)
    plane[table_core] = -850.0
    plane[table_skin] = frame.skin_hu
    plane[holder] = frame.holder_hu
    fixed = ~np.isnan(plane)
    hu[fixed] = plane[fixed][:, None]


def _add_intensity_effects(
    hu: np.ndarray,
    frame: _ScannerFrame,
    gx: np.ndarray,
    gy: np.ndarray,
    geo: np.random.Generator,
    noise_rng: np.random.Generator,
    info: SyntheticHeadInfo,
) -> None:
    """Cupping (beam-hardening-like) on tissue, a global offset and Gaussian noise, in place."""
    spacing = frame.spacing
    cup = geo.uniform(0.0, 6.0)
    center_xy = np.array([frame.x_mid, (frame.y_back + frame.y_front) / 2.0])
    rr = ((gx - center_xy[0]) ** 2 + (gy - center_xy[1]) ** 2) / (90.0**2)
    tissue = hu > -500.0
    hu += np.where(
        tissue, np.float32(cup) * np.minimum(rr, 1.5).astype(np.float32)[:, :, None], np.float32(0)
    )
    offset = geo.uniform(-4.0, 4.0)
    sigma = geo.uniform(2.0, 7.0) * math.sqrt(1.0 / max(spacing[0] * spacing[1] * spacing[2], 0.2))
    hu += np.float32(offset)
    hu += noise_rng.standard_normal(frame.shape, dtype=np.float32) * np.float32(sigma)
    info.params.update(cupping_hu=round(cup, 2), offset_hu=round(offset, 2), noise_sd_hu=round(sigma, 2))


def _stored_lps(hu: np.ndarray, affine: np.ndarray, info: SyntheticHeadInfo) -> tuple[np.ndarray, np.ndarray]:
    """The same physical head with array axes 0/1 reversed (index i along axis 0 now runs toward Left);
    `info.lesion_masks` follow."""
    shape = hu.shape
    hu = np.ascontiguousarray(hu[::-1, ::-1, :])
    info.lesion_masks = {k: np.ascontiguousarray(v[::-1, ::-1, :]) for k, v in info.lesion_masks.items()}
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = shape[0] - 1
    flip[1, 3] = shape[1] - 1
    return hu, affine @ flip


def make_head(
    rng: np.random.Generator,
    *,
    hemorrhage: bool,
    edema: bool,
    spacing_mm: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    lps: bool = False,
) -> Volume:
    """One seeded synthetic head CT `Volume` (float32 HU); see `make_head_with_info`."""
    volume, _ = make_head_with_info(rng, hemorrhage=hemorrhage, edema=edema, spacing_mm=spacing_mm, lps=lps)
    return volume


def to_nifti(volume: Volume) -> nib.Nifti1Image:
    """NIfTI-1 image of `volume` (float32 HU, sform/qform = affine), as the gateway tests upload it."""
    return volume.to_nifti()
