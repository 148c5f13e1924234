"""A small Python client for the HeadCT-Serve REST API (needs only httpx; no torch, no gateway code).

    from headct.client import HeadCTClient, HeadCTProblem

    with HeadCTClient("http://127.0.0.1:8080", api_key="...") as client:
        result = client.predict("scan.nii.gz", tasks=["hemorrhage"])
        for finding in result["findings"]:
            print(finding["name"], finding["probability"])

`predict` takes a NIfTI / NRRD / DICOM / zip file, or a directory of DICOM files, which is zipped on
the fly into a temporary file (streamed from disk, never held in memory). Errors from the gateway
raise `HeadCTProblem`, carrying its problem+json body.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import httpx

DEFAULT_URL: Final = "http://127.0.0.1:8080"

# By file name; anything else goes as application/octet-stream and the gateway sniffs the bytes.
_MEDIA_TYPES: Final = (
    (".nii.gz", "application/gzip"),
    (".nii", "application/octet-stream"),
    (".nrrd", "application/x-nrrd"),
    (".zip", "application/zip"),
    (".dcm", "application/dicom"),
    (".gz", "application/gzip"),
)


class HeadCTProblem(Exception):
    """The gateway answered with an error. `problem` is its problem+json body (RFC 9457)."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after: str | None = None) -> None:
        self.status = status
        self.problem = problem
        self.code: str = str(problem.get("code", f"http_{status}"))
        self.detail: str = str(problem.get("detail", ""))
        self.request_id: str | None = problem.get("request_id")
        self.retry_after = retry_after
        super().__init__(f"{status} {self.code}: {self.detail}")


def media_type_for(path: Path) -> str:
    name = path.name.lower()
    return next(
        (media for suffix, media in _MEDIA_TYPES if name.endswith(suffix)), "application/octet-stream"
    )


def zip_directory(directory: Path, target: IO[bytes], *, recursive: bool = True) -> int:
    """Zip every regular file under `directory` (recursively, hidden files skipped) into `target`,
    one file at a time from disk. Entry names are only a counter: the gateway ignores them, and the
    local file names (which may carry patient names) stay on this machine. Returns the file count.
    ``recursive=False`` takes only the files directly in `directory` (`headct batch`: a series folder's
    subfolders are scans of their own)."""
    count = 0
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(directory.rglob("*") if recursive else directory.iterdir()):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts):
                archive.write(path, arcname=f"{count:06d}.dcm")
                count += 1
    return count


@contextlib.contextmanager
def _body(path: Path, recursive: bool) -> Iterator[tuple[IO[bytes], str]]:
    """The file to send and its content type; a directory becomes a temporary zip, deleted after."""
    if path.is_dir():
        with tempfile.TemporaryFile(prefix="headct-upload-", suffix=".zip") as spool:
            if zip_directory(path, spool, recursive=recursive) == 0:
                raise ValueError(f"{path} holds no files")
            spool.seek(0)
            yield spool, "application/zip"
        return
    with path.open("rb") as handle:
        yield handle, media_type_for(path)


def _raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError("not an object")
    except ValueError:
        problem = {"status": response.status_code, "detail": response.text[:500]}
    raise HeadCTProblem(response.status_code, problem, response.headers.get("Retry-After"))


class HeadCTClient:
    """Synchronous client, safe to share between threads. `api_key` is sent as ``X-API-Key``; `timeout`
    (seconds) covers one request, upload included (a large series on a slow link needs more than the
    default). ``keepalive=False`` opens a connection per request: behind a Kubernetes Service, which
    balances connections rather than requests, each scan may then land on any pod, new ones included
    (`headct batch`; a handshake is nothing next to a scan's upload)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 300.0,
        *,
        keepalive: bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)
        self._http = httpx.Client(
            base_url=url, headers=headers, timeout=timeout, limits=limits, transport=transport
        )

    def __enter__(self) -> HeadCTClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self) -> dict[str, Any]:
        """`GET /v1/models`: the served model(s), their findings, thresholds and input contract."""
        response = self._http.get("/v1/models")
        _raise_for_problem(response)
        return response.json()

    def predict(
        self,
        path_or_dir: str | os.PathLike[str],
        tasks: Sequence[str] | None = None,
        include_embedding: bool = False,
        *,
        series_uid: str | None = None,
        priority: str | None = None,
        recursive: bool = True,
    ) -> dict[str, Any]:
        """`POST /v1/predict` with one scan: a file, or a directory of one series' DICOM files.

        `priority` is the gateway's lane (``stat``, ``routine`` or ``bulk``; None sends none and the
        gateway applies its default): cohort jobs send ``bulk`` so that they queue behind clinical
        scans. ``recursive=False`` uploads only the files directly in a directory."""
        path = Path(path_or_dir)
        params: dict[str, str] = {}
        if tasks:
            params["tasks"] = ",".join(tasks)
        if include_embedding:
            params["include"] = "embedding"
        if series_uid:
            params["series_uid"] = series_uid
        if priority:
            params["priority"] = priority
        with _body(path, recursive) as (body, media_type):
            # A file object is streamed by httpx in chunks, with Content-Length from its size.
            response = self._http.post(
                "/v1/predict", content=body, params=params, headers={"Content-Type": media_type}
            )
        _raise_for_problem(response)
        return response.json()
