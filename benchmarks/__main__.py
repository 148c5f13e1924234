"""`python -m benchmarks [--quick]`: run the suite; the LAST line printed is the contract JSON summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import report, suite
from benchmarks.config import FULL, QUICK
from headct import contract

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, < 5 minutes on 2 cores")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model-name", default=contract.DEFAULT_MODEL_NAME)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = suite.run(QUICK if args.quick else FULL, args.repository, args.out, args.model_name)
    line = report.write_all(results, args.out)
    print(f"[bench] wrote {args.out / 'latest.json'}, {args.out / 'REPORT.md'} and plots", flush=True)
    print(json.dumps(line, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
