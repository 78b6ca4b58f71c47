"""Local IPC between the agent, the training process and `trainctl checkpoint-now`.

A unix stream socket speaking JSON lines. Peers:

* the training process's Checkpointer (`AgentConnection`): says `hello`, reports
  `progress`, `durable` checkpoints (with `answers`: the newest request id its snapshot
  answers) and `checkpoint-failed`, asks `fence` ("am I still current?") before it
  writes; the agent pushes `checkpoint` requests to it (`id`, `stop`, `deadline`);
* `trainctl checkpoint-now` (`request_checkpoint`), run by the SSM document: sends
  `checkpoint-now` (`mode`: stop | continue, `deadline`) and waits for `checkpoint-done`.

Once the attempt's final checkpoint is on the job row, the agent also leaves its answer
beside the socket (`final_answer_path`): training has stopped and the agent exits, yet
the same notice can still ask again (the interruption handler retrying after a failure
sends a second SSM command), and must get that same checkpoint, not an error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, cast

logger = logging.getLogger("trainctl.agent.ipc")

_MAX_LINE = 1 << 20


class Peer:
    """One connected client, as the agent sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self.pid: int | None = None
        self.kind = "unknown"
        self.closed = False

    def send(self, message: dict[str, Any]) -> bool:
        data = (json.dumps(message) + "\n").encode()
        with self._lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed = True
                return False

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


Handler = Callable[[Peer, dict[str, Any]], None]


class IpcServer:
    """Accepts clients on a unix socket; calls `handler(peer, message)` per line."""

    def __init__(
        self, path: str, handler: Handler, on_disconnect: Callable[[Peer], None] | None = None
    ) -> None:
        self.path = path
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._sock: socket.socket | None = None
        self._peers: list[Peer] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        # Only root/the agent's user and its group (the SSM agent runs as root).
        os.chmod(self.path, 0o660)
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._accept_loop, name="trainctl-ipc-accept", daemon=True).start()

    def peers(self) -> list[Peer]:
        with self._lock:
            return [p for p in self._peers if not p.closed]

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            peer = Peer(conn)
            with self._lock:
                self._peers.append(peer)
            threading.Thread(target=self._serve, args=(peer,), name="trainctl-ipc-peer", daemon=True).start()

    def _serve(self, peer: Peer) -> None:
        try:
            for message in _read_lines(peer.sock):
                try:
                    self._handler(peer, message)
                except Exception:
                    logger.exception("ipc handler failed for %s", message.get("op"))
        finally:
            peer.close()
            with self._lock:
                if peer in self._peers:
                    self._peers.remove(peer)
            if self._on_disconnect:
                self._on_disconnect(peer)

    def stop(self) -> None:
        self._stopped.set()
        if self._sock is not None:
            self._sock.close()
        for peer in self.peers():
            peer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _read_lines(sock: socket.socket) -> Any:
    buffer = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return
        if not chunk:
            return
        buffer += chunk
        if len(buffer) > _MAX_LINE and b"\n" not in buffer:
            logger.warning("ipc: dropping an over-long message")
            buffer = b""
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("ipc: ignoring a line that is not JSON")
                continue
            if isinstance(message, dict):
                yield message


# --- the training process's side ---------------------------------------------------------------


class AgentConnection:
    """The Checkpointer's link to the agent. Never raises into training: if the agent
    goes away, the training process keeps checkpointing on its own."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiters: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._target: Any = None
        # Requests that arrived between `hello` and `attach` (the Checkpointer still being
        # built): kept for it, not dropped (a notice during start-up must not be lost).
        self._early: list[dict[str, Any]] = []
        self._target_lock = threading.Lock()
        self._broken = False
        threading.Thread(target=self._read_loop, name="trainctl-agent-link", daemon=True).start()

    @classmethod
    def try_connect(cls, path: str) -> AgentConnection | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            logger.warning("agent socket %s unreachable (%s): checkpointing without an agent", path, exc)
            sock.close()
            return None
        link = cls(sock)
        link.send({"op": "hello", "pid": os.getpid(), "kind": "checkpointer"})
        return link

    def attach(self, checkpointer: Any) -> None:
        """Route the agent's `checkpoint` requests to `checkpointer.request(...)`."""
        with self._target_lock:
            self._target = checkpointer
            early, self._early = self._early, []
        for message in early:
            self._deliver(checkpointer, message)

    @staticmethod
    def _deliver(target: Any, message: dict[str, Any]) -> None:
        ref = message.get("id")
        target.request(
            stop=bool(message.get("stop")),
            deadline=message.get("deadline"),
            ref=int(ref) if isinstance(ref, int) else None,
        )

    def send(self, message: dict[str, Any]) -> None:
        if self._broken:
            return
        data = (json.dumps(message) + "\n").encode()
        with self._lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._broken = True
                logger.warning("agent link lost (%s): continuing without the agent", exc)

    def is_current(self, timeout: float) -> bool | None:
        """Ask the agent whether this attempt is still the job's current one (None: no answer)."""
        if self._broken:
            return None
        ident = next(self._ids)
        event, box = threading.Event(), cast(list[Any], [])
        self._waiters[ident] = (event, box)
        self.send({"op": "fence", "id": ident})
        answered = event.wait(timeout)
        self._waiters.pop(ident, None)
        return bool(box[0]) if answered and box and box[0] is not None else None

    def _read_loop(self) -> None:
        for message in _read_lines(self._sock):
            op = message.get("op")
            if op == "checkpoint":
                with self._target_lock:
                    target = self._target
                    if target is None:
                        self._early.append(message)
                if target is not None:
                    self._deliver(target, message)
            elif op == "fence-reply":
                waiter = self._waiters.get(int(message.get("id", 0)))
                if waiter:
                    waiter[1].append(message.get("current"))
                    waiter[0].set()
        self._broken = True

    def close(self) -> None:
        self._broken = True
        with contextlib.suppress(OSError):
            self._sock.close()


# --- trainctl checkpoint-now ------------------------------------------------------------------------


class CheckpointRequestFailed(RuntimeError):
    """The agent answered that the checkpoint failed, or did not answer in time."""


def final_answer_path(socket_path: str) -> str:
    return socket_path + ".final"


def write_final_answer(socket_path: str, answer: dict[str, Any]) -> None:
    """Leave the `checkpoint-done` answer of the attempt's final checkpoint (atomically)."""
    path = final_answer_path(socket_path)
    partial = path + ".tmp"
    with open(partial, "w") as handle:
        json.dump(answer, handle)
    os.chmod(partial, 0o640)
    os.replace(partial, path)


def clear_final_answer(socket_path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(final_answer_path(socket_path))


def read_final_answer(socket_path: str, job_id: str | None) -> dict[str, Any] | None:
    """The final checkpoint's answer an agent left for `job_id` (any job if None), if any."""
    try:
        with open(final_answer_path(socket_path)) as handle:
            answer = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(answer, dict) or (job_id is not None and answer.get("job_id") != job_id):
        return None
    return answer


def request_checkpoint(
    path: str, *, job_id: str | None, deadline: str | None, timeout: float, mode: str = "stop"
) -> dict[str, Any]:
    """Ask the agent for a checkpoint now and wait until it is durable; returns its answer.

    `mode` "stop": training stops after it (an interruption notice); "continue": it goes
    on (a rebalance recommendation). Once the agent has exited after the attempt's final
    checkpoint, the answer is that checkpoint (there is nothing newer, training stopped).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        final = read_final_answer(path, job_id)
        if final is not None:
            return final
        raise CheckpointRequestFailed(f"agent socket {path} unreachable: {exc}") from exc
    try:
        sock.sendall(
            (
                json.dumps({"op": "checkpoint-now", "job_id": job_id, "deadline": deadline, "mode": mode})
                + "\n"
            ).encode()
        )
        try:
            for message in _read_lines_blocking(sock):
                if message.get("op") == "checkpoint-done":
                    if not message.get("ok"):
                        raise CheckpointRequestFailed(str(message.get("error", "checkpoint failed")))
                    return message
        except TimeoutError as exc:
            raise CheckpointRequestFailed(f"no durable checkpoint within {timeout:.0f} s") from exc
        final = read_final_answer(path, job_id)  # it exited after the final checkpoint meanwhile
        if final is not None:
            return final
        raise CheckpointRequestFailed("the agent closed the connection before the checkpoint was durable")
    finally:
        sock.close()


def _read_lines_blocking(sock: socket.socket) -> Any:
    # Like _read_lines, but lets socket.timeout surface (the caller has a deadline).
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(message, dict):
                    yield message
