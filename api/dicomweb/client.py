"""A small, typed wrapper of `dicomweb-client` for the studies route (api/http/routers/studies.py).

* `PacsClient.fetch_study`: QIDO-RS lists the study's series, WADO-RS retrieves the CT series (or the
  one asked for) instance by instance into a zip on local disk: what `POST /v1/predict` reads.
* `PacsClient.store`: STOW-RS of one dataset (the DICOM SR answer) into the study.

`dicomweb-client` blocks (requests): every call runs in a thread under a deadline
(`HEADCT_DICOMWEB_TIMEOUT_S` per step). On the deadline the request fails with 504 ``pacs_timeout`` at
once; the thread notices at its next instance, or at the requests read timeout (the same value), and
stops. Errors become problems of the catalogue (`problem_for`): 404 ``study_not_found``, 502
``pacs_unreachable`` / ``pacs_auth_failed`` / ``pacs_error``, 504 ``pacs_timeout``.

Nothing here logs a UID or any other identifier; `dicomweb_client`'s own logger (which names the
study at INFO) is kept to errors.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from api.problem_codes import ProblemCode
from api.problems import ProblemError
from api.settings import Settings

logger = logging.getLogger("headct.dicomweb")
# dicomweb-client logs "search for series of study "<uid>"" at INFO, and the URLs at DEBUG.
logging.getLogger("dicomweb_client").setLevel(logging.ERROR)

CT = "CT"
_MODALITY = "00080060"
_SERIES_UID = "0020000E"
#: Any transfer syntax the PACS holds (no transcoding there); the gateway decodes the usual ones.
_ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
_T = TypeVar("_T")


class DicomwebApi(Protocol):
    """What we use of `dicomweb_client.DICOMwebClient` (a fake in the unit tests)."""

    def search_for_series(
        self, study_instance_uid: str | None = ..., *, fields: Sequence[str] | None = ...
    ) -> list[dict[str, dict[str, Any]]]: ...

    def iter_series(
        self, study_instance_uid: str, series_instance_uid: str, media_types: Any = ...
    ) -> Iterator[pydicom.Dataset]: ...

    def store_instances(
        self, datasets: Sequence[pydicom.Dataset], study_instance_uid: str | None = ...
    ) -> pydicom.Dataset: ...


@dataclass(frozen=True)
class DicomwebConfig:
    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DicomwebConfig:
        """The PACS of `settings`; 503 ``pacs_not_configured`` when `HEADCT_DICOMWEB_URL` is unset."""
        if not settings.dicomweb_url:
            raise ProblemError(
                ProblemCode.PACS_NOT_CONFIGURED,
                "this gateway reads no studies from a PACS: HEADCT_DICOMWEB_URL is not set",
            )
        files = _credential_files(settings.dicomweb_credentials_dir)
        password, token = settings.dicomweb_password, settings.dicomweb_token
        return cls(
            url=settings.dicomweb_url.rstrip("/"),
            username=settings.dicomweb_username or files.get("username"),
            password=password.get_secret_value() if password else files.get("password"),
            token=token.get_secret_value() if token else files.get("token"),
            timeout_s=settings.dicomweb_timeout_s,
        )

    def __repr__(self) -> str:  # never the secrets
        return f"DicomwebConfig(url={self.url!r}, timeout_s={self.timeout_s})"


def _credential_files(directory: str | None) -> dict[str, str]:
    """`username`, `password`, `token` from the files of that name in `directory` (a mounted Secret),
    stripped of surrounding whitespace; missing or empty files are left out."""
    found: dict[str, str] = {}
    if directory:
        for name in ("username", "password", "token"):
            path = Path(directory) / name
            if path.is_file() and (value := path.read_text(encoding="utf-8").strip()):
                found[name] = value
    return found


def connect(config: DicomwebConfig) -> DicomwebApi:
    """A `DICOMwebClient` with its own session: credentials, requests timeouts, no retries (the
    deadline is ours)."""
    session = requests.Session()
    if config.token:
        session.headers["Authorization"] = f"Bearer {config.token}"
    elif config.username is not None:
        session.auth = (config.username, config.password or "")
    client = DICOMwebClient(config.url, session=session, timeout=(config.timeout_s, config.timeout_s))
    client.set_http_retry_params(retry=False)
    return client


@dataclass(frozen=True)
class RetrievedStudy:
    """The retrieved instances as a zip on disk (the caller removes it), and what it holds."""

    path: Path
    instances: int
    series: int
    size_bytes: int
    seconds: float


@dataclass(frozen=True)
class StoredObject:
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def problem_for(error: Exception, *, not_found: ProblemCode = ProblemCode.PACS_ERROR) -> ProblemError:
    """The catalogue's problem for what `dicomweb-client` / requests raised. `not_found`: what a 404 of
    the PACS means here (``study_not_found`` while reading the study)."""
    if isinstance(error, ProblemError):
        return error
    if isinstance(error, requests.Timeout):  # ConnectTimeout too (it is also a ConnectionError)
        return ProblemError(ProblemCode.PACS_TIMEOUT, "the PACS did not answer in time")
    if isinstance(error, requests.HTTPError):
        status = error.response.status_code if error.response is not None else 0
        if status == 404:
            detail = "the PACS has no such study" if not_found is ProblemCode.STUDY_NOT_FOUND else ""
            return ProblemError(not_found, detail or "the PACS answered 404", observed=status)
        if status in (401, 403):
            return ProblemError(
                ProblemCode.PACS_AUTH_FAILED,
                f"the PACS refused the gateway's credentials ({status})",
                observed=status,
            )
        return ProblemError(ProblemCode.PACS_ERROR, f"the PACS answered HTTP {status}", observed=status)
    if isinstance(error, requests.ConnectionError):
        return ProblemError(ProblemCode.PACS_UNREACHABLE, "the PACS cannot be reached")
    if isinstance(error, requests.RequestException):
        return ProblemError(ProblemCode.PACS_ERROR, f"talking to the PACS failed: {type(error).__name__}")
    return ProblemError(
        ProblemCode.PACS_ERROR, f"the PACS answered something unreadable: {type(error).__name__}"
    )


def _first(element: Mapping[str, Any] | None) -> str:
    values = (element or {}).get("Value") or [""]
    return str(values[0])


class PacsClient:
    """One configured PACS. `connector` makes the blocking client (a fake in tests)."""

    def __init__(
        self, config: DicomwebConfig, connector: Callable[[DicomwebConfig], DicomwebApi] = connect
    ) -> None:
        self.config = config
        self._connector = connector

    async def _call(self, work: Callable[[threading.Event], _T], *, not_found: ProblemCode) -> _T:
        """`work` in a thread under the deadline; `work` checks the event to stop early."""
        stop = threading.Event()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await asyncio.to_thread(work, stop)
        except TimeoutError:
            raise ProblemError(
                ProblemCode.PACS_TIMEOUT,
                f"the PACS did not answer within {self.config.timeout_s:g} s (HEADCT_DICOMWEB_TIMEOUT_S)",
            ) from None
        except Exception as error:
            raise problem_for(error, not_found=not_found) from None
        finally:
            stop.set()

    async def fetch_study(
        self,
        study_uid: str,
        *,
        series_uid: str | None = None,
        directory: str | None = None,
        max_bytes: int,
        max_instances: int,
    ) -> RetrievedStudy:
        """The study's CT series (all its series when it has none; only `series_uid` when given) as a
        zip of Part 10 files in `directory`. 404 ``study_not_found`` when the PACS has no such study;
        422 ``series_not_found`` when `series_uid` is not in it; 413 beyond `max_bytes` / `max_instances`."""

        def work(stop: threading.Event) -> RetrievedStudy:
            started = time.perf_counter()
            client = self._connector(self.config)
            found = client.search_for_series(study_uid, fields=["Modality"])
            series = [(_first(item.get(_SERIES_UID)), _first(item.get(_MODALITY))) for item in found]
            series = [(uid, modality) for uid, modality in series if uid]
            if not series:
                raise ProblemError(ProblemCode.STUDY_NOT_FOUND, "the PACS has no such study")
            wanted = _choose_series(series, series_uid)
            return _retrieve(client, study_uid, wanted, stop, started, directory, max_bytes, max_instances)

        retrieved = await self._call(work, not_found=ProblemCode.STUDY_NOT_FOUND)
        logger.info(
            "pacs study retrieved",
            extra={
                "instances": retrieved.instances,
                "series": retrieved.series,
                "bytes": retrieved.size_bytes,
                "seconds": round(retrieved.seconds, 3),
            },
        )
        return retrieved

    async def store(self, study_uid: str, dataset: pydicom.Dataset) -> StoredObject:
        """STOW-RS of `dataset` into `study_uid`; 502 ``pacs_error`` when the PACS refuses it."""

        if getattr(dataset, "preamble", None) is None:
            # A Part 10 file, as PS3.18 wants it: pydicom 3 (which dicomweb-client writes with) leaves the
            # preamble and "DICM" out of a dataset without one, and strict readers refuse that.
            dataset.preamble = b"\0" * 128

        def work(stop: threading.Event) -> StoredObject:
            client = self._connector(self.config)
            answer = client.store_instances([dataset], study_instance_uid=study_uid)
            failed = answer.get("FailedSOPSequence") if answer is not None else None
            if failed:
                reason = failed[0].get("FailureReason", "?")
                raise ProblemError(
                    ProblemCode.PACS_ERROR, f"the PACS refused the SR (failure reason {reason})"
                )
            return StoredObject(
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=str(dataset.SOPInstanceUID),
                series_instance_uid=str(dataset.SeriesInstanceUID),
            )

        return await self._call(work, not_found=ProblemCode.PACS_ERROR)


def _choose_series(series: list[tuple[str, str]], series_uid: str | None) -> list[str]:
    """The series to retrieve: `series_uid`; else the CT series (the ingest chooses among them);
    else all (the ingest answers not_ct / unsuitable_series)."""
    uids = [uid for uid, _ in series]
    if series_uid is not None:
        if series_uid not in uids:
            raise ProblemError(
                ProblemCode.SERIES_NOT_FOUND,
                "the study has no series with this SeriesInstanceUID",
                field="series_uid",
            )
        return [series_uid]
    return [uid for uid, modality in series if modality.upper() == CT] or uids


def _retrieve(
    client: DicomwebApi,
    study_uid: str,
    series_uids: list[str],
    stop: threading.Event,
    started: float,
    directory: str | None,
    max_bytes: int,
    max_instances: int,
) -> RetrievedStudy:
    descriptor, name = tempfile.mkstemp(prefix="headct-pacs-", suffix=".zip", dir=directory)
    path = Path(name)
    instances = size = 0
    try:
        with (
            open(descriptor, "wb") as handle,
            zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
        ):
            for series_uid in series_uids:
                for dataset in client.iter_series(study_uid, series_uid, media_types=_ANY_TRANSFER_SYNTAX):
                    if stop.is_set():
                        raise TimeoutError
                    buffer = io.BytesIO()
                    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
                    instances += 1
                    size += buffer.tell()
                    if instances > max_instances or size > max_bytes:
                        limit = "instances" if instances > max_instances else "bytes"
                        raise ProblemError(
                            ProblemCode.PAYLOAD_TOO_LARGE,
                            f"the study's series hold more {limit} than this gateway reads",
                            field="HEADCT_MAX_ARCHIVE_MEMBERS"
                            if limit == "instances"
                            else "HEADCT_MAX_UPLOAD_BYTES",
                        )
                    archive.writestr(f"{instances:06d}.dcm", buffer.getbuffer())
        if stop.is_set():  # finished just after the deadline: nobody will read it
            raise TimeoutError
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return RetrievedStudy(
        path=path,
        instances=instances,
        series=len(series_uids),
        size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - started,
    )
