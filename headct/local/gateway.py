"""One gateway process — `python -m api`, the production entry point — on a local address: what
`make serve`, the test suites and the benchmarks start, beside the tritonserver of headct/local/triton.py.

Ports are free ones unless given, so any number of gateways (and `make serve`) can run side by side.
`settings` are ``HEADCT_*`` variables on top of the caller's environment; the gateway reads them with
pydantic-settings like in production.

`exit_with_parent=True` (what `python -m headct.local.serve` sets) has the kernel send the gateway SIGTERM
when the process that started it is gone, however it went (SIGKILL included): the gateway then drains and
exits as on any SIGTERM (api/lifecycle.py) instead of answering 503 on its port forever. It is needed
because the gateway runs in its own session, out of reach of signals sent to the launcher's group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from headct import contract
from headct.local.triton import free_port, parent_death_signal

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LocalGateway:
    """A `python -m api` process talking to the Triton at `triton_grpc_url` (``host:port``)."""

    triton_grpc_url: str
    settings: dict[str, str] = field(default_factory=dict)
    model_name: str = contract.DEFAULT_MODEL_NAME
    address: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    log_path: Path | None = None  # stdout + stderr; None: this process's own (the terminal)
    exit_with_parent: bool = False  # SIGTERM (a drain) from the kernel when the starting process is gone
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the gateway was not started")
        return self.process.pid

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HEADCT_TRITON_GRPC_URL=self.triton_grpc_url,
            HEADCT_MODEL_NAME=self.model_name,
            HEADCT_HOST=self.address,
            HEADCT_PORT=str(self.port),
            HEADCT_GRPC_PORT=str(self.grpc_port),
        )
        env.update(self.settings)
        return env

    def start(self) -> None:
        # Its own session: a terminal's Ctrl-C reaches only our launcher, which stops the gateway with
        # SIGTERM, so requests in flight are drained instead of cut.
        command = [sys.executable, "-m", "api"]
        preexec = parent_death_signal() if self.exit_with_parent else None
        if self.log_path is None:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.environment(), start_new_session=True, preexec_fn=preexec
            )
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )

    def wait_ready(self, timeout_s: float = 90.0, *, ready: bool = True) -> None:
        """Until /readyz (or /livez when `ready` is False) answers 200; raise with the log otherwise."""
        path = "/readyz" if ready else "/livez"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}{path}", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway {path} not 200 after {timeout_s:.0f} s:\n{self.log_text()}")
            time.sleep(0.3)

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the gateway drains, api/lifecycle.py), then SIGKILL after `timeout_s`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
