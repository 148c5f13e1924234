"""The DICOMweb client of the studies route (api/dicomweb/client.py) with a fake PACS: what
`dicomweb-client` / requests raise becomes the catalogue's problem, the series chosen, the retrieved zip,
its limits, the deadline and the store. The real Orthanc: tests/integration/test_pacs_roundtrip.py."""

from __future__ import annotations

import asyncio
import copy
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydantic import SecretStr
from pydicom.errors import InvalidDicomError

from api.dicomweb import DicomwebConfig, PacsClient, problem_for
from api.dicomweb.client import connect
from api.problem_codes import ProblemCode
from api.problems import ProblemError
from api.settings import Settings
from demo.dicom_writer import ct_series, phantom_head

STUDY = "1.2.826.0.1.3680043.8.498.1"
CONFIG = DicomwebConfig(url="http://pacs.invalid/dicom-web", timeout_s=5.0)


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (requests.ReadTimeout("slow"), "pacs_timeout"),
        (requests.ConnectTimeout("slow"), "pacs_timeout"),  # also a ConnectionError: the timeout wins
        (requests.ConnectionError("refused"), "pacs_unreachable"),
        (requests.exceptions.SSLError("bad certificate"), "pacs_unreachable"),
        (_http_error(401), "pacs_auth_failed"),
        (_http_error(403), "pacs_auth_failed"),
        (_http_error(404), "pacs_error"),
        (_http_error(500), "pacs_error"),
        (_http_error(503), "pacs_error"),
        (requests.exceptions.ChunkedEncodingError("cut"), "pacs_error"),
        (InvalidDicomError("not DICOM"), "pacs_error"),
        (ValueError("bad JSON"), "pacs_error"),
    ],
)
def test_errors_become_catalogue_problems(error: Exception, code: str) -> None:
    problem = problem_for(error)
    assert problem.code == code and problem.status == ProblemCode.from_code(code).http_status


def test_404_while_reading_the_study_is_study_not_found() -> None:
    problem = problem_for(_http_error(404), not_found=ProblemCode.STUDY_NOT_FOUND)
    assert (problem.status, problem.code) == (404, "study_not_found")
    passed = ProblemError(ProblemCode.PAYLOAD_TOO_LARGE, "big")
    assert problem_for(passed) is passed


def test_config_from_settings() -> None:
    with pytest.raises(ProblemError) as raised:
        DicomwebConfig.from_settings(Settings())
    assert (raised.value.status, raised.value.code) == (503, "pacs_not_configured")
    settings = Settings(
        dicomweb_url="http://pacs:8042/dicom-web/",
        dicomweb_username="gateway",
        dicomweb_password="s3cret",  # type: ignore[arg-type]  (pydantic turns it into a SecretStr)
        dicomweb_timeout_s=7,
    )
    config = DicomwebConfig.from_settings(settings)
    assert (config.url, config.username, config.password, config.timeout_s) == (
        "http://pacs:8042/dicom-web",
        "gateway",
        "s3cret",
        7,
    )
    assert "s3cret" not in repr(config) and "s3cret" not in repr(settings)


def test_credentials_from_a_mounted_secret(tmp_path: Path) -> None:
    (tmp_path / "username").write_text("gateway\n")
    (tmp_path / "password").write_text("from-file\n")
    (tmp_path / "token").write_text("")  # empty: not set
    settings = Settings(dicomweb_url="http://pacs/dicom-web", dicomweb_credentials_dir=str(tmp_path))
    config = DicomwebConfig.from_settings(settings)
    assert (config.username, config.password, config.token) == ("gateway", "from-file", None)
    override = settings.model_copy(update={"dicomweb_token": SecretStr("t0k")})
    assert DicomwebConfig.from_settings(override).token == "t0k"  # the variables win


def test_connect_sets_credentials_timeouts_and_no_retries() -> None:
    basic: Any = connect(DicomwebConfig(url="http://pacs/dicom-web", username="u", password="p", timeout_s=3))
    assert basic._session.auth == ("u", "p") and basic._timeout == (3, 3) and basic._max_attempts == 1
    bearer: Any = connect(DicomwebConfig(url="http://pacs/dicom-web", token="t0k", timeout_s=3))
    assert bearer._session.headers["Authorization"] == "Bearer t0k" and bearer._session.auth is None


# --- a fake PACS ----------------------------------------------------------------------------------------


def _series(seed: str, modality: str = "CT") -> list[pydicom.Dataset]:
    volume = phantom_head(shape=(32, 32, 6), spacing_mm=(7.0, 7.0, 10.0))
    datasets = ct_series(volume.with_hu(np.rint(volume.hu)), seed=seed)
    for dataset in datasets:
        dataset.StudyInstanceUID = STUDY
        dataset.Modality = modality
    return datasets


class FakePacs:
    def __init__(self, series: dict[str, list[pydicom.Dataset]], *, delay_s: float = 0.0) -> None:
        self.series = series
        self.delay_s = delay_s
        self.retrieved: list[str] = []
        self.stored: list[pydicom.Dataset] = []
        self.store_answer = pydicom.Dataset()

    def search_for_series(
        self, study_instance_uid: str | None = None, *, fields: Sequence[str] | None = None
    ) -> list[dict[str, dict[str, Any]]]:
        time.sleep(self.delay_s)
        return [
            {"0020000E": {"vr": "UI", "Value": [uid]}, "00080060": {"vr": "CS", "Value": [items[0].Modality]}}
            for uid, items in self.series.items()
        ]

    def iter_series(
        self, study_instance_uid: str, series_instance_uid: str, media_types: Any = None
    ) -> Iterator[pydicom.Dataset]:
        self.retrieved.append(series_instance_uid)
        for dataset in self.series[series_instance_uid]:
            yield copy.deepcopy(dataset)

    def store_instances(
        self, datasets: Sequence[pydicom.Dataset], study_instance_uid: str | None = None
    ) -> pydicom.Dataset:
        self.stored.extend(datasets)
        return self.store_answer


def _client(pacs: FakePacs, timeout_s: float = 5.0) -> PacsClient:
    return PacsClient(DicomwebConfig(url=CONFIG.url, timeout_s=timeout_s), connector=lambda config: pacs)


def _fetch(client: PacsClient, tmp_path: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"directory": str(tmp_path), "max_bytes": 1 << 30, "max_instances": 1000}
    return asyncio.run(client.fetch_study(STUDY, **(options | kwargs)))


def test_retrieves_the_ct_series_into_a_zip(tmp_path: Path) -> None:
    ct, other_ct, mr = _series("a"), _series("b"), _series("c", modality="MR")
    pacs = FakePacs({str(s[0].SeriesInstanceUID): s for s in (ct, other_ct, mr)})
    retrieved = _fetch(_client(pacs), tmp_path)
    assert pacs.retrieved == [str(ct[0].SeriesInstanceUID), str(other_ct[0].SeriesInstanceUID)]
    assert (retrieved.instances, retrieved.series) == (12, 2)
    with zipfile.ZipFile(retrieved.path) as archive:
        names = archive.namelist()
        first = archive.read(names[0])
    assert len(names) == 12 and first[128:132] == b"DICM"  # Part 10 files, what the ingest reads


def test_series_uid_picks_one_series(tmp_path: Path) -> None:
    ct, mr = _series("a"), _series("c", modality="MR")
    pacs = FakePacs({str(s[0].SeriesInstanceUID): s for s in (ct, mr)})
    retrieved = _fetch(_client(pacs), tmp_path, series_uid=str(mr[0].SeriesInstanceUID))
    assert pacs.retrieved == [str(mr[0].SeriesInstanceUID)] and retrieved.instances == 6
    with pytest.raises(ProblemError) as raised:
        _fetch(_client(pacs), tmp_path, series_uid="1.2.3")
    assert (raised.value.status, raised.value.code, raised.value.field) == (
        422,
        "series_not_found",
        "series_uid",
    )


def test_no_ct_series_retrieves_them_all(tmp_path: Path) -> None:
    mr = _series("c", modality="MR")
    pacs = FakePacs({str(mr[0].SeriesInstanceUID): mr})
    assert _fetch(_client(pacs), tmp_path).instances == 6  # the ingest answers not_ct


def test_an_empty_study_is_study_not_found(tmp_path: Path) -> None:
    with pytest.raises(ProblemError) as raised:
        _fetch(_client(FakePacs({})), tmp_path)
    assert (raised.value.status, raised.value.code) == (404, "study_not_found")


@pytest.mark.parametrize("limit", ["max_instances", "max_bytes"])
def test_limits_refuse_a_large_study_and_leave_no_file(tmp_path: Path, limit: str) -> None:
    ct = _series("a")
    pacs = FakePacs({str(ct[0].SeriesInstanceUID): ct})
    with pytest.raises(ProblemError) as raised:
        _fetch(_client(pacs), tmp_path, **{limit: 5 if limit == "max_instances" else 10_000})
    assert (raised.value.status, raised.value.code) == (413, "payload_too_large")
    assert list(tmp_path.iterdir()) == []


def test_a_slow_pacs_is_pacs_timeout_at_the_deadline(tmp_path: Path) -> None:
    ct = _series("a")
    pacs = FakePacs({str(ct[0].SeriesInstanceUID): ct}, delay_s=1.5)
    client = _client(pacs, timeout_s=0.3)

    async def fetch() -> float:
        started = time.perf_counter()
        with pytest.raises(ProblemError) as raised:
            await client.fetch_study(STUDY, directory=str(tmp_path), max_bytes=1 << 30, max_instances=1000)
        assert (raised.value.status, raised.value.code) == (504, "pacs_timeout")
        return time.perf_counter() - started

    assert asyncio.run(fetch()) < 1.0  # (asyncio.run itself then waits for the thread)
    assert list(tmp_path.iterdir()) == []  # the thread, once back, stopped and removed its zip


def test_store_answers_what_was_stored_and_refusals_are_pacs_error() -> None:
    sr = _series("a")[0]
    assert getattr(sr, "preamble", None) is None
    pacs = FakePacs({})
    stored = asyncio.run(_client(pacs).store(STUDY, sr))
    assert (stored.sop_class_uid, stored.sop_instance_uid, stored.series_instance_uid) == (
        str(sr.SOPClassUID),
        str(sr.SOPInstanceUID),
        str(sr.SeriesInstanceUID),
    )
    assert pacs.stored == [sr] and sr.preamble == b"\0" * 128  # written as a Part 10 file
    failure = pydicom.Dataset()
    failure.FailureReason = 0xA700
    pacs.store_answer.FailedSOPSequence = [failure]
    with pytest.raises(ProblemError) as raised:
        asyncio.run(_client(pacs).store(STUDY, sr))
    assert (raised.value.status, raised.value.code) == (502, "pacs_error")
