"""`headct batch`: score a whole archive, one row per scan, in a Parquet (or CSV) table.

    headct batch /archive --out results.parquet [--embeddings] [--concurrency 4] [--priority bulk]
    headct batch manifest.csv --out results.csv

The input is a folder tree or a CSV manifest (`discovery`). Each scan gets one request, sent with
``priority=bulk`` by default so that a cohort job queues behind clinical scans, and retried on 429 / 503
(after the gateway's ``Retry-After``), 502 / 504 and connection errors (`retry`). Its outcome is one row
(`rows`): ``ok``, ``refused`` (a problem about the scan itself: final) or ``failed`` (tried again by the
next run); a problem about the request rather than the scan stops the run (`runner`). The rows go to
the output table (`table`) through a journal that makes a run resumable after Ctrl-C or a kill and locks
the output against a second run (`journal`), on a pool of worker threads (`workers`), under a progress
bar and with a summary at the end (`progress`).

One module per concept; they import one another, never this package, and without cycles: `runner`
(the run itself) imports the others, `journal` builds on `table`, which builds on `rows`. pyarrow and
rich are imported with this package (by `rows`, `table`, `progress`), so `headct.client.cli` imports it
only when `batch` runs.
"""

from headct.client.batch.discovery import InputError, Scan, discover, discover_tree, read_manifest
from headct.client.batch.journal import Journal, fold, journal_path
from headct.client.batch.retry import RetryPolicy, parse_retry_after
from headct.client.batch.runner import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    BatchOptions,
    RunAborted,
    run_batch,
    score_scan,
)
from headct.client.batch.table import read_output

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "BatchOptions",
    "InputError",
    "Journal",
    "RetryPolicy",
    "RunAborted",
    "Scan",
    "discover",
    "discover_tree",
    "fold",
    "journal_path",
    "parse_retry_after",
    "read_manifest",
    "read_output",
    "run_batch",
    "score_scan",
]
