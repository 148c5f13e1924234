"""`headct`: the command line for the HeadCT-Serve REST API (`headct.client`).

    headct predict scan.nii.gz
    headct predict ./series-dir --tasks hemorrhage,edema --json
    headct models --url http://gateway:8080
    headct batch /archive --out results.parquet [--embeddings] [--concurrency 4]

`headct batch` scores a folder tree or CSV manifest into one Parquet / CSV row per scan, resumably
(see headct/client/batch/); its exit codes: 0 every scan scored or refused (the refusals recorded),
1 some failed after retries or a problem stopped the run, 2 usage, 3 unreachable, 130 interrupted.

The API key comes from ``--api-key`` or the ``HEADCT_API_KEY`` environment variable (prefer the
variable: command lines are visible to other users of the machine); the URL from ``--url`` or
``HEADCT_URL``.

Exit codes: 0 success, 1 the gateway answered with a problem (its code and detail on stderr),
2 usage error (bad arguments, no such file), 3 the gateway could not be reached.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import httpx

from headct.client import DEFAULT_URL, HeadCTClient, HeadCTProblem

EXIT_OK: Final = 0
EXIT_PROBLEM: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
# The gateway's priority lanes (api/inference/lanes.py; the client imports no gateway code).
PRIORITIES: Final = ("stat", "routine", "bulk")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_batch(commands: Any, connection: argparse.ArgumentParser) -> None:
    batch = commands.add_parser(
        "batch",
        parents=[connection],
        help="score a folder tree or CSV manifest into a Parquet / CSV table (resumable)",
        description="One row per scan; rerun the same command after Ctrl-C or a crash to go on.",
    )
    batch.add_argument("input", type=Path, metavar="FOLDER_OR_MANIFEST_CSV")
    batch.add_argument("--out", type=Path, required=True, help="results .parquet (or .csv)")
    batch.add_argument("--format", choices=("parquet", "csv"), help="default: from the --out suffix")
    batch.add_argument("--tasks", help="comma-separated subset of findings, e.g. hemorrhage,edema")
    batch.add_argument("--embeddings", action="store_true", help="add the CLS embedding column")
    batch.add_argument("--concurrency", type=_positive_int, default=4, help="scans in flight (default 4)")
    batch.add_argument(
        "--priority", choices=PRIORITIES, default="bulk", help="the gateway's lane (default bulk)"
    )
    batch.add_argument("--max-retries", type=int, default=10, help="per scan on 429/503/502/504 (default 10)")
    batch.add_argument(
        "--max-retry-wait", type=float, default=60.0, help="cap of one wait before a retry, s (default 60)"
    )
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch.add_argument(
        "--keepalive",
        action="store_true",
        help="reuse connections (default: one per scan, so that a Kubernetes Service spreads the scans "
        "over every gateway pod, new ones included)",
    )


def _parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url", default=os.environ.get("HEADCT_URL", DEFAULT_URL), help="gateway base URL"
    )
    connection.add_argument(
        "--api-key", default=os.environ.get("HEADCT_API_KEY"), help="API key (default: $HEADCT_API_KEY)"
    )
    connection.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    common = argparse.ArgumentParser(add_help=False, parents=[connection])
    common.add_argument("--json", action="store_true", help="print the raw JSON response")

    parser = argparse.ArgumentParser(prog="headct", description="Client for the HeadCT-Serve gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict", parents=[common], help="findings for one scan (file or directory of DICOM files)"
    )
    predict.add_argument("path", type=Path, metavar="FILE_OR_DIR")
    predict.add_argument("--tasks", help="comma-separated subset of findings, e.g. hemorrhage,edema")
    predict.add_argument("--series-uid", help="SeriesInstanceUID to read when the upload holds several")
    predict.add_argument("--include-embedding", action="store_true", help="also return the CLS embedding")
    commands.add_parser("models", parents=[common], help="the served model, findings and thresholds")
    _add_batch(commands, connection)
    return parser


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def format_prediction(result: dict[str, Any]) -> str:
    model = result.get("model", {})
    scan = result.get("input", {})
    shape = "x".join(str(n) for n in scan.get("shape", []))
    spacing = "x".join(f"{s:g}" for s in scan.get("spacing_mm", []))
    lines = [
        f"model    {model.get('name')} {model.get('version')}",
        f"input    {scan.get('source_format')} {shape} voxels, {spacing} mm",
        f"request  {result.get('request_id')}",
        "",
    ]
    rows = [("finding", "probability", "threshold", "positive")]
    rows += [
        (f["name"], f"{f['probability']:.3f}", f"{f['threshold']:.3f}", "YES" if f["positive"] else "no")
        for f in result.get("findings", [])
    ]
    lines.append(_table(rows))
    for warning in result.get("warnings", []):
        lines.append(f"warning  {warning.get('code')}: {warning.get('detail')}")
    timings = result.get("timings_ms", {})
    if timings:
        lines.append("timings  " + ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in timings.items()))
    if result.get("notice"):
        lines.append(f"NOTE     {result['notice']}")
    return "\n".join(lines)


def format_models(result: dict[str, Any]) -> str:
    blocks = []
    for model in result.get("models", []):
        rows = [("finding", "threshold")] + [
            (t["name"], f"{t['threshold']:.3f}") for t in model.get("tasks", [])
        ]
        blocks.append(
            f"model    {model.get('name')} {model.get('version')} (sha256 {str(model.get('sha256'))[:12]})\n"
            f"input    {model.get('input')}\n"
            f"preproc  {model.get('preprocessing_version')}\n\n" + _table(rows)
        )
    return "\n\n".join(blocks)


def run(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse already printed the usage
        return EXIT_OK if stop.code == 0 else EXIT_USAGE
    if args.command == "batch":
        return _run_batch(args, err)
    if args.command == "predict" and not args.path.exists():
        print(f"headct: no such file or directory: {args.path}", file=err)
        return EXIT_USAGE
    try:
        with HeadCTClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            if args.command == "models":
                result = client.models()
                text = format_models(result)
            else:
                tasks = _split(args.tasks)
                result = client.predict(
                    args.path, tasks or None, args.include_embedding, series_uid=args.series_uid
                )
                text = format_prediction(result)
    except HeadCTProblem as problem:
        print(f"headct: {problem.status} {problem.code}: {problem.detail}", file=err)
        if args.json:
            print(json.dumps(problem.problem, indent=2), file=out)
        return EXIT_PROBLEM
    except ValueError as error:  # e.g. an empty directory
        print(f"headct: {error}", file=err)
        return EXIT_USAGE
    except httpx.TransportError as error:
        print(f"headct: cannot reach {args.url}: {type(error).__name__}: {error}", file=err)
        return EXIT_UNREACHABLE
    print(json.dumps(result, indent=2) if args.json else text, file=out)
    return EXIT_OK


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _run_batch(args: argparse.Namespace, err: TextIO) -> int:
    # Imported here: pyarrow and rich would double `headct predict`'s start-up for nothing.
    from headct.client import batch

    options = batch.BatchOptions(
        tasks=tuple(_split(args.tasks)),
        embeddings=args.embeddings,
        priority=args.priority,
        concurrency=args.concurrency,
        retry=batch.RetryPolicy(max_retries=max(0, args.max_retries), max_wait_s=args.max_retry_wait),
        progress=not args.no_progress,
    )
    factory = functools.partial(
        HeadCTClient, args.url, api_key=args.api_key, timeout=args.timeout, keepalive=args.keepalive
    )
    try:
        return batch.run_batch(args.input, args.out, options, factory, fmt=args.format, err=err)
    except KeyboardInterrupt:  # while walking the archive or asking for the model: nothing to keep
        print("headct batch: interrupted", file=err)
        return batch.EXIT_INTERRUPTED


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
