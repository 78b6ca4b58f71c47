"""A fake IMDSv2 on 127.0.0.1 for tests and the offline rehearsal.

Speaks the same paths and token rules as the real service (PUT token, then GETs with it;
401 without), so the agent's real IMDS client is what gets exercised. Point a process at
it with `AWS_EC2_METADATA_SERVICE_ENDPOINT=<fake.url>`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from trainctl.agent import imds


class FakeImds:
    def __init__(
        self,
        instance_id: str = "i-0123456789abcdef0",
        tags: dict[str, str] | None = None,
        *,
        instance_type: str | None = None,
        zone: str | None = None,
        life_cycle: str | None = None,
        token_status: int = 200,
    ) -> None:
        self.instance_id = instance_id
        self.tags = dict(tags or {})
        self.instance_type = instance_type
        self.zone = zone
        self.life_cycle = life_cycle
        # Not 200: every token request is refused with it (403: IMDS turned off; 405: a
        # request through a proxy), so no GET can carry a token.
        self.token_status = token_status
        self.instance_action: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        self.tokens: set[str] = set()
        self.requests: list[str] = []
        # The next this many requests get no answer until the client's timeout has passed
        # (a busy instance at boot); then the connection is closed.
        self.unanswered = 0
        self.unanswered_seconds = 1.5
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:  # keep test output quiet
                pass

            def do_PUT(self) -> None:
                fake.requests.append(f"PUT {self.path}")
                if fake._leave_unanswered():
                    return
                if self.path != imds.TOKEN_PATH or not self.headers.get(imds.TOKEN_TTL_HEADER):
                    self._send(400, "")
                    return
                if fake.token_status != 200:
                    self._send(fake.token_status, "")
                    return
                token = secrets.token_hex(16)
                fake.tokens.add(token)
                self._send(200, token)

            def do_GET(self) -> None:
                fake.requests.append(f"GET {self.path}")
                if fake._leave_unanswered():
                    return
                if self.headers.get(imds.TOKEN_HEADER) not in fake.tokens:
                    self._send(401, "")
                    return
                body = fake.answer(self.path)
                self._send(404, "Not Found") if body is None else self._send(200, body)

            def _send(self, code: int, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # The instance's processes are SIGKILLed mid-request at the deadline, as on EC2:
                # a client gone away is expected, not an error to print.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-imds", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def answer(self, path: str) -> str | None:
        if path == imds.INSTANCE_ID_PATH:
            return self.instance_id
        if path == imds.INSTANCE_ACTION_PATH and self.instance_action:
            return json.dumps(self.instance_action)
        if path == imds.REBALANCE_PATH and self.rebalance:
            return json.dumps(self.rebalance)
        if path == imds.INSTANCE_TYPE_PATH:
            return self.instance_type
        if path == imds.ZONE_PATH:
            return self.zone
        if path == imds.LIFE_CYCLE_PATH:
            return self.life_cycle
        if path.startswith(imds.TAGS_PATH):
            return self.tags.get(path[len(imds.TAGS_PATH) :])
        return None

    def notice(self, when: datetime, action: str = "terminate") -> None:
        """Publish a Spot interruption notice (instance-action)."""
        self.instance_action = {"action": action, "time": _z(when)}

    def recommend_rebalance(self, when: datetime) -> None:
        self.rebalance = {"noticeTime": _z(when)}

    def _leave_unanswered(self) -> bool:
        with self._lock:
            if self.unanswered <= 0:
                return False
            self.unanswered -= 1
        time.sleep(self.unanswered_seconds)
        return True

    def start(self) -> FakeImds:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeImds:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _z(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
