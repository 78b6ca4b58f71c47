"""An HTTP inference server that drains on the interruption notice.

On the notice (the agent's IPC message or SIGUSR1, or SIGTERM) it stops accepting work —
new requests get 503 so a load balancer retries elsewhere — lets in-flight requests
finish, records a (tiny) checkpoint so the agent's handshake completes, and exits 0.

    python training/examples/inference_server.py --port 8080
    curl 'localhost:8080/predict?x=1.5'
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from trainctl.checkpoint import Checkpointer, CheckpointFailed

log = logging.getLogger("inference_server")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, Handler)
        self.draining = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.served = 0


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/health":
            self._reply(
                503 if self.server.draining.is_set() else 200, {"draining": self.server.draining.is_set()}
            )
            return
        if url.path != "/predict":
            self._reply(404, {"error": "not found"})
            return
        with self.server.lock:
            if self.server.draining.is_set():
                refused = True
            else:
                refused = False
                self.server.in_flight += 1
        if refused:
            self._reply(503, {"error": "draining: instance is being reclaimed"}, close=True)
            return
        try:
            query = parse_qs(url.query)
            x = float(query.get("x", ["0"])[0])
            time.sleep(float(query.get("delay", ["0"])[0]))  # simulated model latency
            self._reply(200, {"y": 2.0 * x + 1.0})
        finally:
            with self.server.lock:
                self.server.in_flight -= 1
                self.server.served += 1

    def _reply(self, code: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description="draining inference server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--drain-seconds", type=float, default=90.0)
    parser.add_argument(
        "--checkpoint-timeout",
        type=float,
        default=None,
        help="seconds the server waits for a checkpoint without a stop (default: the request's deadline)",
    )
    args = parser.parse_args(argv)

    ckpt = Checkpointer.from_env(framework="generic")
    server = Server((args.host, args.port))
    signal.signal(signal.SIGTERM, lambda *_: ckpt.request(stop=True))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"listening on {server.server_address[1]}", flush=True)

    while not ckpt.stop_requested:
        if ckpt.due(server.served):  # also reports progress for the agent's heartbeats
            # A checkpoint without a stop (rebalance recommendation): record where the
            # server is and keep serving; only a notice drains it. One that fails (S3
            # unreachable for a while) is logged, not fatal: the server keeps serving, and
            # the next one is due again; only a stop's checkpoint must succeed.
            try:
                ckpt.save_now({"served": server.served}, server.served, timeout=args.checkpoint_timeout)
                log.info("checkpointed at %d requests served; still serving", server.served)
            except CheckpointFailed as exc:
                if ckpt.stop_requested:
                    raise
                log.warning("checkpoint at %d requests served failed (%s); still serving", server.served, exc)
        time.sleep(0.05)
    server.draining.set()
    log.info("notice received: refusing new requests, draining %d in flight", server.in_flight)
    deadline = time.monotonic() + args.drain_seconds
    while server.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    ckpt.save_now({"served": server.served}, server.served)
    server.shutdown()
    ckpt.close()
    log.info("drained: %d requests served", server.served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
