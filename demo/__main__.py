"""`python -m demo`: train the SYNTHETIC DEMO MODEL if its checkpoints are missing, then export it
(target cpu) into the model repository; a no-op when the repository entry is current. `make serve` and
`make test` run it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from export.cli import DEFAULT_REPOSITORY, EXIT_FAILED, EXIT_OK, add_serving_options, serving_options
from headct import contract


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Train the synthetic demo model if its checkpoints are missing, then export it "
        "(target cpu) into the repository; a no-op when the entry is current.",
    )
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--model-name", default=contract.DEFAULT_MODEL_NAME)
    parser.add_argument("--checkpoints", type=Path, default=None, help="default build/demo/checkpoints")
    parser.add_argument("--force", action="store_true", help="export even if the entry is current")
    add_serving_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from demo.export import run_demo

    args = demo_parser().parse_args(argv)
    try:
        outcome = run_demo(
            repository=args.repository,
            model_name=args.model_name,
            checkpoints=args.checkpoints,
            serving=serving_options(args),
            force=args.force,
        )
    except (RuntimeError, ValueError, OSError) as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in outcome.timings.items())
    print(f"export time {outcome.total_seconds:.1f} s ({stages})")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
