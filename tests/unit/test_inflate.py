"""Reading each DICOM member once: zip members inflated whole by ISA-L with zipfile's guarantees
(declared size, end of stream, CRC), and the header pass's datasets reused by the pixel pass."""

from __future__ import annotations

import copy
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from api.ingest import IngestLimits, decode_upload, dicom
from api.ingest.inflate import read_member
from api.ingest.members import ZipSource
from api.problems import ProblemError
from demo.dicom_writer import ct_series, enhanced_ct, phantom_head, to_bytes, zip_bytes
from headct.volume import Volume


def _archive() -> tuple[zipfile.ZipFile, io.BytesIO, list[bytes]]:
    payloads = [os.urandom(64) * 400, b"", b"x" * 70_000, os.urandom(3000), b"lzma " * 900]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, payload in enumerate(payloads):
            method = (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)[index % 3]
            if index == 4:
                method = zipfile.ZIP_LZMA  # not inflated by ISA-L: zipfile reads it
            archive.writestr(f"m{index}", payload, compress_type=method)
    buffer.seek(0)
    return zipfile.ZipFile(buffer), buffer, payloads


def test_members_read_whole_equal_zipfiles_reading() -> None:
    archive, handle, payloads = _archive()
    assert [read_member(archive, handle, info) for info in archive.infolist()] == payloads


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"CRC": 1}, "CRC-32"),
        ({"file_size": -10}, "more than its declared size"),  # a member that inflates to more: refused
        ({"file_size": +10}, "differs from the size"),
        ({"compress_size": -20}, "truncated"),
    ],
)
def test_a_member_that_lies_about_itself_is_refused(change: dict[str, int], reason: str) -> None:
    archive, handle, _ = _archive()
    info = copy.copy(archive.infolist()[0])
    for field, delta in change.items():
        setattr(info, field, getattr(info, field) ^ delta if field == "CRC" else getattr(info, field) + delta)
    with pytest.raises(ProblemError) as raised:
        read_member(archive, handle, info)
    assert raised.value.code == "unreadable_file" and reason in raised.value.detail


def test_a_member_without_its_local_header_is_refused() -> None:
    archive, handle, _ = _archive()
    info = copy.copy(archive.infolist()[2])
    info.header_offset += 3
    with pytest.raises(ProblemError) as raised:
        read_member(archive, handle, info)
    assert "local header" in raised.value.detail


@pytest.fixture(scope="module")
def head() -> Volume:
    volume = phantom_head()
    return volume.with_hu(np.rint(volume.hu))


class _CountingZip(ZipSource):
    """Counts how often each member's bytes are read (whole or streamed)."""

    reads: dict[int, int]

    def read(self, index: int) -> bytes:
        self.reads[index] = self.reads.get(index, 0) + 1
        return super().read(index)

    def open(self, index: int):  # type: ignore[no-untyped-def]
        self.reads[index] = self.reads.get(index, 0) + 1
        return super().open(index)


@pytest.mark.parametrize("transfer_syntax", ["explicit", "deflated", "rle"])
def test_each_member_is_read_once_and_the_volume_is_unchanged(
    tmp_path: Path, head: Volume, transfer_syntax: str
) -> None:
    path = tmp_path / "series.zip"
    path.write_bytes(zip_bytes(ct_series(head, transfer_syntax=transfer_syntax)))
    volumes = []
    for budget in (dicom.PARSED_MEMBERS_BUDGET_BYTES, 0):  # 0: the pixel pass reads every member again
        with _CountingZip(path, IngestLimits()) as source:
            source.reads = {}
            parsed = dicom.ParsedMembers(budget)
            headers, _ = dicom.read_headers(source, parsed)
            geometry = dicom.series_geometry(headers)
            volumes.append(dicom.assemble(source, headers, geometry, IngestLimits(), tmp_path, parsed)[0])
            assert set(source.reads.values()) == ({1} if budget else {2}), source.reads
    np.testing.assert_array_equal(volumes[0].hu, volumes[1].hu)
    np.testing.assert_array_equal(volumes[0].affine, volumes[1].affine)


def test_a_multiframe_object_decodes_the_same_from_the_kept_dataset(tmp_path: Path, head: Volume) -> None:
    path = tmp_path / "enhanced.dcm"
    path.write_bytes(to_bytes(enhanced_ct(head)))
    scan = decode_upload(path, "application/dicom")
    np.testing.assert_array_equal(np.sort(scan.volume.hu, axis=None), np.sort(head.hu, axis=None))
