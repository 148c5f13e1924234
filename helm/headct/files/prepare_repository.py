#!/usr/bin/env python3
"""Prepare the pod-local Triton model repository; then, in the serving container, start Triton.

Shipped by the Helm chart as a ConfigMap and run with the image's python3 (standard library only):

  prepare  (init container) copy one model version from the source repository (PVC or fetched object
           store) into the pod's serving repository; for --format trt build a TensorRT engine from its
           model.onnx on this pod's GPU with `python -m export build-engine`, or take it from the engine
           cache, keyed by TensorRT version + GPU product + ONNX sha256 + build settings. If the build is
           refused or fails (including its TensorRT-vs-ONNX Runtime parity gate against the
           model.reference.npz that the export writes beside model.onnx and that is copied with the
           version directory), serve the ONNX model with ONNX Runtime instead (unless --no-fallback).
           An engine is served only if its model.plan.json records a passed parity gate (built here,
           from the cache, or prebuilt in a trt entry); otherwise a trt entry falls back to its
           model.onnx.
  serve    (Triton container) check that a TensorRT engine matches this image's TensorRT version and
           passed the parity gate (fall back to ONNX if not), then exec tritonserver.

A repository entry written by `python -m export` for target cpu (Python backend + model.onnx), onnx or
trt is accepted: the config.pbtxt is rewritten textually (platform, default_model_filename, instance
kind), which is all that differs between the targets for serving. Exit status: 0 ok, 1 failure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG = "config.pbtxt"
ONNX = "model.onnx"
PLAN = "model.plan"
PLAN_META = "model.plan.json"
STATUS = "serving_status.json"
EXIT_REFUSED = 3  # python -m export build-engine: no TensorRT or no CUDA GPU here
TERMINATION_LOG = Path("/dev/termination-log")

ONNX_PLATFORM = "onnxruntime_onnx"
TRT_PLATFORM = "tensorrt_plan"


class PrepareError(RuntimeError):
    """The repository cannot be prepared as asked; the message says why."""


def log(message: str) -> None:
    print(f"[headct-prepare] {message}", file=sys.stderr, flush=True)


# --- config.pbtxt (protobuf text format as written by export.repository) ----------------------------


def config_target(text: str) -> str:
    """'cpu' (Python backend), 'onnx' or 'trt' for a config written by `python -m export`."""
    platform = _top_level(text, "platform")
    backend = _top_level(text, "backend")
    if backend == "python":
        return "cpu"
    if platform == ONNX_PLATFORM or backend == "onnxruntime":
        return "onnx"
    if platform == TRT_PLATFORM or backend == "tensorrt":
        return "trt"
    raise PrepareError(f"config.pbtxt has platform={platform!r} backend={backend!r}: not a HeadCT export")


def max_batch_size(text: str) -> int:
    match = re.search(r"^max_batch_size: (\d+)\s*$", text, re.MULTILINE)
    if not match:
        raise PrepareError("config.pbtxt has no max_batch_size")
    return int(match.group(1))


def _top_level(text: str, key: str) -> str | None:
    match = re.search(rf'^{key}: "([^"]*)"\s*$', text, re.MULTILINE)
    return match.group(1) if match else None


def _set_serving(text: str, platform: str, filename: str, kind: str) -> str:
    # Drop any backend/platform line, then state the platform first (text format accepts any order).
    text = re.sub(r'^(backend|platform): "[^"]*"\n', "", text, flags=re.MULTILINE)
    text = f'platform: "{platform}"\n' + text
    if re.search(r"^default_model_filename: ", text, re.MULTILINE):
        text = re.sub(
            r'^default_model_filename: "[^"]*"',
            f'default_model_filename: "{filename}"',
            text,
            flags=re.MULTILINE,
        )
    else:
        text = f'default_model_filename: "{filename}"\n' + text

    def instance_group(match: re.Match[str]) -> str:
        body = match.group(0)
        if re.search(r"\bkind: KIND_\w+", body):
            return re.sub(r"\bkind: KIND_\w+", f"kind: {kind}", body)
        return body.replace("instance_group {", f"instance_group {{\n  kind: {kind}", 1)

    text = re.sub(r"^instance_group \{[^}]*\}", instance_group, text, flags=re.MULTILINE)
    if "instance_group {" not in text:
        text += f"instance_group {{\n  count: 1\n  kind: {kind}\n}}\n"
    return text


def onnx_config(text: str, device: str) -> str:
    """Serve the version's model.onnx with Triton's ONNX Runtime backend on `device` (gpu|cpu)."""
    return _set_serving(text, ONNX_PLATFORM, ONNX, "KIND_GPU" if device == "gpu" else "KIND_CPU")


def trt_config(text: str) -> str:
    return _set_serving(text, TRT_PLATFORM, PLAN, "KIND_GPU")


# --- repository copy -----------------------------------------------------------------------------------


def pick_version(model_dir: Path, requested: str) -> Path:
    versions = sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0"
    )
    if not versions:
        raise PrepareError(f"{model_dir} has no numbered version directory")
    if requested:
        if not requested.isdigit() or int(requested) not in versions:
            raise PrepareError(f"version {requested!r} not in {model_dir} (have {versions})")
        return model_dir / str(int(requested))
    return model_dir / str(versions[-1])


def copy_entry(source: Path, dest: Path, model: str, version: str) -> tuple[Path, Path]:
    """Copy <source>/<model>/{files, one version} to <dest>/<model>/; return (model_dir, version_dir)."""
    src_model = source / model
    if not (src_model / CONFIG).is_file():
        raise PrepareError(f"{src_model / CONFIG} not found: is the repository at {source}?")
    src_version = pick_version(src_model, version)
    dst_model = dest / model
    if dst_model.exists():
        shutil.rmtree(dst_model)  # a restarted init container starts over
    dst_model.mkdir(parents=True)
    for item in src_model.iterdir():
        if item.is_file() and not item.name.startswith("."):
            shutil.copyfile(item, dst_model / item.name)
    dst_version = dst_model / src_version.name
    shutil.copytree(src_version, dst_version, copy_function=shutil.copyfile)
    return dst_model, dst_version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- engine cache ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildTarget:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str


@dataclass(frozen=True)
class BuildSettings:
    max_batch_size: int
    precision: str = "fp16"
    opt_batch_size: int | None = None
    workspace_gb: float = 4.0
    timeout_s: float = 3600.0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def cache_entry(cache: Path, target: BuildTarget, onnx_sha256: str, settings: BuildSettings) -> Path:
    """<cache>/trt-<version>/<gpu>-sm<cc>/<onnx sha256>-<precision>-b<max>-o<opt>/ (readable on purpose)."""
    opt = settings.opt_batch_size or max(1, settings.max_batch_size // 2)
    return (
        cache
        / f"trt-{_slug(target.tensorrt_version)}"
        / f"{_slug(target.gpu_name)}-sm{_slug(target.compute_capability)}"
        / f"{onnx_sha256}-{settings.precision}-b{settings.max_batch_size}-o{opt}"
    )


def gate_problem(info: dict) -> str | None:
    """None if model.plan.json content `info` records a passed parity gate, else why the plan is unfit."""
    gate = info.get("gate")
    if gate == "passed":
        return None
    if gate == "failed":
        summary = (info.get("parity") or {}).get("summary", "no figures recorded")
        return f"engine failed the TensorRT-vs-ONNX Runtime parity gate ({summary})"
    if gate == "skipped":
        return "engine was built with --no-parity-gate (never compared with ONNX Runtime)"
    return "engine metadata records no parity gate (built before the gate existed?)"


def _read_meta(meta: Path) -> tuple[dict, str | None]:
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as error:
        return {}, f"unreadable {meta}: {error}"
    if not isinstance(info, dict):
        return {}, f"{meta} is not a JSON object"
    return info, None


def cached_plan_ok(entry: Path, onnx_sha256: str, tensorrt_version: str) -> str | None:
    """None if `entry` holds a usable plan (same ONNX and TensorRT, intact, gate passed), else why not."""
    plan, meta = entry / PLAN, entry / PLAN_META
    if not plan.is_file() or not meta.is_file():
        return "no cached engine"
    info, why = _read_meta(meta)
    if why is not None:
        return why
    if info.get("onnx_sha256") != onnx_sha256:
        return "cached engine was built from another ONNX"
    if info.get("tensorrt_version") != tensorrt_version:
        return "cached engine was built by another TensorRT"
    if info.get("plan_sha256") != sha256_file(plan):
        return "cached engine is corrupt (sha256 mismatch)"
    return gate_problem(info)


def prebuilt_plan_problem(version_dir: Path) -> str | None:
    """None if a trt entry's model.plan is intact and passed the parity gate, else why not."""
    plan, meta = version_dir / PLAN, version_dir / PLAN_META
    if not plan.is_file():
        return f"no {PLAN} in {version_dir}"
    if not meta.is_file():
        return f"no {PLAN_META} beside the engine (its parity gate is unknown)"
    info, why = _read_meta(meta)
    if why is not None:
        return why
    if info.get("plan_sha256") != sha256_file(plan):
        return "engine does not match its model.plan.json (sha256 mismatch)"
    return gate_problem(info)


Probe = Callable[[], BuildTarget]
Builder = Callable[[Path, Path, BuildSettings, Path | None], None]


class BuildRefused(RuntimeError):
    """No TensorRT or no CUDA GPU in this container."""


class BuildFailed(RuntimeError):
    """TensorRT was there but did not produce an engine (or timed out)."""


_PROBE_CODE = """
import json
from export import tensorrt_build as tb
try:
    trt = tb.load_tensorrt()
    gpu = tb.probe_cuda_gpu()
except tb.EngineBuildRefused as error:
    print(json.dumps({"refused": str(error)}))
else:
    print(json.dumps({"tensorrt_version": str(trt.__version__), "gpu_name": gpu.name,
                      "compute_capability": gpu.compute_capability}))
"""


def probe_with_export() -> BuildTarget:
    """TensorRT version and GPU of this container, through the `export` package of the image."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE_CODE], capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        raise BuildRefused(f"cannot probe TensorRT/GPU: {result.stderr.strip()[-2000:]}")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    if "refused" in info:
        raise BuildRefused(info["refused"])
    return BuildTarget(info["tensorrt_version"], info["gpu_name"], info["compute_capability"])


def build_with_export(onnx: Path, plan: Path, settings: BuildSettings, timing_cache: Path | None) -> None:
    command = [
        sys.executable, "-m", "export", "build-engine",
        "--onnx", str(onnx), "--plan", str(plan),
        "--max-batch-size", str(settings.max_batch_size),
        "--precision", settings.precision,
        "--workspace-gb", str(settings.workspace_gb),
    ]  # fmt: skip
    if settings.opt_batch_size:
        command += ["--opt-batch-size", str(settings.opt_batch_size)]
    if timing_cache is not None:
        command += ["--timing-cache", str(timing_cache)]
    log("running: " + " ".join(command))
    try:
        result = subprocess.run(command, timeout=settings.timeout_s, check=False)
    except subprocess.TimeoutExpired as error:
        raise BuildFailed(f"engine build timed out after {settings.timeout_s:.0f} s") from error
    if result.returncode == EXIT_REFUSED:
        raise BuildRefused("python -m export build-engine refused (exit 3): no TensorRT or no CUDA GPU")
    if result.returncode != 0:
        raise BuildFailed(f"python -m export build-engine failed with exit status {result.returncode}")
    if not plan.is_file():
        raise BuildFailed(f"the build reported success but wrote no {plan}")


def obtain_engine(
    onnx: Path,
    cache: Path,
    settings: BuildSettings,
    *,
    probe: Probe,
    builder: Builder,
) -> tuple[Path, str]:
    """Return (directory holding model.plan + model.plan.json, 'cache-hit' | 'built')."""
    target = probe()
    onnx_sha256 = sha256_file(onnx)
    entry = cache_entry(cache, target, onnx_sha256, settings)
    why = cached_plan_ok(entry, onnx_sha256, target.tensorrt_version)
    if why is None:
        log(f"engine cache hit: {entry}")
        return entry, "cache-hit"
    log(f"engine cache miss ({why}): building for {target.gpu_name} with TensorRT {target.tensorrt_version}")
    entry.parent.mkdir(parents=True, exist_ok=True)
    timing = cache / "timing" / f"trt-{_slug(target.tensorrt_version)}-{_slug(target.gpu_name)}.cache"
    timing.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the final place and rename: a concurrent pod never sees half an engine, and when two
    # pods build the same key at once the first rename wins and the other's result is dropped.
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=entry.parent))
    try:
        started = time.monotonic()
        builder(onnx, staging / PLAN, settings, timing)
        log(f"engine built in {time.monotonic() - started:.0f} s")
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(staging, entry)
        except OSError:
            if cached_plan_ok(entry, onnx_sha256, target.tensorrt_version) is not None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    why = cached_plan_ok(entry, onnx_sha256, target.tensorrt_version)
    if why is not None:
        raise BuildFailed(f"the new engine does not check out: {why}")
    return entry, "built"


# --- prepare / serve -----------------------------------------------------------------------------------


@dataclass
class Status:
    model: str
    version: str
    source_target: str
    serving: str  # trt | onnx-gpu | onnx-cpu
    engine: str  # n/a | prebuilt | cache-hit | built | fallback
    reason: str = ""

    def line(self) -> str:
        text = f"serving {self.model} v{self.version} as {self.serving} (engine: {self.engine})"
        return text + (f": {self.reason}" if self.reason else "")


def prepare(
    source: Path,
    dest: Path,
    model: str,
    *,
    fmt: str,
    device: str,
    version: str = "",
    cache: Path | None = None,
    settings: BuildSettings | None = None,
    fallback: bool = True,
    probe: Probe = probe_with_export,
    builder: Builder = build_with_export,
) -> Status:
    model_dir, version_dir = copy_entry(source, dest, model, version)
    config_path = model_dir / CONFIG
    text = config_path.read_text()
    source_target = config_target(text)
    status = Status(model, version_dir.name, source_target, serving="", engine="n/a")

    if source_target == "trt":
        # `python -m export --target trt` ships model.onnx beside the engine, so an engine that cannot be
        # served here (no GPU, no passed parity gate) falls back to ONNX Runtime.
        why = "Triton runs without a GPU" if device != "gpu" else prebuilt_plan_problem(version_dir)
        if why is None:
            status.serving, status.engine = "trt", "prebuilt"
        elif not (version_dir / ONNX).is_file():
            raise PrepareError(f"the repository holds a TensorRT engine but {why}, and no {ONNX}")
        elif device == "gpu" and not fallback:
            raise PrepareError(f"prebuilt TensorRT engine unusable and fallback disabled: {why}")
        else:
            log(f"WARNING: prebuilt TensorRT engine not served ({why}); serving ONNX Runtime on {device}")
            text = onnx_config(text, device)
            status.serving, status.engine, status.reason = f"onnx-{device}", "fallback", why
    elif fmt == "trt" and device == "gpu":
        onnx = version_dir / ONNX
        if not onnx.is_file():
            raise PrepareError(f"{onnx} not found: export the model with --target onnx (or cpu)")
        settings = settings or BuildSettings(max_batch_size=max_batch_size(text))
        if settings.max_batch_size != max_batch_size(text):
            raise PrepareError("engine max batch size differs from config.pbtxt max_batch_size")
        try:
            entry, how = obtain_engine(
                onnx, cache or dest / ".engine-cache", settings, probe=probe, builder=builder
            )
        except (BuildRefused, BuildFailed, OSError) as error:
            if not fallback:
                raise PrepareError(f"TensorRT engine unavailable and fallback disabled: {error}") from error
            log(f"WARNING: TensorRT engine unavailable ({error}); serving ONNX Runtime on the GPU instead")
            text = onnx_config(text, "gpu")
            status.serving, status.engine, status.reason = "onnx-gpu", "fallback", str(error)
        else:
            shutil.copyfile(entry / PLAN, version_dir / PLAN)
            shutil.copyfile(entry / PLAN_META, version_dir / PLAN_META)
            text = trt_config(text)
            status.serving, status.engine = "trt", how
    else:
        if not (version_dir / ONNX).is_file():
            raise PrepareError(f"{version_dir / ONNX} not found")
        text = onnx_config(text, device)
        status.serving = f"onnx-{device}"

    config_path.write_text(text)
    (model_dir / STATUS).write_text(json.dumps(asdict(status), indent=2) + "\n")
    return status


def local_tensorrt_version(
    env: dict[str, str] | None = None, roots: Sequence[str] | None = None
) -> str | None:
    """TensorRT version of this (serving) image: $TRT_VERSION / $TENSORRT_VERSION or libnvinfer.so.X.Y.Z."""
    env = dict(os.environ) if env is None else env
    for name in ("TRT_VERSION", "TENSORRT_VERSION"):
        if re.fullmatch(r"\d+(\.\d+){2,}", env.get(name, "")):
            return env[name]
    roots = roots or (
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/tensorrt/lib",
        "/opt/tritonserver/backends/tensorrt",
    )
    found: list[tuple[int, ...]] = []
    for root in roots:
        for lib in Path(root).glob("libnvinfer.so.*"):
            match = re.fullmatch(r"libnvinfer\.so\.(\d+(?:\.\d+){2,})", lib.name)
            if match:
                found.append(tuple(int(part) for part in match.group(1).split(".")))
    return ".".join(map(str, max(found))) if found else None


def same_tensorrt(a: str, b: str) -> bool:
    """Versions agree on every component both state (engines need the same major.minor.patch at least)."""
    pa, pb = a.split("."), b.split(".")
    common = min(len(pa), len(pb))
    return common >= 3 and pa[:common] == pb[:common]


def check_engine(repository: Path, model: str, local_version: str | None) -> str | None:
    """Switch a TensorRT entry to ONNX if its engine failed (or skipped) the parity gate or was built by
    another TensorRT; return a note."""
    model_dir = repository / model
    text = (model_dir / CONFIG).read_text()
    if config_target(text) != "trt":
        return None
    version_dir = pick_version(model_dir, "")
    meta = version_dir / PLAN_META
    info, unreadable = _read_meta(meta) if meta.is_file() else ({}, None)
    reason = unreadable or (gate_problem(info) if meta.is_file() else None)
    if reason is None:
        if local_version is None or not meta.is_file():
            return "TensorRT version of this image unknown; serving the engine unchecked"
        built_with = str(info.get("tensorrt_version", ""))
        if same_tensorrt(built_with, local_version):
            return None
        reason = f"engine built with TensorRT {built_with}, this Triton has {local_version}"
    if not (version_dir / ONNX).is_file():
        raise PrepareError(reason + " and there is no model.onnx to fall back to")
    (model_dir / CONFIG).write_text(onnx_config(text, "gpu"))
    status_path = model_dir / STATUS
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    status.update(serving="onnx-gpu", engine="fallback", reason=reason)
    status_path.write_text(json.dumps(status, indent=2) + "\n")
    return "WARNING: " + reason + "; serving ONNX Runtime on the GPU instead"


def restricted_api_flags(key_file: Path, apis: str) -> list[str]:
    """Triton flags that put `apis` behind the header `admin-key: <key>` on HTTP and gRPC.

    The key is read from a mounted Secret file here, so it never appears in the pod spec or its env.
    """
    key = key_file.read_text().strip()
    if not re.fullmatch(r"[A-Za-z0-9._~-]{16,}", key):
        raise PrepareError(f"{key_file}: the admin key must be >= 16 characters of [A-Za-z0-9._~-]")
    if not re.fullmatch(r"[a-z-]+(,[a-z-]+)*", apis):
        raise PrepareError(f"bad --restricted-apis {apis!r}")
    restriction = f"{apis}:admin-key={key}"
    return [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]


def _termination_message(text: str) -> None:
    with contextlib.suppress(OSError):
        TERMINATION_LOG.write_text(text[-4000:] + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prepare_repository.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="init container: assemble the serving repository")
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--version", default="")
    p.add_argument("--format", choices=("trt", "onnx"), required=True)
    p.add_argument("--device", choices=("gpu", "cpu"), required=True)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--precision", default="fp16")
    p.add_argument("--opt-batch-size", type=int, default=None)
    p.add_argument("--workspace-gb", type=float, default=4.0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--no-fallback", dest="fallback", action="store_false")
    s = sub.add_parser("serve", help="serving container: check the engine, then exec the server")
    s.add_argument("--repository", type=Path, required=True)
    s.add_argument("--model", required=True)
    s.add_argument(
        "--admin-key-file",
        type=Path,
        default=None,
        help="restrict --restricted-apis behind header 'admin-key: <this file's content>'",
    )
    s.add_argument("--restricted-apis", default="model-repository,shared-memory,statistics,trace,logging")
    s.add_argument("server", nargs=argparse.REMAINDER, help="-- tritonserver ARGS...")
    args = parser.parse_args(argv)

    try:
        if args.command == "prepare":
            text = (args.source / args.model / CONFIG).read_text() if args.format == "trt" else ""
            settings = None
            if text:
                settings = BuildSettings(
                    max_batch_size=max_batch_size(text),
                    precision=args.precision,
                    opt_batch_size=args.opt_batch_size,
                    workspace_gb=args.workspace_gb,
                    timeout_s=args.timeout,
                )
            status = prepare(
                args.source,
                args.dest,
                args.model,
                fmt=args.format,
                device=args.device,
                version=args.version,
                cache=args.cache,
                settings=settings,
                fallback=args.fallback,
            )
            log(status.line())
            _termination_message(status.line())
            return 0
        server = args.server[1:] if args.server[:1] == ["--"] else args.server
        if not server:
            parser.error("serve needs the server command after --")
        note = check_engine(args.repository, args.model, local_tensorrt_version())
        if note:
            log(note)
        if args.admin_key_file is not None:
            server += restricted_api_flags(args.admin_key_file, args.restricted_apis)
        sys.stdout.flush()
        os.execvp(server[0], server)
    except (PrepareError, OSError, ValueError) as error:
        log(f"error: {error}")
        _termination_message(f"error: {error}")
        return 1
    return 0  # not reached after execvp


if __name__ == "__main__":
    raise SystemExit(main())
