"""`headct batch` against the real gateway and Triton: a 30-scan archive (NIfTI, NRRD, DICOM series
folders and five bad scans) scored, interrupted with SIGINT, resumed; every scan once, the finished rows
kept, the rest scored by the second run, each row equal to a one-by-one `HeadCTClient.predict`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from demo.dicom_writer import ct_series, phantom_head, reorient, write_series
from demo.synthetic_head import make_head
from headct.client import HeadCTClient
from headct.volume import Volume

pytestmark = pytest.mark.integration

HEADCT = Path(sys.executable).with_name("headct")
EMBEDDING_DIM = 192  # the demo model's
# The bad scans and the problem each must be refused with; every other scan must be scored.
BAD = {
    "bad/truncated.nii.gz": "unreadable_file",
    "bad/text.nrrd": "unreadable_file",
    "bad/air.nii.gz": "no_foreground",
    "bad/four_d.nii": "not_3d",
    "bad/mr_study/series_1": "not_ct",
}


def write_nifti(hu: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """int16 HU (a tenth of the float32 upload of `Volume.to_nifti`), sform = qform = `affine`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.rint(hu).astype(np.int16), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.to_filename(path)


def write_nrrd(volume: Volume, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
    }
    nrrd.write(str(path), np.rint(volume.hu).astype(np.int16), header={**header, "encoding": "gzip"})


def good_scans(root: Path) -> list[str]:
    """25 scorable scans from 4 synthetic heads at 2 mm (one `make_head` is ~0.3 s after the first),
    made distinct by noise: 21 NIfTI in a site/patient tree, one NRRD, three DICOM series folders."""
    rng = np.random.default_rng(20260)
    flags = [(False, False), (True, False), (False, True), (True, True)]
    heads = [
        make_head(np.random.default_rng(seed), hemorrhage=h, edema=e, spacing_mm=(2.0, 2.0, 2.0))
        for seed, (h, e) in enumerate(flags)
    ]
    names = []
    for n in range(21):
        head = heads[n % len(heads)]
        name = f"site_{n % 3}/patient_{n:02d}/head.{'nii' if n % 7 == 0 else 'nii.gz'}"
        write_nifti(head.hu + rng.normal(0.0, 4.0, head.hu.shape), head.affine, root / name)
        names.append(name)
    write_nrrd(heads[1], root / "site_0/patient_99/head.nrrd")
    write_series(ct_series(reorient(heads[2], "LPS"), seed="s1"), root / "dicom/study_1/series_1")
    write_series(ct_series(phantom_head(seed=1), seed="s2"), root / "dicom/study_1/series_2")
    write_series(ct_series(phantom_head(seed=2, lesion_hu=70.0), seed="s3"), root / "dicom/study_2")
    names += [
        "site_0/patient_99/head.nrrd",
        "dicom/study_1/series_1",
        "dicom/study_1/series_2",
        "dicom/study_2",
    ]
    return names


def bad_scans(root: Path) -> None:
    """The five of `BAD`."""
    (root / "bad").mkdir()
    eye = np.diag([1.0, 1.0, 1.0, 1.0])
    write_nifti(np.full((48, 48, 40), 500.0), eye, root / "bad/whole.nii.gz")
    whole = (root / "bad/whole.nii.gz").read_bytes()
    (root / "bad/truncated.nii.gz").write_bytes(whole[: len(whole) // 3])
    (root / "bad/whole.nii.gz").unlink()
    (root / "bad/text.nrrd").write_text("this is a text file, not a scan\n")
    write_nifti(np.full((96, 96, 64), -1000.0), eye, root / "bad/air.nii.gz")
    nib.Nifti1Image(np.zeros((32, 32, 16, 3), np.int16), eye).to_filename(root / "bad/four_d.nii")
    mr = ct_series(phantom_head(seed=3), seed="mr", overrides={"Modality": "MR"})
    write_series(mr, root / "bad/mr_study/series_1")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The 30-scan tree (plus files that are no scan: notes, a hidden file) and its scorable scan ids."""
    root = tmp_path_factory.mktemp("archive")
    good = good_scans(root)
    bad_scans(root)
    (root / "notes.txt").write_text("not a scan")
    (root / "site_0/.DS_Store").write_bytes(b"\0junk")
    return root, good


def journal_lines(journal: Path) -> int:
    try:
        return journal.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_batch_scores_an_archive_across_an_interruption(
    gateway_url: str, archive: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, good = archive
    out = tmp_path / "results.parquet"
    command = [str(HEADCT), "batch", str(root), "--out", str(out), "--url", gateway_url]
    command += ["--embeddings", "--concurrency"]
    started = time.monotonic()
    # One worker and an early Ctrl-C leave the run seconds to go when it is interrupted. The child gets
    # SIGINT's default back: a suite started in the background (`make test &`) inherits SIGINT ignored,
    # and a Python started with it ignored never raises KeyboardInterrupt.
    first = subprocess.Popen(
        [*command, "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    while journal_lines(out.with_name(out.name + ".journal")) < 3:
        assert first.poll() is None, f"finished before it could be interrupted: {first.communicate()}"
        assert time.monotonic() - started < 120
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    _, errors = first.communicate(timeout=120)
    assert first.returncode == 130, errors
    kept = {row["scan_id"]: row for row in pq.read_table(out).to_pylist()}
    assert 3 <= len(kept) < 30, errors

    second = subprocess.run([*command, "2"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"30 scans, {len(kept)} already done; scoring {30 - len(kept)} with 2 workers" in second.stderr
    assert "ok 25, refused 5 (unreadable_file 2, " in second.stderr and "failed 0" in second.stderr

    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), EMBEDDING_DIM)
    rows = {row["scan_id"]: row for row in table.to_pylist()}
    assert table.num_rows == len(rows) == 30 and set(rows) == {*good, *BAD}
    # Not scored again: each kept row is the same in the final table. Its `<finding>_*` columns come
    # from the findings in the table, so an interrupted table of refusals only has none: there a kept
    # row must have them empty (None), like every refused row.
    changed = {
        s: diff
        for s, row in kept.items()
        if (
            diff := {
                k: (row.get(k), rows[s].get(k))
                for k in row.keys() | rows[s].keys()
                if row.get(k) != rows[s].get(k)
            }
        )
    }
    assert not changed, changed
    assert {s: rows[s]["problem_code"] for s in BAD} == BAD
    assert all(rows[s]["status"] == "refused" and rows[s]["request_id"] for s in BAD)
    check_against_one_by_one(gateway_url, root, {s: rows[s] for s in good})


def check_against_one_by_one(gateway_url: str, root: Path, rows: dict[str, dict]) -> None:
    """Each row equals what `HeadCTClient.predict` says about the same scan on its own."""
    with HeadCTClient(gateway_url) as client:
        for scan_id, row in rows.items():
            alone = client.predict(root / scan_id, include_embedding=True)
            assert row["status"] == "ok" and row["problem_code"] is None
            assert [f["name"] for f in row["findings"]] == [f["name"] for f in alone["findings"]]
            for mine, theirs in zip(row["findings"], alone["findings"], strict=True):
                assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-6), scan_id
                assert row[f"{mine['name']}_probability"] == mine["probability"]
            assert np.allclose(row["embedding"], alone["embedding"], atol=1e-6), scan_id
            assert (row["model_version"], row["model_sha256"]) == (
                alone["model"]["version"],
                alone["model"]["sha256"],
            )
            assert row["input_source_format"] == alone["input"]["source_format"]
            assert row["priority"] in {"bulk", None}  # the lane, where the gateway reports one
