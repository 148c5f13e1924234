"""Run the tritonserver 2.51 binary that ships inside the `nvidia-pytriton` wheel, on a normal model
repository, with the Python backend on the CPU.

This is the embedded local default (development, CI, CPU-only hosts). On GPU clusters the official Triton
image serves the same repository layout; see the Helm chart.

The wheel keeps one Python-backend stub per Python version; Triton looks for the stub next to the backend
library, so we assemble a private copy of the server tree ("Triton home") with the stub for the running
interpreter, and give the stub this interpreter's libpython and site-packages.

`exit_with_parent=True` (what `python -m headct.local.serve` sets) ties the server's life to the process that
started it: the kernel sends it SIGTERM when that process is gone, however it went (SIGKILL included),
so it drains and exits instead of holding its ports forever; see `parent_death_signal`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO

_STAMP = ".headct-triton-home"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _pytriton_dir() -> Path:
    import pytriton  # only for its location; importing it starts nothing

    return Path(pytriton.__file__).resolve().parent


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def prepare_triton_home(dest: Path) -> Path:
    """Assemble (once per pytriton version and Python version) a runnable copy of tritonserver at `dest`."""
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stamp = f"nvidia-pytriton=={metadata.version('nvidia-pytriton')} python=={python_version}"
    stamp_file = dest / _STAMP
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return dest
    source = _pytriton_dir() / "tritonserver"
    stub = source / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton carries no Python-backend stub for Python {python_version}")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, dest / "backends" / "python" / stub.name)
    stamp_file.write_text(stamp)
    return dest


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it): for servers started by tests and
    benchmarks beside a running `make serve`."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def parent_death_signal(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` after which the kernel sends the child `signum` as soon as
    this process is gone, however it went (SIGKILL, the OOM killer): Linux's ``PR_SET_PDEATHSIG``, which
    survives `exec` and `start_new_session`. None where it cannot be used: not Linux, or not the main
    thread — the signal follows the *thread* that forked, so a child started from a short-lived thread
    would be stopped when that thread ends.

    Works for any binary (tritonserver runs no Python of ours). The child checks once, after setting it,
    that its parent is still the one that forked it, and exits if not (it died in between)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    number = int(signum)

    def set_parent_death_signal() -> None:
        if prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody will signal us
            os._exit(128 + number)

    return set_parent_death_signal


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> TritonPorts:
        """Three free ports on 127.0.0.1 instead of the defaults."""
        return cls(free_port(), free_port(), free_port())


@dataclass
class LocalTriton:
    """One tritonserver process serving `repository` on `address` (127.0.0.1 by default)."""

    home: Path
    repository: Path
    ports: TritonPorts = field(default_factory=TritonPorts)
    address: str = "127.0.0.1"
    log_path: Path | None = None
    exit_with_parent: bool = False  # SIGTERM from the kernel when the starting process is gone
    process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            str(self.home / "bin" / "tritonserver"),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={self.home / 'backends'}",
            f"--cache-directory={self.home / 'caches'}",
            f"--http-address={self.address}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            # The config.pbtxt we write is the whole truth; don't let backends amend it.
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            # No pinned (page-locked) host memory without a CUDA driver.
            "--pinned-memory-pool-byte-size=0",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [
            str(_pytriton_dir().parent / "nvidia_pytriton.libs"),
            str(sysconfig.get_config_var("LIBDIR")),
        ]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        # The stub embeds the interpreter's libpython but must see this environment's packages
        # (numpy, onnxruntime) to run the Python-backend model.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_site_packages()), env.get("PYTHONPATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self) -> None:
        stdout: IO[bytes] | int
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            stdout = self.log_path.open("ab")
        else:
            stdout = subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            preexec_fn=parent_death_signal() if self.exit_with_parent else None,
        )

    def wait_ready(self, model_name: str, timeout_s: float = 180.0) -> None:
        """Block until `model_name` is ready (warm-up included) or raise with the log's tail."""
        url = f"http://{self.address}:{self.ports.http}/v2/models/{model_name}/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"model {model_name!r} not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: Triton drains in-flight requests, then exits
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
