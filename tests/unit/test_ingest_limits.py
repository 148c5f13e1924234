"""Upload limits as settings (HEADCT_MAX_*) -> IngestLimits, the zip compression-ratio bound, and zip
entry names never used as file system paths."""

from __future__ import annotations

import uuid
import zipfile
from pathlib import Path

import pytest

from api.ingest import IngestLimits, decode_upload
from api.problems import ProblemError
from api.settings import Settings, ingest_limits
from demo.dicom_writer import ct_series, phantom_head, to_bytes


def test_settings_become_ingest_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADCT_MAX_ARCHIVE_MEMBERS", "12")
    monkeypatch.setenv("HEADCT_MAX_UNCOMPRESSED_BYTES", "1000")
    monkeypatch.setenv("HEADCT_MAX_MEMBER_BYTES", "100")
    monkeypatch.setenv("HEADCT_MAX_COMPRESSION_RATIO", "20")
    monkeypatch.setenv("HEADCT_MAX_VOXELS", "4096")
    assert ingest_limits(Settings()) == IngestLimits(
        max_members=12,
        max_uncompressed_bytes=1000,
        max_member_bytes=100,
        max_compression_ratio=20.0,
        max_voxels=4096,
    )


def test_defaults_match_ingest_defaults() -> None:
    for name in ("HEADCT_MAX_ARCHIVE_MEMBERS", "HEADCT_MAX_VOXELS"):
        assert name.removeprefix("HEADCT_").lower() in Settings.model_fields
    assert ingest_limits(Settings.model_construct()) == IngestLimits()


def _write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def test_zip_bomb_ratio_is_refused_before_inflating(tmp_path: Path) -> None:
    bomb = _write_zip(tmp_path / "bomb.zip", {"a.dcm": b"\0" * (8 << 20)})  # deflates ~1000x
    with pytest.raises(ProblemError) as refused:
        decode_upload(bomb, "application/zip", limits=IngestLimits(max_compression_ratio=100.0))
    problem = refused.value
    assert problem.status == 413 and problem.code == "payload_too_large"
    assert problem.field == "compression_ratio" and problem.observed > 100


def test_a_real_series_passes_the_default_ratio(tmp_path: Path) -> None:
    series = ct_series(phantom_head())
    upload = _write_zip(tmp_path / "series.zip", {f"{n}.dcm": to_bytes(ds) for n, ds in enumerate(series)})
    scan = decode_upload(upload, "application/zip", limits=IngestLimits())
    assert scan.source_format == "dicom"


def test_member_and_count_limits_from_settings(tmp_path: Path) -> None:
    series = ct_series(phantom_head())
    upload = _write_zip(tmp_path / "series.zip", {f"{n}.dcm": to_bytes(ds) for n, ds in enumerate(series)})
    limits = ingest_limits(Settings(max_archive_members=5))
    with pytest.raises(ProblemError) as refused:
        decode_upload(upload, "application/zip", limits=limits)
    assert refused.value.field == "zip_entries"


def test_entry_names_are_never_used_as_paths(tmp_path: Path) -> None:
    """Entries named like path traversals decode fine and nothing is written where they point."""
    spool = tmp_path / "spool" / "deep"
    spool.mkdir(parents=True)
    marker = uuid.uuid4().hex
    series = ct_series(phantom_head())
    names = [
        f"../../escape-{marker}-{n}.dcm" if n % 2 else f"/tmp/abs-{marker}-{n}.dcm"
        for n in range(len(series))
    ]
    upload = _write_zip(
        spool / "upload.zip", {name: to_bytes(ds) for name, ds in zip(names, series, strict=True)}
    )
    scan = decode_upload(upload, "application/zip")
    assert scan.dicom is not None and scan.dicom.instances == len(series)
    # Where an extracting reader would have put them: relative to the spool or the working directory.
    places = [*tmp_path.rglob(f"*{marker}*"), *Path("/tmp").glob(f"abs-{marker}*")]
    places += [*Path.cwd().parent.parent.glob(f"escape-{marker}*")]
    assert places == []
