"""Answers that carry the explanation maps on the caller's own grid (`api.inference.explanations`).

==========================================  =========================================================
request                                     answer
==========================================  =========================================================
``format=nifti``                            the maps as one gzip NIfTI (``application/gzip``), one
                                            volume per finding, in the upload's affine
``format=png``                              the preview montage (``image/png``)
``include=preview`` (JSON answer)           the JSON answer with the montage in ``preview``
``include=attention`` +                     ``multipart/related; type="application/dicom"``: the
``Accept: application/dicom``               DICOM SR and the Parametric Map of the maps
==========================================  =========================================================

``format`` names the body's format, so it wins over ``Accept``.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import Final, Literal

from fastapi.responses import Response

from api.inference.explanations import FILE_NAMES, MEDIA_TYPES, ExplanationFormat
from api.inference.service import HandledRequest
from api.results.dicom_sr import DICOM_MEDIA_TYPE
from api.schemas import PredictResponse, Preview

MapFormat = Literal["nifti", "png"]
PREVIEW: Final = "preview"


def explain_formats(
    map_format: MapFormat | None, include: Sequence[str], media_type: str, *, store: bool = False
) -> tuple[ExplanationFormat, ...]:
    """The formats the worker must render the maps in for this request: the `format` file; else the
    Parametric Map when DICOM objects go out with `include=attention` (answered, or stored into the
    PACS with `store`), and the PNG for a JSON answer's `include=preview`."""
    if map_format is not None:
        return (map_format,)
    dicom_answer = media_type == DICOM_MEDIA_TYPE
    formats: list[ExplanationFormat] = []
    if "attention" in include and (dicom_answer or store):
        formats.append("dicom")
    if PREVIEW in include and not dicom_answer:
        formats.append("png")
    return tuple(formats)


def map_file(handled: HandledRequest, map_format: MapFormat) -> Response:
    """``format=nifti|png``: the rendered file as the body, with a file name to save it under."""
    return Response(
        handled.explanations[map_format],
        media_type=MEDIA_TYPES[map_format],
        headers={"Content-Disposition": f'attachment; filename="{FILE_NAMES[map_format]}"'},
    )


def with_preview(handled: HandledRequest) -> PredictResponse:
    """The JSON answer, with the PNG montage when one was rendered (``include=preview``)."""
    png = handled.explanations.get("png")
    if png is None:
        return handled.response
    preview = Preview(media_type=MEDIA_TYPES["png"], data_base64=base64.b64encode(png).decode("ascii"))
    return handled.response.model_copy(update={"preview": preview})


def multipart_related(parts: Sequence[bytes], media_type: str = DICOM_MEDIA_TYPE) -> Response:
    """Several DICOM objects in one body, as DICOMweb (PS3.18) sends them."""
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in part for part in parts):  # astronomically unlikely
        boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode()
    body = b"".join(head + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()
    return Response(body, media_type=f'multipart/related; type="{media_type}"; boundary={boundary}')
