"""The problems the readers raise, built in one place so codes and wording stay consistent.

Details never quote header values that could identify a patient: readers only pass shapes, sizes,
exception *types* and (for parser errors) a message cut to 160 characters from libraries that do
not echo patient data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from api.problems import ProblemCode, ProblemError


def _clean(message: str) -> str:
    """A library's error message without file system paths (the spool file's name means nothing to a
    client) and without quoted values, cut to 160 characters.

    Parsers quote the text they choke on (pynrrd: ``could not convert string to float: 'DOE'``):
    that is the upload's own content, which may be anything, a patient's name included.
    """
    message = re.sub(r"(?:/[\w.+-]+)+", "<file>", message)
    return re.sub(r"'[^']*'|\"[^\"]*\"", "<value>", message)[:160]


def unreadable(kind: str, error: BaseException | str) -> ProblemError:
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {_clean(str(error))}"
    return ProblemError(ProblemCode.UNREADABLE_FILE, f"the {kind} data could not be read ({reason})")


def not_3d(shape: Sequence[int]) -> ProblemError:
    return ProblemError(
        ProblemCode.NOT_3D,
        "the scan must be a single 3-D volume",
        field="shape",
        observed=[int(s) for s in shape],
        expected="3 spatial dimensions (a 4th of size 1 is accepted)",
    )


def too_large(shape: Sequence[int], max_voxels: int) -> ProblemError:
    return ProblemError(
        ProblemCode.VOLUME_TOO_LARGE,
        f"the decoded volume would have more than {max_voxels} voxels",
        field="shape",
        observed=[int(s) for s in shape],
        expected=f"<= {max_voxels} voxels",
    )


def payload_too_large(what: str, observed: float | str, limit: float) -> ProblemError:
    return ProblemError(
        ProblemCode.PAYLOAD_TOO_LARGE,
        f"the upload holds too much: {what} {observed} exceeds the limit of {limit}",
        field=what,
        observed=observed,
        expected=f"<= {limit}",
    )
