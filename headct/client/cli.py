"""`headct`: the command line for the HeadCT-Serve REST API (`headct.client`).

    headct predict scan.nii.gz
    headct predict ./series-dir --tasks hemorrhage,edema --json
    headct models --url http://gateway:8080

The API key comes from ``--api-key`` or the ``HEADCT_API_KEY`` environment variable (prefer the
variable: command lines are visible to other users of the machine); the URL from ``--url`` or
``HEADCT_URL``.

Exit codes: 0 success, 1 the gateway answered with a problem (its code and detail on stderr),
2 usage error (bad arguments, no such file), 3 the gateway could not be reached.
"""

from __future__ import annotations

import argparse
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


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("HEADCT_URL", DEFAULT_URL), help="gateway base URL")
    common.add_argument(
        "--api-key", default=os.environ.get("HEADCT_API_KEY"), help="API key (default: $HEADCT_API_KEY)"
    )
    common.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
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
    if args.command == "predict" and not args.path.exists():
        print(f"headct: no such file or directory: {args.path}", file=err)
        return EXIT_USAGE
    try:
        with HeadCTClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            if args.command == "models":
                result = client.models()
                text = format_models(result)
            else:
                tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
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


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
