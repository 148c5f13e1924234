"""`make serve`'s launcher (`python -m headct.local.serve`): Triton, then the production gateway, both ready;
SIGTERM (a supervisor, or Ctrl-C) stops the gateway first, then Triton, and leaves nothing running."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import pytest

from headct.local.gateway import LocalGateway
from tests.stack import start_serve

pytestmark = pytest.mark.integration


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_serve_starts_triton_and_the_gateway_and_stops_both(tmp_path: Path) -> None:
    serve, ports, log = start_serve(tmp_path)
    try:
        # The same readiness wait the suites use, on the gateway `serve` started.
        LocalGateway("unused", port=ports["port"], log_path=log, process=serve).wait_ready(180)
        models = httpx.get(f"http://127.0.0.1:{ports['port']}/v1/models", timeout=30)
        assert models.status_code == 200 and models.json()["models"], models.text
        assert listening(ports["grpc-port"]) and listening(ports["triton-grpc"])
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=90) == 0, log.read_text(errors="replace")
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    text = log.read_text(errors="replace")
    assert text.index("stopping the gateway") < text.index("stopping tritonserver")
    for port in ports.values():  # gateway (HTTP, gRPC) and Triton are gone
        assert not listening(port), port
