"""Command line of `python -m export`.

    python -m export --task NAME=BACKBONE,HEAD[:THRESHOLD] ... [--backbone PRETRAINED] \\
        [--head NAME=HEAD[:THRESHOLD] ...] [--weights student|teacher] [--registers drop|keep] \\
        [--allow-unpaired] --target cpu|onnx|trt [--repository model_repository] [--model-name fmhct] \\
        [--version N] [--max-batch-size 8] [--model-version STR] [--synthetic-demo]
    python -m export build-engine --onnx PATH --plan PATH --max-batch-size N [--reference NPZ] \\
        [--no-parity-gate]   (inside the Triton image; gated against model.reference.npz beside the ONNX)

Exit status: 0 done or already current, 1 export failed (checkpoint, ONNX, parity, repository),
2 usage error, 3 TensorRT engine build refused on this machine (no TensorRT or no CUDA GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from export import tensorrt_build
from headct import contract

if TYPE_CHECKING:
    from export.repository import ServingOptions

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
DEFAULT_REPOSITORY = Path("model_repository")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# `build-engine` runs inside the Triton image, which has neither torch nor tritonclient: the export
# modules (and export.repository, which needs tritonclient's protobufs) are imported only when needed.


def add_serving_options(parser: argparse.ArgumentParser) -> None:
    from export import repository

    parser.add_argument("--max-batch-size", type=_positive_int, default=8, help="Triton max_batch_size (8)")
    parser.add_argument("--max-queue-delay-us", type=int, default=repository.DEFAULT_MAX_QUEUE_DELAY_US)
    parser.add_argument("--max-queue-size", type=_positive_int, default=None, help="default 4 x max batch")
    parser.add_argument("--queue-timeout-ms", type=_positive_int, default=None, help="default per target")
    parser.add_argument("--instances", type=_positive_int, default=1, help="model instances (1)")
    parser.add_argument(
        "--cpu-threads", type=int, default=0, help="cpu target: ONNX Runtime intra-op threads (0 = all cores)"
    )


def serving_options(args: argparse.Namespace) -> ServingOptions:
    from export.repository import ServingOptions

    return ServingOptions(
        max_batch_size=args.max_batch_size,
        max_queue_delay_microseconds=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
        queue_timeout_microseconds=args.queue_timeout_ms * 1000 if args.queue_timeout_ms else None,
        instance_count=args.instances,
        intra_op_threads=args.cpu_threads,
    )


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=tensorrt_build.PRECISIONS, default="fp16")
    parser.add_argument("--opt-batch-size", type=_positive_int, default=None, help="default max/2")
    parser.add_argument("--workspace-gb", type=float, default=tensorrt_build.DEFAULT_WORKSPACE_BYTES / 2**30)
    parser.add_argument(
        "--timing-cache", type=Path, default=None, help="loaded if present, saved after build"
    )


def export_parser() -> argparse.ArgumentParser:
    from export import repository

    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export FM-HCT checkpoints into a Triton model repository "
        "(subcommand: 'build-engine', see its --help; the synthetic demo model: `python -m demo`).",
    )
    parser.add_argument(
        "--task",
        dest="tasks",
        action="append",
        default=[],
        metavar="NAME=BACKBONE,HEAD[:THRESHOLD]",
        help="a task with its own run's backbone (vit_<task>.pt) and head; repeat per task "
        "(threshold default 0.5). Tasks whose backbones hold identical weights share one forward.",
    )
    parser.add_argument(
        "--backbone",
        type=Path,
        default=None,
        help="the shared (pretrained) backbone: its CLS token is the served embedding, and --head tasks "
        "run on it",
    )
    parser.add_argument(
        "--head",
        dest="heads",
        action="append",
        default=[],
        metavar="NAME=PATH[:THRESHOLD]",
        help="a task head on the shared --backbone (its run must have saved that backbone)",
    )
    parser.add_argument("--weights", choices=("student", "teacher"), default="student")
    parser.add_argument(
        "--registers",
        choices=("drop", "keep"),
        default="drop",
        help="register tokens of a DINO checkpoint: drop (default, as the official downstream configs, "
        "which build the ViT without registers) or keep",
    )
    parser.add_argument(
        "--allow-unpaired",
        action="store_true",
        help="export heads whose run pairing with their backbone cannot be verified (recorded in the card)",
    )
    parser.add_argument("--num-heads", type=_positive_int, default=None, help="default embed_dim/64")
    parser.add_argument("--target", choices=repository.TARGETS, required=True)
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--model-name", default=contract.DEFAULT_MODEL_NAME)
    parser.add_argument("--version", type=_positive_int, default=None, help="Triton version (default max+1)")
    parser.add_argument("--model-version", default=None, help="human model version for the card")
    parser.add_argument("--synthetic-demo", action="store_true", help="mark the card as the synthetic demo")
    parser.add_argument("--notice", default=None, help="card notice for a real model")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--parity-seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="export even if the entry is current")
    parser.add_argument("--work-dir", type=Path, default=None, help="staging dir (default: system temp)")
    add_serving_options(parser)
    _add_engine_options(parser)
    return parser


def engine_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export build-engine",
        description="Build model.plan (+ model.plan.json) from model.onnx. Runs only where TensorRT and "
        "the target CUDA GPU are present (NVIDIA's Triton image on the serving node).",
    )
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument(
        "--plan", type=Path, required=True, help="output engine, e.g. <repo>/<m>/<v>/model.plan"
    )
    parser.add_argument("--max-batch-size", type=_positive_int, required=True)
    _add_engine_options(parser)
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="ONNX Runtime reference outputs for the parity gate (default: model.reference.npz beside "
        "--onnx, written by the export)",
    )
    parser.add_argument(
        "--no-parity-gate",
        action="store_true",
        help="build without comparing the engine with ONNX Runtime (recorded as gate 'skipped'; the Helm "
        "chart does not serve such an engine). Without this flag a missing reference fails the build.",
    )
    return parser


def _engine_settings(args: argparse.Namespace) -> tensorrt_build.EngineBuildSettings:
    return tensorrt_build.EngineBuildSettings(
        max_batch_size=args.max_batch_size,
        precision=args.precision,
        opt_batch_size=args.opt_batch_size,
        workspace_bytes=int(args.workspace_gb * 2**30),
        timing_cache=args.timing_cache,
    )


def _run_export(argv: Sequence[str]) -> int:
    from export import pipeline
    from export.tasks import TaskSpec

    args = export_parser().parse_args(argv)
    tasks = tuple(TaskSpec.parse(spec) for spec in args.tasks)
    tasks += tuple(TaskSpec.parse_head(spec) for spec in args.heads)
    for task in tasks:
        if not task.threshold_given:
            print(f"warning: no threshold for task {task.name!r}; using {task.threshold}", file=sys.stderr)
    request = pipeline.ExportRequest(
        backbone=args.backbone,
        tasks=tasks,
        target=args.target,
        repository=args.repository,
        model_name=args.model_name,
        weights=args.weights,
        registers=args.registers,
        allow_unpaired=args.allow_unpaired,
        num_heads=args.num_heads,
        version=args.version,
        model_version=args.model_version,
        synthetic_demo=args.synthetic_demo,
        notice=args.notice,
        opset=args.opset,
        serving=serving_options(args),
        precision=args.precision,
        opt_batch_size=args.opt_batch_size,
        workspace_bytes=int(args.workspace_gb * 2**30),
        timing_cache=args.timing_cache,
        parity_seed=args.parity_seed,
        force=args.force,
        work_dir=args.work_dir,
    )
    outcome = pipeline.run_export(request)
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in outcome.timings.items())
    print(f"export time {outcome.total_seconds:.1f} s ({stages})")
    return EXIT_OK


def _run_build_engine(argv: Sequence[str]) -> int:
    args = engine_parser().parse_args(argv)
    if args.no_parity_gate and args.reference is not None:
        engine_parser().error("--reference and --no-parity-gate contradict each other")
    started = time.perf_counter()
    # Exit status (main): 3 refused (no TensorRT/GPU, TensorRT < 8.6), 1 failed (incl. the parity gate).
    built = tensorrt_build.build_engine(
        args.onnx,
        args.plan,
        _engine_settings(args),
        reference=args.reference,
        parity_gate=not args.no_parity_gate,
    )
    print(
        f"wrote {args.plan} ({built.precision}, {built.gpu_name}, parity gate {built.gate}) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"build-engine": _run_build_engine}
    command = commands.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command is not None else _run_export(argv)
    except tensorrt_build.EngineBuildRefused as error:
        print(f"error: TensorRT engine build refused: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except (RuntimeError, ValueError, OSError) as error:
        # CheckpointError (ValueError), OnnxExportError/ParityError, RepositoryError, EngineBuildError,
        # ExportError: one clear line, no traceback; the message says what to fix.
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
