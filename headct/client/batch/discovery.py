"""What `headct batch` scores: the scans of a folder tree or of a CSV manifest (`discover`).

In a tree, every NIfTI (.nii, .nii.gz) or NRRD file is one scan, and so is every folder that directly
holds DICOM files (a ``.dcm`` name or ``DICM`` at byte 128): its own files are uploaded, not its
subfolders', which are scans of their own. A manifest has a ``path`` column (relative to the manifest's
folder, or absolute) and optionally a ``scan_id`` column. A scan's id is its path relative to the input
(never anything read from the file).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Final

VOLUME_SUFFIXES: Final = (".nii", ".nii.gz", ".nrrd")


class InputError(ValueError):
    """The input or output cannot be used (a usage error: exit 2)."""


@dataclasses.dataclass(frozen=True)
class Scan:
    """One scan: its id in the output and what to upload (`whole_tree` False: a folder's own files)."""

    scan_id: str
    path: Path
    whole_tree: bool = True


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` name or the Part 10 preamble's ``DICM`` magic (most archives name files IM0001...)."""
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def discover_tree(root: Path) -> list[Scan]:
    """Every NIfTI / NRRD file and every folder that directly holds DICOM files; hidden names skipped."""
    scans = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        here = Path(folder)
        visible = sorted(name for name in names if not name.startswith("."))
        volumes = [name for name in visible if name.lower().endswith(VOLUME_SUFFIXES)]
        scans += [Scan((here / name).relative_to(root).as_posix(), here / name) for name in volumes]
        if any(is_dicom_file(here / name) for name in visible if name not in volumes):
            scans.append(Scan(here.relative_to(root).as_posix(), here, whole_tree=False))
    return sorted(scans, key=lambda scan: scan.scan_id)


def read_manifest(manifest: Path) -> list[Scan]:
    """A CSV with a ``path`` column (relative to the manifest's folder, or absolute) and an optional
    ``scan_id`` column (default: the path as written)."""
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise InputError(f"{manifest}: no `path` column")
        scans = []
        for line, record in enumerate(reader, start=2):
            written = (record.get("path") or "").strip()
            if not written:
                raise InputError(f"{manifest}, line {line}: empty path")
            path = Path(written) if Path(written).is_absolute() else manifest.parent / written
            scans.append(Scan((record.get("scan_id") or "").strip() or written, path))
    repeated = [scan_id for scan_id, n in Counter(s.scan_id for s in scans).items() if n > 1]
    if repeated:
        raise InputError(f"{manifest}: scan ids listed more than once: {', '.join(repeated[:5])}")
    return scans


def discover(source: Path) -> list[Scan]:
    """The scans of a folder tree or of a ``.csv`` manifest."""
    if source.is_dir():
        scans = discover_tree(source)
    elif source.is_file() and source.name.lower().endswith(".csv"):
        scans = read_manifest(source)
    else:
        raise InputError(f"{source}: not a folder or a .csv manifest")
    if not scans:
        raise InputError(f"{source}: no scans found (NIfTI, NRRD or folders of DICOM files)")
    return scans
