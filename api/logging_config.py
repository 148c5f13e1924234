"""Structured logs: one JSON object per line on stderr (``HEADCT_LOG_FORMAT=json``, the default) or
plain text (``text``), at ``HEADCT_LOG_LEVEL``.

What never reaches a log line: patient identifiers and pixel data. The gateway's own log calls only
pass ids, codes, sizes and timings; the access log (`api.access_log`) has a fixed field list; and
exceptions are rendered as the exception *types* plus the stack (file, line, function) without
their messages or source-line text, because decoder errors can quote bytes of the uploaded file.

`configure_logging` applies to the process that calls it: processes started with ``spawn`` (the
preprocessing workers) need it in their initializer too.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
# Record attributes that are not extras; uvicorn's `color_message` (the message with ANSI colours) too.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName", "color_message"}
)
_HANDLER_NAME: Final = "headct"
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def safe_exception(exc_info: _ExcInfo) -> str:
    """The traceback with every chained exception's type and frames, but no exception message and
    no source lines (either could carry file contents or a patient identifier)."""
    exc_type, error, tb = exc_info
    if exc_type is None or error is None:
        return ""
    chain: list[traceback.TracebackException] = []
    current: traceback.TracebackException | None = traceback.TracebackException(
        exc_type, error, tb, lookup_lines=False
    )
    while current is not None:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    blocks = []
    for item in reversed(chain):  # oldest first, like Python's own rendering
        frames = [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in item.stack]
        name = item.exc_type.__qualname__ if item.exc_type else "Exception"
        head = "Traceback (most recent call last):"
        blocks.append("\n".join([head, *frames, f"{name} (message withheld)"]))
    return "\n\nDuring it or because of it:\n\n".join(blocks)


class JsonFormatter(logging.Formatter):
    """`ts`, `level`, `logger`, `msg`, then whatever the call passed as `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc_type"] = record.exc_info[0].__qualname__ if record.exc_info[0] else None
            entry["exc"] = safe_exception(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable, with the same exception redaction as the JSON lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        return f"{line} {json.dumps(extras, default=str)}" if extras else line

    def formatException(self, ei: Any) -> str:
        return safe_exception(ei)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route the root logger (and uvicorn's) to one stderr handler; uvicorn's access log is replaced
    by `api.access_log`. Safe to call again (replaces the handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only our own handler: others (pytest's capture, an embedding app's) stay.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)  # HEADCT_LOG_LEVEL rules, not uvicorn's --log-level
    # httpx logs every request URL at INFO, query (series_uid) included; highdicom logs the source
    # instances' UIDs at INFO while it builds a DICOM SR answer.
    for name in ("httpx", "httpcore", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    access.disabled = True
    # Library warnings as JSON lines too, instead of raw text on stderr.
    logging.captureWarnings(True)
    # Uncaught exceptions would otherwise be printed raw, messages included, by the default hooks.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("headct").critical("uncaught exception", exc_info=(kind, error, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or args.exc_type is SystemExit:
        return
    logging.getLogger("headct").critical(
        "uncaught exception in a thread", exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )
