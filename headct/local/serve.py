"""`python -m headct.local.serve`: the local stack in the foreground — tritonserver (CPU, Python backend)
on the model repository, then the gateway (`python -m api`, as in production). Ctrl-C stops both, the gateway
first (it drains what is in flight). SIGTERM does the same.

Both are tied to this launcher's life: if it is killed outright (SIGKILL after a supervisor's SIGTERM,
`timeout -s KILL`, a CI runner ending the job), the kernel sends each of them SIGTERM (Linux
``PR_SET_PDEATHSIG``; see headct/local/triton.py): the gateway drains and exits, tritonserver exits, and
their ports are free for the next `make serve` within seconds.

This is what `make serve` runs once the model repository exists.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from headct import contract
from headct.local.gateway import LocalGateway
from headct.local.triton import LocalTriton, TritonPorts, prepare_triton_home

ROOT = Path(__file__).resolve().parents[2]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m headct.local.serve", description=__doc__)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument(
        "--model-name", default=os.environ.get("HEADCT_MODEL_NAME", contract.DEFAULT_MODEL_NAME)
    )
    parser.add_argument("--host", default=os.environ.get("HEADCT_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("HEADCT_PORT", "8080")))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("HEADCT_GRPC_PORT", "50051")))
    parser.add_argument("--triton-http-port", type=int, default=8000)
    parser.add_argument("--triton-grpc-port", type=int, default=8001)
    parser.add_argument("--triton-metrics-port", type=int, default=8002)
    parser.add_argument("--triton-log", type=Path, default=ROOT / "build" / "logs" / "tritonserver.log")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not (args.repository / args.model_name / "config.pbtxt").is_file():
        print(f"no model {args.model_name!r} in {args.repository}; run `make export` or `make serve`")
        return 2
    started = time.monotonic()
    triton = LocalTriton(
        home=prepare_triton_home(ROOT / "build" / "tritonserver"),
        repository=args.repository,
        ports=TritonPorts(args.triton_http_port, args.triton_grpc_port, args.triton_metrics_port),
        address=args.host,
        log_path=args.triton_log,
        exit_with_parent=True,
    )
    print(f"starting tritonserver (log: {args.triton_log})", flush=True)
    triton.start()
    # SIGTERM (e.g. from a supervisor) stops the stack like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    gateway: LocalGateway | None = None
    try:
        triton.wait_ready(args.model_name)
        print(f"triton ready in {time.monotonic() - started:.1f} s; starting the gateway", flush=True)
        gateway = LocalGateway(
            f"{args.host}:{args.triton_grpc_port}",
            model_name=args.model_name,
            address=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            exit_with_parent=True,
        )
        gateway.start()
        gateway.wait_ready(timeout_s=120.0, ready=False)
        print(
            f"gateway: http://{args.host}:{args.port}  (docs: /docs, findings: POST /v1/predict; "
            f"gRPC on {args.grpc_port})",
            flush=True,
        )
        assert gateway.process is not None
        code = gateway.process.wait()
        print(f"the gateway exited with {code}", flush=True)
        return code
    except KeyboardInterrupt:
        pass
    finally:
        if gateway is not None:
            print("stopping the gateway (drains requests in flight)", flush=True)
            gateway.stop()
        print("stopping tritonserver", flush=True)
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
