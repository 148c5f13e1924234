"""Containers of several files: zip archives and multipart bodies, read from the spooled upload.

A `MemberSource` gives indexed access to the files inside; nothing is extracted by name:

* **zip**: entries are opened by their index in the central directory through `zipfile`, which
  bounds what it inflates by the declared size and checks the CRC. Entry *names are never used as
  paths* (nor looked at). Limits (`IngestLimits`): number of entries, sum of declared uncompressed
  sizes (zip bombs), size of one entry, compression ratio of the archive; encrypted entries are refused.
* **multipart** (``multipart/form-data`` or DICOMweb-style ``multipart/related``): the body is parsed
  in 1 MiB chunks by python-multipart's streaming parser and each part is written to its own file in
  a private temporary directory (``part-<n>``, never the part's filename). Limits: number of parts,
  size of one part; the total is already bounded by the upload limit.

Memory stays bounded: a member is read into memory only when it is small (one DICOM slice);
large members (a multi-frame object) are copied to a temporary file first. A zip member read whole
(`read`) is inflated in one call by ISA-L (api/ingest/inflate.py).
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Self

from python_multipart.multipart import MultipartParser

from api.ingest.errors import payload_too_large, unreadable
from api.ingest.inflate import read_member
from api.ingest.scan import IngestLimits
from api.problems import ProblemError

if TYPE_CHECKING:  # python_multipart defines it for type checkers only
    from python_multipart.multipart import MultipartCallbacks

#: Members up to this size are read into memory (a 512 x 512 16-bit slice is 0.5 MiB).
IN_MEMORY_MEMBER_BYTES: Final = 32 << 20
_CHUNK: Final = 1 << 20


class MemberSource:
    """Indexed files of an upload. Subclasses implement `count`, `size`, `open`."""

    kind = "container"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def count(self) -> int:
        raise NotImplementedError

    def size(self, index: int) -> int:
        raise NotImplementedError

    def open(self, index: int) -> IO[bytes]:
        raise NotImplementedError

    def head(self, index: int, size: int = 544) -> bytes:
        with self.open(index) as handle:
            return handle.read(size)

    def read(self, index: int) -> bytes:
        """The whole member (call it for members up to `IN_MEMORY_MEMBER_BYTES`)."""
        with self.open(index) as handle:
            return handle.read()

    @contextlib.contextmanager
    def seekable(self, index: int, scratch: Path) -> Iterator[IO[bytes]]:
        """The member as a seekable binary file: in memory when small, else copied under `scratch`."""
        if self.size(index) <= IN_MEMORY_MEMBER_BYTES:
            yield io.BytesIO(self.read(index))
            return
        with tempfile.NamedTemporaryFile(dir=scratch, prefix="member-") as copy, self.open(index) as handle:
            shutil.copyfileobj(handle, copy, _CHUNK)
            copy.flush()
            copy.seek(0)
            yield copy


class SingleFile(MemberSource):
    """The upload itself, as the only member."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = path

    def count(self) -> int:
        return 1

    def size(self, index: int) -> int:
        return self.path.stat().st_size

    def open(self, index: int) -> IO[bytes]:
        return self.path.open("rb")

    @contextlib.contextmanager
    def seekable(self, index: int, scratch: Path) -> Iterator[IO[bytes]]:
        with self.open(index) as handle:  # a plain file: seekable as it is
            yield handle


def _ratio(uncompressed: int, compressed: int) -> float:
    """Declared inflation; an empty payload that claims content is infinitely inflated."""
    if compressed == 0:
        return math.inf if uncompressed else 0.0
    return uncompressed / compressed


class ZipSource(MemberSource):
    kind = "zip"

    def __init__(self, path: Path, limits: IngestLimits) -> None:
        try:
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise unreadable("zip", error) from error
        self._handle = path.open("rb")  # for `read`: whole members, without zipfile's stream
        self._infos = [info for info in infos if not info.is_dir()]
        try:
            if len(self._infos) > limits.max_members:
                raise payload_too_large("zip_entries", len(self._infos), limits.max_members)
            total = sum(info.file_size for info in self._infos)
            if total > limits.max_uncompressed_bytes:
                raise payload_too_large("uncompressed_bytes", total, limits.max_uncompressed_bytes)
            biggest = max((info.file_size for info in self._infos), default=0)
            if biggest > limits.max_member_bytes:
                raise payload_too_large("zip_entry_bytes", biggest, limits.max_member_bytes)
            # Whole-archive ratio, not per entry: one constant slice (pixel padding) deflates ~1000x
            # on its own, while a bomb's payload dominates the archive.
            ratio = _ratio(total, sum(info.compress_size for info in self._infos))
            if ratio > limits.max_compression_ratio:
                observed = round(ratio, 1) if math.isfinite(ratio) else "unbounded"
                raise payload_too_large("compression_ratio", observed, limits.max_compression_ratio)
            if any(info.flag_bits & 0x1 for info in self._infos):
                raise unreadable("zip", "the archive is encrypted")
        except ProblemError:
            self.close()
            raise

    def close(self) -> None:
        self._zip.close()
        self._handle.close()

    def count(self) -> int:
        return len(self._infos)

    def size(self, index: int) -> int:
        return self._infos[index].file_size

    def open(self, index: int) -> IO[bytes]:
        try:
            return self._zip.open(self._infos[index])
        except (zipfile.BadZipFile, NotImplementedError, OSError, ValueError, RuntimeError) as error:
            raise unreadable("zip", error) from error

    def read(self, index: int) -> bytes:
        try:
            return read_member(self._zip, self._handle, self._infos[index])
        except (zipfile.BadZipFile, NotImplementedError, OSError, ValueError, RuntimeError) as error:
            raise unreadable("zip", error) from error


class MultipartSource(MemberSource):
    """Parts of a multipart body, each spooled to its own file."""

    kind = "multipart"

    def __init__(self, path: Path, boundary: str, limits: IngestLimits) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="headct-parts-", dir=path.parent))
        self._paths: list[Path] = []
        try:
            self._split(path, boundary, limits)
        except BaseException:
            self.close()
            raise

    def _split(self, path: Path, boundary: str, limits: IngestLimits) -> None:
        sink: IO[bytes] | None = None
        size = 0
        ended = False

        def on_part_begin() -> None:
            nonlocal sink, size
            if len(self._paths) >= limits.max_members:
                raise payload_too_large("multipart_parts", len(self._paths) + 1, limits.max_members)
            part = self._dir / f"part-{len(self._paths):06d}"
            self._paths.append(part)
            sink, size = part.open("wb"), 0

        def on_part_data(data: bytes, start: int, end: int) -> None:
            nonlocal size
            size += end - start
            if size > limits.max_member_bytes:
                raise payload_too_large("multipart_part_bytes", size, limits.max_member_bytes)
            assert sink is not None
            sink.write(data[start:end])

        def on_part_end() -> None:
            nonlocal sink
            if sink is not None:
                sink.close()
            sink = None

        def on_end() -> None:
            nonlocal ended
            ended = True

        callbacks: MultipartCallbacks = {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        }
        parser = MultipartParser(boundary, callbacks)
        try:
            with path.open("rb") as body:
                while chunk := body.read(_CHUNK):
                    parser.write(chunk)
            parser.finalize()
        except ProblemError:
            raise
        except Exception as error:  # malformed framing
            raise unreadable("multipart", error) from error
        finally:
            if sink is not None:
                sink.close()
        if not ended:
            raise unreadable("multipart", "the body ends before the closing boundary")
        if not self._paths:
            raise unreadable("multipart", "the body holds no parts")

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def count(self) -> int:
        return len(self._paths)

    def size(self, index: int) -> int:
        return self._paths[index].stat().st_size

    def open(self, index: int) -> IO[bytes]:
        return self._paths[index].open("rb")

    @contextlib.contextmanager
    def seekable(self, index: int, scratch: Path) -> Iterator[IO[bytes]]:
        with self.open(index) as handle:  # a plain file: seekable as it is
            yield handle

    def path(self, index: int) -> Path:
        return self._paths[index]
