"""Security properties of the running gateway (issue 5, item 5), over real HTTP and gRPC:

* patient identifiers (sentinels in PatientName / PatientID / AccessionNumber / StudyInstanceUID of
  valid and invalid DICOM uploads) appear in no response, no /metrics sample, no gateway log line
  and no Triton log line;
* error bodies never echo the upload's content (parser messages quoting it) nor a stack trace;
* an upload never writes outside the spool directory, whatever its entry names or filenames say.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import nibabel as nib
import numpy as np
import pytest

from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from demo.dicom_writer import multipart_body, to_bytes
from headct.local.triton import LocalTriton
from tests.hostile.conftest import REQUEST_TIMEOUT_S
from tests.hostile.corpus import TRAVERSAL_NAMES, cases, sentinel_series, zip_of
from tests.stack import LocalGateway

pytestmark = pytest.mark.integration

#: Values no real header holds; the tokens are what must never show up anywhere (case-insensitive).
SENTINELS = {
    "PatientName": "QXSENTINEL^ZORBLAX",
    "PatientID": "PIDSENTINEL7731",
    "AccessionNumber": "ACCSENTINEL5521",
    "StudyInstanceUID": "2.25.271828182845904523536028747135",
}
TOKENS = ("QXSENTINEL", "ZORBLAX", "PIDSENTINEL7731", "ACCSENTINEL5521", "271828182845904523536028747135")
ECHO = "ECHOMARKER"


def _leaks(text: str, tokens: tuple[str, ...] = TOKENS) -> list[str]:
    upper = text.upper()
    return [token for token in tokens if token.upper() in upper]


def _response_text(response: httpx.Response) -> str:
    return response.text + "\n" + "\n".join(f"{key}: {value}" for key, value in response.headers.items())


def _sentinel_uploads() -> Iterator[tuple[str, bytes, str, int]]:
    """(name, body, content type, expected status) of valid and invalid uploads carrying sentinels."""
    valid = sentinel_series(SENTINELS)
    yield "valid_zip", zip_of(valid), "application/zip", 200
    parts = [to_bytes(ds) for ds in valid]
    body, content_type = multipart_body(parts)
    # filenames as a PACS export names them: after the patient
    for n in range(len(parts)):
        body = body.replace(
            f'filename="slice{n:05d}.dcm"'.encode(), f'filename="QXSENTINEL_ZORBLAX_{n}.dcm"'.encode()
        )
    yield "valid_multipart_named_after_patient", body, content_type, 200
    mr = sentinel_series(SENTINELS)
    for ds in mr:
        ds.Modality = "MR"
    yield "not_ct", zip_of(mr), "application/zip", 422
    gap = sentinel_series(SENTINELS)
    del gap[9]
    yield "missing_slice", zip_of(gap), "application/zip", 422
    # descriptions a technologist typed the patient's name into: echoed in ambiguous_series' candidates
    twins = []
    for seed in ("sec-a", "sec-b"):
        for ds in sentinel_series(SENTINELS, seed=seed):
            ds.SeriesDescription = "HEAD QXSENTINEL ZORBLAX"
            ds.StudyDescription = "CT HEAD PIDSENTINEL7731"
            twins.append(ds)
    yield "ambiguous_series_with_names_in_descriptions", zip_of(twins), "application/zip", 422
    no_pixels = sentinel_series(SENTINELS)
    for ds in no_pixels:
        del ds.PixelData
    yield "no_pixel_data", zip_of(no_pixels), "application/zip", 400
    lying = sentinel_series(SENTINELS)
    for ds in lying:
        ds.Rows = 300
    yield "lying_rows", zip_of(lying), "application/zip", 400
    mixed = sentinel_series(SENTINELS)
    for ds in mixed[::2]:
        ds.StudyInstanceUID = "2.25.1"
    yield "mixed_studies", zip_of(mixed), "application/zip", 422
    truncated = zip_of(sentinel_series(SENTINELS))
    yield "truncated_zip", truncated[: len(truncated) // 2], "application/zip", 400
    yield "single_instance", to_bytes(sentinel_series(SENTINELS)[4]), "application/dicom", 422
    air = sentinel_series(SENTINELS, overrides=(("RescaleIntercept", "-3000"),))
    yield "hu_out_of_range", zip_of(air), "application/zip", 422


def test_patient_identifiers_never_leave_the_upload(
    hostile_client: httpx.Client, hostile_gateway: LocalGateway, triton: LocalTriton
) -> None:
    # the check can fail: the sentinels really are in the headers we send
    assert all(str(sentinel_series(SENTINELS)[0].get(k)) == v for k, v in SENTINELS.items())
    seen: list[str] = []
    for name, body, content_type, status in _sentinel_uploads():
        response = hostile_client.post("/v1/predict", content=body, headers={"Content-Type": content_type})
        assert response.status_code == status, (name, response.text[:400])
        assert not _leaks(_response_text(response)), (name, _leaks(_response_text(response)), response.text)
        seen.append(name)
        if name == "ambiguous_series_with_names_in_descriptions":
            candidates = response.json()["observed"]
            assert candidates and all(c["description"] == "[redacted]" for c in candidates), candidates
    # the same over gRPC (valid and invalid)
    with grpc.insecure_channel(f"127.0.0.1:{hostile_gateway.grpc_port}") as channel:
        stub = headct_pb2_grpc.HeadCTStub(channel)
        options = headct_pb2.PredictOptions(content_type="application/zip")
        answer = stub.Predict(
            headct_pb2.PredictRequest(options=options, scan=zip_of(sentinel_series(SENTINELS))),
            timeout=REQUEST_TIMEOUT_S,
        )
        assert not _leaks(str(answer))
        mr = sentinel_series(SENTINELS)
        for ds in mr:
            ds.Modality = "MR"
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(
                headct_pb2.PredictRequest(options=options, scan=zip_of(mr)), timeout=REQUEST_TIMEOUT_S
            )
        error_text = f"{raised.value.details()} {raised.value.trailing_metadata()}"
        assert not _leaks(error_text), error_text
    metrics = hostile_client.get("/metrics")
    assert metrics.status_code == 200
    assert not _leaks(metrics.text), _leaks(metrics.text)
    gateway_log = hostile_gateway.log_text()
    assert gateway_log, "the gateway log is empty: the leak check would prove nothing"
    leaked = [line for line in gateway_log.splitlines() if _leaks(line)]
    assert not leaked, leaked[:5]
    triton_log = triton.log_path.read_text(errors="replace") if triton.log_path else ""
    leaked = [line for line in triton_log.splitlines() if _leaks(line)]
    assert not leaked, leaked[:5]
    assert len(seen) == 11


def _echo_uploads() -> Iterator[tuple[str, bytes, str]]:
    """Unreadable uploads whose bytes contain `ECHO` where parsers look (and quote) first."""
    yield "raw", (ECHO + "\n").encode() * 50, "application/octet-stream"
    for field in (
        "sizes: ECHOMARKER 2 2",
        "space: ECHOMARKER",
        "space directions: (ECHOMARKER,0,0) (0,1,0) (0,0,1)",
    ):
        header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\nspace: RAS\n"
        header += "space directions: (1,0,0) (0,1,0) (0,0,1)\n"
        key = field.split(":")[0]
        lines = [line for line in header.splitlines() if not line.startswith(key + ":")]
        yield (
            f"nrrd_{key}",
            ("\n".join([*lines, field]) + "\n\n").encode() + bytes(16),
            "application/octet-stream",
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{ECHO}/../{ECHO}.dcm", bytes(128) + b"DICM" + ECHO.encode() * 20)
    yield "zip", buffer.getvalue(), "application/zip"
    body = (
        f'--b\r\nContent-Disposition: form-data; name="{ECHO}"; filename="{ECHO}.nii"\r\n'
        f"Content-Type: application/{ECHO}\r\n\r\n{ECHO}\r\n--b--\r\n"
    ).encode()
    yield "multipart", body, "multipart/form-data; boundary=b"
    nifti = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    nifti.header["descrip"] = ECHO.encode()
    yield "nifti_descrip", nifti.to_bytes(), "application/octet-stream"
    gz = gzip.compress(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).to_bytes())
    yield "gzip_truncated", gz[:-30] + ECHO.encode(), "application/gzip"


def test_error_bodies_never_echo_the_upload_nor_a_stack_trace(hostile_client: httpx.Client) -> None:
    for name, body, content_type in _echo_uploads():
        response = hostile_client.post("/v1/predict", content=body, headers={"Content-Type": content_type})
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        text = response.text
        assert not _leaks(text, (ECHO,)), (name, text)
        assert "Traceback" not in text and 'File "' not in text, (name, text)


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under `directory` (relative) -> (size, mtime_ns); the directory itself included."""
    entries = {".": (0, directory.stat().st_mtime_ns)}
    for path in directory.rglob("*"):
        stat = path.lstat()
        entries[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns)
    return entries


def _escapes() -> list[Path]:
    """Files the hostile names of the corpus would have created, had any been used as a path."""
    found: list[Path] = []
    for root in (Path("/tmp"), Path.cwd(), Path("/")):
        for pattern in ("headct-escape*", "headct-absolute*", "headct-mp-escape*", "headct-drive*"):
            found.extend(root.glob(pattern))
    return found


def test_uploads_never_write_outside_the_spool_directory(
    hostile_client: httpx.Client, spool_parent: Path, spool_dir: Path, corpus_dir: Path
) -> None:
    before_parent = _tree(spool_parent)
    before_escapes = _escapes()
    hostile = {
        "zip_traversal_names",
        "zip_absolute_names",
        "zip_backslash_and_drive_names",
        "zip_symlink_entries",
        "multipart_odd_filenames",
        "nrrd_detached_data_file",
        "zip_nested_zips",
    }
    sent = 0
    for case in cases():
        if case.name not in hostile:
            continue
        path, content_type = case.build(corpus_dir)
        response = hostile_client.post(
            "/v1/predict", content=path.read_bytes(), headers={"Content-Type": content_type}
        )
        assert response.status_code == case.status, (case.name, response.text[:300])
        sent += 1
    assert sent == len(hostile)
    # the traversal names are real: a naive extractor would have written these
    assert any(".." in name for name in TRAVERSAL_NAMES) and any(
        name.startswith("/") for name in TRAVERSAL_NAMES
    )
    assert _escapes() == before_escapes
    after_parent = _tree(spool_parent)
    # the spool directory's own mtime changes (files came and went); nothing else may
    before_parent.pop("spool"), after_parent.pop("spool")
    assert after_parent == before_parent
    assert list(spool_dir.iterdir()) == [], "uploads or scratch files left behind in the spool directory"


def test_sentinel_free_text_in_a_valid_series_is_redacted_in_the_response(
    hostile_client: httpx.Client,
) -> None:
    """A valid scan whose series description quotes the patient: the 200 carries no identifier."""
    datasets = sentinel_series(SENTINELS)
    for ds in datasets:
        ds.SeriesDescription = "HEAD ZORBLAX QXSENTINEL"
        ds.ProtocolName = "ACCSENTINEL5521"
    response = hostile_client.post(
        "/v1/predict", content=zip_of(datasets), headers={"Content-Type": "application/zip"}
    )
    assert response.status_code == 200, response.text
    assert not _leaks(_response_text(response))
