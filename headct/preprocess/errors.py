"""Why a volume cannot be preprocessed: `PreprocessingError` and its subclasses, each with a
machine-readable `code` (the code of the HTTP 422 problem, see `api.problem_codes`)."""

from __future__ import annotations


class PreprocessingError(ValueError):
    """The volume cannot be turned into a model input. `code` is machine readable (HTTP 422 body)."""

    code: str = "preprocessing_failed"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NoForegroundError(PreprocessingError):
    """No voxel is above the foreground threshold (> 0 HU): there is no head in this volume."""

    code = "no_foreground"


class InvalidVolumeError(PreprocessingError):
    """Voxel values are unusable (NaN/inf)."""

    code = "invalid_volume"


class VolumeTooLargeError(PreprocessingError):
    """Resampling to 1 mm would exceed `MAX_RESAMPLED_VOXELS`."""

    code = "volume_too_large"
