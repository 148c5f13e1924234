"""The hostile corpus through `decode_upload` + `validate` in-process: no Triton, no gateway, so the
readers' answers are checked on every machine (the HTTP suite checks the same over the wire).

Cases whose answer comes from the HTTP layer (empty body, query parameters) are left to the HTTP suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from api.ingest import decode_upload
from api.ingest.validation import validate
from api.problems import ProblemError
from tests.hostile.corpus import Case, cases

#: Answered before decoding (spooling, query validation), so not a reader's business.
HTTP_LAYER = {"empty_body", "unknown_task", "invalid_include", "series_uid_too_long"}
CASES = [case for case in cases() if case.name not in HTTP_LAYER]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_reader_answer(case: Case, corpus_dir: Path) -> None:
    path, content_type = case.build(corpus_dir)
    try:
        validate(decode_upload(path, content_type, series_uid=case.params.get("series_uid")))
    except ProblemError as error:
        assert (error.status, error.code) == (case.status, case.code), error.detail
    else:
        assert (case.status, case.code) == (200, None)
    assert path.exists()  # the reader leaves the upload to its caller
    assert not [p for p in corpus_dir.iterdir() if p.name.startswith("headct-")], "scratch left behind"
