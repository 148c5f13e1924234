"""The chart's repository-preparation script (helm/headct/files/prepare_repository.py): target rewriting on
configs written by the real export.repository, engine cache keyed by TensorRT + GPU + ONNX, fallback to
ONNX Runtime, TensorRT-version check at serve time, admin-API restriction. No GPU: probe and builder are
injected fakes, exactly where the init container calls `python -m export build-engine`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helm.conftest import CHART

repository = pytest.importorskip("export.repository", reason="needs the project's .venv (tritonclient)")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

SCRIPT = CHART / "files" / "prepare_repository.py"


@pytest.fixture(scope="module")
def prep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("headct_prepare_repository", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def config_text(target: str, max_batch_size: int = 8) -> str:
    config = repository.build_model_config(
        model_name="fmhct",
        target=target,
        task_names=["hemorrhage", "edema"],
        embedding_dim=64,
        model_card_json='{"name": "fmhct"}',
        options=repository.ServingOptions(max_batch_size=max_batch_size),
    )
    return repository.render_config(config)


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def make_repo(root: Path, target: str = "cpu", versions: tuple[int, ...] = (1, 2)) -> Path:
    model = root / "fmhct"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(config_text(target))
    (model / "labels.txt").write_text("hemorrhage\nedema\n")
    (model / "model_card.json").write_text('{"name": "fmhct"}\n')
    for version in versions:
        directory = model / str(version)
        directory.mkdir()
        if target == "trt":
            (directory / "model.plan").write_bytes(b"plan")
            write_plan_meta(directory, gate="passed")
        else:
            (directory / "model.onnx").write_bytes(f"onnx v{version}".encode())
        if target == "cpu":
            (directory / "model.py").write_text("# python backend\n")
    (model / ".staging-x").mkdir()  # export's staging dirs are not versions
    return root


def write_plan_meta(directory: Path, gate: str | None, **fields: object) -> None:
    """model.plan.json as `python -m export build-engine` writes it (gate None: written before the gate)."""
    meta: dict[str, object] = {
        "tensorrt_version": "10.14.1.48",
        "plan_sha256": hashlib.sha256((directory / "model.plan").read_bytes()).hexdigest(),
        **fields,
    }
    if gate is not None:
        meta["gate"] = gate
        meta["parity"] = {"summary": "max |Δp| 3.000e-02 (limit 0.01)"} if gate == "failed" else None
    (directory / "model.plan.json").write_text(json.dumps(meta))


class FakeEngines:
    """Stands in for `python -m export build-engine` (and its GPU probe)."""

    def __init__(self, prep: ModuleType, fail: Exception | None = None, gate: str | None = "passed") -> None:
        self.prep, self.fail, self.builds, self.gate = prep, fail, 0, gate
        self.target = prep.BuildTarget("10.14.1.48", "NVIDIA H200", "9.0")

    def probe(self):
        return self.target

    def build(self, onnx: Path, plan: Path, settings, timing: Path | None) -> None:
        self.builds += 1
        if self.fail is not None:
            raise self.fail
        plan.write_bytes(b"engine for " + onnx.read_bytes())
        meta = {
            "tensorrt_version": self.target.tensorrt_version,
            "gpu_name": self.target.gpu_name,
            "onnx_sha256": self.prep.sha256_file(onnx),
            "plan_sha256": self.prep.sha256_file(plan),
            "precision": settings.precision,
        }
        if self.gate is not None:
            meta["gate"] = self.gate
        plan.with_name("model.plan.json").write_text(json.dumps(meta))


# --- config rewriting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["cpu", "onnx", "trt"])
def test_targets_are_recognised(prep: ModuleType, target: str) -> None:
    assert prep.config_target(config_text(target)) == target
    assert prep.max_batch_size(config_text(target, 4)) == 4


@pytest.mark.parametrize(
    ("source", "device"), [("cpu", "cpu"), ("cpu", "gpu"), ("onnx", "cpu"), ("trt", "gpu")]
)
def test_onnx_config_changes_only_what_serving_needs(prep: ModuleType, source: str, device: str) -> None:
    before = parse(config_text(source))
    after = parse(prep.onnx_config(config_text(source), device))
    assert after.platform == "onnxruntime_onnx" and after.backend == ""
    assert after.default_model_filename == "model.onnx"
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    assert [g.kind for g in after.instance_group] == [kind]
    for field in (
        "name",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "model_warmup",
        "parameters",
    ):
        assert getattr(after, field) == getattr(before, field), field
    assert after.version_policy == before.version_policy


def test_trt_config(prep: ModuleType) -> None:
    after = parse(prep.trt_config(config_text("onnx")))
    assert (after.platform, after.backend, after.default_model_filename) == (
        "tensorrt_plan",
        "",
        "model.plan",
    )
    assert [g.kind for g in after.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def test_unknown_config_is_refused(prep: ModuleType) -> None:
    with pytest.raises(prep.PrepareError, match="not a HeadCT export"):
        prep.config_target('name: "x"\nplatform: "pytorch_libtorch"\n')


# --- prepare ---------------------------------------------------------------------------------------------


def test_cpu_onnx_copies_only_the_served_version(prep: ModuleType, tmp_path: Path) -> None:
    source = make_repo(tmp_path / "src")
    status = prep.prepare(source, tmp_path / "models", "fmhct", fmt="onnx", device="cpu")
    model = tmp_path / "models" / "fmhct"
    assert sorted(p.name for p in model.iterdir()) == [
        "2", "config.pbtxt", "labels.txt", "model_card.json", "serving_status.json",
    ]  # fmt: skip
    assert (model / "2" / "model.onnx").read_bytes() == b"onnx v2"
    config = parse((model / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (status.serving, status.engine, status.version) == ("onnx-cpu", "n/a", "2")
    assert json.loads((model / "serving_status.json").read_text())["serving"] == "onnx-cpu"
    # The source is untouched (a read-only PVC in the pod).
    assert prep.config_target((source / "fmhct" / "config.pbtxt").read_text()) == "cpu"


def test_requested_version(prep: ModuleType, tmp_path: Path) -> None:
    source = make_repo(tmp_path / "src")
    prep.prepare(source, tmp_path / "models", "fmhct", fmt="onnx", device="gpu", version="1")
    assert (tmp_path / "models" / "fmhct" / "1" / "model.onnx").read_bytes() == b"onnx v1"
    with pytest.raises(prep.PrepareError, match="not in"):
        prep.prepare(source, tmp_path / "models", "fmhct", fmt="onnx", device="gpu", version="7")


def test_missing_repository_says_where_it_looked(prep: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(prep.PrepareError, match=r"config\.pbtxt not found"):
        prep.prepare(tmp_path, tmp_path / "models", "fmhct", fmt="onnx", device="gpu")


def test_engine_is_built_then_served_from_the_cache(prep: ModuleType, tmp_path: Path) -> None:
    source, cache = make_repo(tmp_path / "src", target="onnx"), tmp_path / "cache"
    engines = FakeEngines(prep)
    status = prep.prepare(
        source,
        tmp_path / "a",
        "fmhct",
        fmt="trt",
        device="gpu",
        cache=cache,
        probe=engines.probe,
        builder=engines.build,
    )
    assert (status.serving, status.engine) == ("trt", "built")
    version = tmp_path / "a" / "fmhct" / "2"
    assert (version / "model.plan").read_bytes() == b"engine for onnx v2"
    assert (version / "model.onnx").is_file()  # kept: the serve step can still fall back
    config = parse((tmp_path / "a" / "fmhct" / "config.pbtxt").read_text())
    assert (config.platform, config.default_model_filename) == ("tensorrt_plan", "model.plan")
    # Cache key: TensorRT version / GPU product + compute capability / ONNX sha256 + build settings.
    (entry,) = [p.parent for p in cache.rglob("model.plan")]
    onnx_sha = prep.sha256_file(source / "fmhct" / "2" / "model.onnx")
    assert entry.relative_to(cache).parts == ("trt-10.14.1.48", "NVIDIA-H200-sm9.0", f"{onnx_sha}-fp16-b8-o4")
    # A second pod: same GPU product, same TensorRT, same ONNX -> no build.
    status = prep.prepare(
        source,
        tmp_path / "b",
        "fmhct",
        fmt="trt",
        device="gpu",
        cache=cache,
        probe=engines.probe,
        builder=engines.build,
    )
    assert (status.engine, engines.builds) == ("cache-hit", 1)
    # Another GPU product gets its own engine.
    engines.target = prep.BuildTarget("10.14.1.48", "NVIDIA A100-SXM4-80GB", "8.0")
    status = prep.prepare(
        source,
        tmp_path / "c",
        "fmhct",
        fmt="trt",
        device="gpu",
        cache=cache,
        probe=engines.probe,
        builder=engines.build,
    )
    assert (status.engine, engines.builds) == ("built", 2)


def test_corrupt_cached_engine_is_rebuilt(prep: ModuleType, tmp_path: Path) -> None:
    source, cache = make_repo(tmp_path / "src", target="onnx"), tmp_path / "cache"
    engines = FakeEngines(prep)
    kwargs = {"fmt": "trt", "device": "gpu", "cache": cache, "probe": engines.probe, "builder": engines.build}
    prep.prepare(source, tmp_path / "a", "fmhct", **kwargs)
    (plan,) = cache.rglob("model.plan")
    plan.write_bytes(b"truncated")
    status = prep.prepare(source, tmp_path / "b", "fmhct", **kwargs)
    assert (status.engine, engines.builds) == ("built", 2)


@pytest.mark.parametrize("where", ["probe", "build"])
def test_failed_or_refused_build_falls_back_to_onnx_runtime(
    prep: ModuleType, tmp_path: Path, where: str
) -> None:
    source = make_repo(tmp_path / "src", target="cpu")
    engines = FakeEngines(prep, fail=prep.BuildFailed("builder ran out of workspace"))

    def refuse():
        raise prep.BuildRefused("no CUDA driver")

    probe = refuse if where == "probe" else engines.probe
    status = prep.prepare(
        source,
        tmp_path / "m",
        "fmhct",
        fmt="trt",
        device="gpu",
        cache=tmp_path / "c",
        probe=probe,
        builder=engines.build,
    )
    assert (status.serving, status.engine) == ("onnx-gpu", "fallback")
    assert ("no CUDA driver" if where == "probe" else "workspace") in status.reason
    config = parse((tmp_path / "m" / "fmhct" / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not list((tmp_path / "c").rglob("model.plan"))  # nothing half-built left in the cache
    with pytest.raises(prep.PrepareError, match="fallback disabled"):
        prep.prepare(
            source, tmp_path / "n", "fmhct", fmt="trt", device="gpu", cache=tmp_path / "c",
            probe=probe, builder=engines.build, fallback=False,
        )  # fmt: skip


def test_prebuilt_engine_is_served_as_is(prep: ModuleType, tmp_path: Path) -> None:
    source = make_repo(tmp_path / "src", target="trt")
    status = prep.prepare(source, tmp_path / "m", "fmhct", fmt="trt", device="gpu")
    assert (status.serving, status.engine) == ("trt", "prebuilt")
    with pytest.raises(prep.PrepareError, match="without a GPU"):
        prep.prepare(source, tmp_path / "n", "fmhct", fmt="onnx", device="cpu")


@pytest.mark.parametrize(
    ("gate", "why"),
    [
        ("failed", r"failed the TensorRT-vs-ONNX Runtime parity gate \(max \|Δp\| 3\.000e-02"),
        ("skipped", "--no-parity-gate"),
        (None, "no parity gate"),
    ],
)
def test_prebuilt_engine_without_a_passed_gate_falls_back_to_its_onnx(
    prep: ModuleType, tmp_path: Path, gate: str | None, why: str
) -> None:
    source = make_repo(tmp_path / "src", target="trt", versions=(1,))
    version = source / "fmhct" / "1"
    write_plan_meta(version, gate=gate)
    with pytest.raises(prep.PrepareError, match=why + ".*no model.onnx"):
        prep.prepare(source, tmp_path / "a", "fmhct", fmt="trt", device="gpu")
    (version / "model.onnx").write_bytes(b"onnx v1")  # what `--target trt` now ships beside the plan
    status = prep.prepare(source, tmp_path / "b", "fmhct", fmt="trt", device="gpu")
    assert (status.serving, status.engine) == ("onnx-gpu", "fallback")
    assert re.search(why, status.reason)
    config = parse((tmp_path / "b" / "fmhct" / "config.pbtxt").read_text())
    assert (config.platform, config.default_model_filename) == ("onnxruntime_onnx", "model.onnx")
    with pytest.raises(prep.PrepareError, match="fallback disabled"):
        prep.prepare(source, tmp_path / "c", "fmhct", fmt="trt", device="gpu", fallback=False)


def test_prebuilt_engine_with_onnx_serves_onnx_without_a_gpu(prep: ModuleType, tmp_path: Path) -> None:
    source = make_repo(tmp_path / "src", target="trt", versions=(1,))
    (source / "fmhct" / "1" / "model.onnx").write_bytes(b"onnx v1")
    status = prep.prepare(source, tmp_path / "m", "fmhct", fmt="onnx", device="cpu")
    assert (status.serving, status.engine) == ("onnx-cpu", "fallback")
    config = parse((tmp_path / "m" / "fmhct" / "config.pbtxt").read_text())
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_tampered_prebuilt_engine_is_not_served(prep: ModuleType, tmp_path: Path) -> None:
    source = make_repo(tmp_path / "src", target="trt", versions=(1,))
    (source / "fmhct" / "1" / "model.plan").write_bytes(b"another plan")
    with pytest.raises(prep.PrepareError, match="sha256 mismatch"):
        prep.prepare(source, tmp_path / "m", "fmhct", fmt="trt", device="gpu")


@pytest.mark.parametrize("gate", ["failed", "skipped", None])
def test_cached_engine_without_a_passed_gate_is_rebuilt(
    prep: ModuleType, tmp_path: Path, gate: str | None
) -> None:
    source, cache = make_repo(tmp_path / "src", target="onnx"), tmp_path / "cache"
    old = FakeEngines(prep, gate=gate)
    kwargs = {"fmt": "trt", "device": "gpu", "cache": cache, "probe": old.probe}
    # A builder that leaves an ungated engine is not trusted either: ONNX Runtime is served instead.
    status = prep.prepare(source, tmp_path / "a", "fmhct", builder=old.build, **kwargs)
    assert (status.serving, status.engine) == ("onnx-gpu", "fallback")
    assert "does not check out" in status.reason
    (entry,) = [p.parent for p in cache.rglob("model.plan")]
    assert prep.cached_plan_ok(entry, prep.sha256_file(source / "fmhct" / "2" / "model.onnx"), "10.14.1.48")
    new = FakeEngines(prep)
    status = prep.prepare(source, tmp_path / "b", "fmhct", builder=new.build, **kwargs)
    assert (status.serving, status.engine, new.builds) == ("trt", "built", 1)


def test_reference_travels_with_the_version_dir(prep: ModuleType, tmp_path: Path) -> None:
    """build-engine finds model.reference.npz beside the copied model.onnx (its default --reference)."""
    source = make_repo(tmp_path / "src", target="onnx")
    (source / "fmhct" / "2" / "model.reference.npz").write_bytes(b"npz")
    seen: list[bool] = []

    def build(onnx: Path, plan: Path, settings, timing: Path | None) -> None:
        seen.append(onnx.with_name("model.reference.npz").read_bytes() == b"npz")
        FakeEngines(prep).build(onnx, plan, settings, timing)

    status = prep.prepare(
        source, tmp_path / "m", "fmhct", fmt="trt", device="gpu", cache=tmp_path / "c",
        probe=FakeEngines(prep).probe, builder=build,
    )  # fmt: skip
    assert seen == [True] and status.engine == "built"
    assert (tmp_path / "m" / "fmhct" / "2" / "model.reference.npz").read_bytes() == b"npz"


# --- serve -----------------------------------------------------------------------------------------------


def trt_repo(
    prep: ModuleType, tmp_path: Path, built_with: str, onnx: bool = True, gate: str | None = "passed"
) -> Path:
    root = make_repo(tmp_path / "models", target="trt", versions=(3,))
    write_plan_meta(root / "fmhct" / "3", gate=gate, tensorrt_version=built_with)
    if onnx:
        (root / "fmhct" / "3" / "model.onnx").write_bytes(b"onnx")
    return root


def test_engine_from_this_tensorrt_is_served(prep: ModuleType, tmp_path: Path) -> None:
    root = trt_repo(prep, tmp_path, "10.14.1.48")
    assert prep.check_engine(root, "fmhct", "10.14.1") is None
    assert prep.config_target((root / "fmhct" / "config.pbtxt").read_text()) == "trt"


def test_engine_from_another_tensorrt_falls_back(prep: ModuleType, tmp_path: Path) -> None:
    root = trt_repo(prep, tmp_path, "10.13.3.9")
    note = prep.check_engine(root, "fmhct", "10.14.1.48")
    assert note and "10.13.3.9" in note
    assert parse((root / "fmhct" / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
    no_onnx = trt_repo(prep, tmp_path / "x", "10.13.3.9", onnx=False)
    with pytest.raises(prep.PrepareError, match=r"no model\.onnx"):
        prep.check_engine(no_onnx, "fmhct", "10.14.1.48")
    assert "unchecked" in prep.check_engine(trt_repo(prep, tmp_path / "y", "10.13.3.9"), "fmhct", None)


@pytest.mark.parametrize("local_version", ["10.14.1.48", None])
def test_engine_that_failed_the_gate_falls_back_at_serve_time(
    prep: ModuleType, tmp_path: Path, local_version: str | None
) -> None:
    root = trt_repo(prep, tmp_path, "10.14.1.48", gate="failed")
    note = prep.check_engine(root, "fmhct", local_version)
    assert note and "parity gate" in note
    assert parse((root / "fmhct" / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
    status = json.loads((root / "fmhct" / "serving_status.json").read_text())
    assert (status["serving"], status["engine"]) == ("onnx-gpu", "fallback")
    no_onnx = trt_repo(prep, tmp_path / "x", "10.14.1.48", onnx=False, gate="skipped")
    with pytest.raises(prep.PrepareError, match=r"--no-parity-gate.*no model\.onnx"):
        prep.check_engine(no_onnx, "fmhct", local_version)


def test_local_tensorrt_version(prep: ModuleType, tmp_path: Path) -> None:
    assert prep.local_tensorrt_version({"TRT_VERSION": "10.14.1.48"}, roots=[str(tmp_path)]) == "10.14.1.48"
    for name in ("libnvinfer.so.10", "libnvinfer.so.10.14.1", "libnvinfer.so.10.9.0"):
        (tmp_path / name).touch()
    assert prep.local_tensorrt_version({}, roots=[str(tmp_path)]) == "10.14.1"
    assert prep.local_tensorrt_version({}, roots=[str(tmp_path / "none")]) is None
    assert prep.same_tensorrt("10.14.1.48", "10.14.1") and not prep.same_tensorrt("10.14.1", "10.14")


def test_serve_execs_triton_with_admin_apis_restricted(tmp_path: Path) -> None:
    """The real CLI: prepare (onnx on CPU), then serve, which execs the given command."""
    make_repo(tmp_path / "src", target="cpu")
    models = tmp_path / "models"
    prepared = subprocess.run(
        [sys.executable, str(SCRIPT), "prepare", "--source", str(tmp_path / "src"), "--dest", str(models),
         "--model", "fmhct", "--format", "onnx", "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    assert "serving fmhct v2 as onnx-cpu" in prepared.stderr
    key = tmp_path / "admin-key"
    key.write_text("s3cr3t-admin-key-0123456789\n")
    echo = "import json, sys; print(json.dumps(sys.argv[1:]))"
    served = subprocess.run(
        [sys.executable, str(SCRIPT), "serve", "--repository", str(models), "--model", "fmhct",
         "--admin-key-file", str(key), "--", sys.executable, "-c", echo, "--model-repository=/models"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    argv = json.loads(served.stdout)
    restricted = (
        "model-repository,shared-memory,statistics,trace,logging:admin-key=s3cr3t-admin-key-0123456789"
    )
    assert argv == [
        "--model-repository=/models",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
    ]
    key.write_text("short")
    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "serve", "--repository", str(models), "--model", "fmhct",
         "--admin-key-file", str(key), "--", sys.executable, "-c", "pass"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "admin key" in refused.stderr
