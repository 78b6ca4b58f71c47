"""Checkpoints over a real HTTP S3 endpoint (a moto server on 127.0.0.1), with faults:
kill -9 mid-multipart-upload, an urgent save under load, and S3 becoming unreachable
while the agent supervises a training job."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import boto3
import pytest
import torch
from botocore.config import Config
from moto import mock_aws
from moto.server import ThreadedMotoServer

from trainctl import runtime_env
from trainctl.agent import cli
from trainctl.agent.supervisor import Agent, AgentConfig
from trainctl.checkpoint import Checkpointer
from trainctl_core import checkpoints as ck
from trainctl_core import jobs
from trainctl_core.store import JobStore
from trainctl_core.tables import jobs_table_request

from .conftest import BUCKET, REGION
from .test_examples_and_faults import kill_9_cycles

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "training", "examples", "train.py")
JOB = "s3-job"
INSTANCE = "i-0ddddddddddddddd4"
TABLE = "trainctl-jobs"


class SwitchableProxy:
    """A TCP proxy in front of an endpoint that can be cut (every connection dropped and
    new ones closed at once, like a lost route) and restored, or made to drop the next
    few connections only (a transient outage)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.down = False
        self.failing = 0  # connections still to drop
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self.down = True
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.down = False

    def fail_next(self, connections: int) -> None:
        """Drop the open connections and the next `connections` new ones."""
        with self._lock:
            self.failing = connections
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                drop = self.down or self.failing > 0
                if self.failing > 0:
                    self.failing -= 1
                    self.dropped += 1
            if drop:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def s3_server() -> Iterator[tuple[str, Any]]:
    """A moto S3 server on a free port, and a client to it (for setup and inspection)."""
    with mock_aws():  # in-process calls (DynamoDB) share the server's backends
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        client = boto3.client("s3", region_name=REGION, endpoint_url=url)
        client.create_bucket(Bucket=BUCKET)
        try:
            yield url, client
        finally:
            server.stop()


def _manifest_steps(client: Any, job: str) -> list[int]:
    storage = ck.S3CheckpointStorage(client, BUCKET, job)
    return [c.step for c in storage.list_checkpoints() if storage.read_manifest(c) is not None]


def test_kill_9_mid_multipart_upload_restores_a_verified_checkpoint(
    tmp_path: Any, s3_server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, client = s3_server
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)  # the child inherits it
    kill_9_cycles(
        tmp_path, 99, 5, lambda: ck.S3CheckpointStorage(client, BUCKET, "kill"), child_args=[BUCKET]
    )
    # Killed uploads left files without a manifest behind (or retention cleaned them):
    # either way, nothing without a manifest was restored above.
    assert _manifest_steps(client, "kill")


def test_save_now_under_load_returns_only_once_the_manifest_is_in_s3(
    tmp_path: Any, s3_server: tuple[str, Any]
) -> None:
    _url, client = s3_server
    storage = ck.S3CheckpointStorage(client, BUCKET, "load")
    steps = {"n": 0}
    stop = threading.Event()

    def train() -> None:  # a CPU training loop running all along
        a = torch.randn(256, 256)
        while not stop.is_set():
            a = torch.tanh(a @ a.T / 256)
            steps["n"] += 1

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    state = {"w": torch.randn(12_000_000), "m": torch.zeros(12_000_000)}  # ~96 MB: multipart
    with Checkpointer(storage, job_id="load", staging_dir=str(tmp_path / "st")) as ckpt:
        # Given a periodic checkpoint on its way to S3
        ckpt.save(state, 1)
        time.sleep(0.1)
        # When the notice arrives and the loop saves with priority
        ckpt.request(stop=True)
        before = steps["n"]
        state["w"].add_(1.0)
        durable = ckpt.save(state, 2)
        # Then at the moment it returns, the manifest is in S3 and the checkpoint verifies
        assert durable is not None and durable.step == 2 and durable.urgent
        head = client.head_object(Bucket=BUCKET, Key=durable.prefix + ck.MANIFEST_NAME)
        assert head["ContentLength"] > 0
        outcome = ck.verify_checkpoint(
            storage, durable.checkpoint, job_id="load", dest_dir=str(tmp_path / "v")
        )
        assert not isinstance(outcome, str), outcome
        assert ckpt.should_stop()
        # And training kept running while the save was in flight
        assert steps["n"] > before
    stop.set()
    trainer.join(5)
    with Checkpointer(storage, job_id="load", staging_dir=str(tmp_path / "r")) as again:
        restored = again.restore()
    assert again.restored_step == 2 and torch.equal(restored["w"], state["w"])


def _until(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _jobs_table(ddb: Any) -> JobStore:
    ddb.create_table(**jobs_table_request(TABLE))
    store = JobStore(ddb, TABLE)
    spec = jobs.JobSpec(
        name=JOB,
        command=["python", "train.py"],
        pools=[jobs.CapacityPool(instance_type="c7i.large", subnet_id="subnet-0aaa1111")],
    )
    job = store.create(jobs.new_job(JOB, spec))
    store.apply(
        jobs.mark_launching(
            job,
            instance_id=INSTANCE,
            pool=None,
            resume_point=jobs.ResumePoint(kind=jobs.CheckpointKind.NONE),
            now=jobs.utcnow(),
        )
    )
    return store


def test_s3_unreachable_during_saves_retries_while_training_continues(
    tmp_path: Any, s3_server: tuple[str, Any]
) -> None:
    url, client = s3_server
    host, port = url.removeprefix("http://").split(":")
    proxy = SwitchableProxy((host, int(port)))
    store = _jobs_table(boto3.client("dynamodb", region_name=REGION))
    config = AgentConfig(
        job_id=JOB,
        instance_id=INSTANCE,
        command=[
            sys.executable,
            TRAIN,
            *("--steps", "1000000", "--step-seconds", "0.01", "--checkpoint-every", "20"),
            *("--output", str(tmp_path / "final.bin")),
        ],
        socket_path=str(tmp_path / "agent.sock"),
        child_env={
            runtime_env.CHECKPOINT_BUCKET: BUCKET,
            runtime_env.STAGING_DIR: str(tmp_path / "staging"),
            "AWS_ENDPOINT_URL": proxy.url,  # the child reaches S3 only through the proxy
            "PYTHONUNBUFFERED": "1",
        },
        imds_poll_seconds=0.2,
        heartbeat_seconds=0.3,
        resume_poll_seconds=0.1,
        log_tail_lines=100_000,
    )
    agent = Agent(config, store, handshake=None, imds=None)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", agent.run()), daemon=True)
    thread.start()
    try:

        def recorded() -> int:
            ref = store.get(JOB).last_checkpoint
            return ref.step if ref is not None else 0

        _until(recorded, what="a first durable checkpoint on the row")
        # When S3 becomes unreachable mid-run
        proxy.cut()
        time.sleep(1.0)  # a durable message already on its way reaches the row
        cut_step = int(store.raw(JOB).get("heartbeat_step", 0))
        time.sleep(3.0)
        # Then training continues (heartbeats advance by several checkpoint intervals)...
        progressed = int(store.raw(JOB)["heartbeat_step"])
        assert progressed >= cut_step + 40, (cut_step, progressed)
        # ...and the row shows the last *durable* step: the newest manifest in S3
        last_durable = recorded()
        assert max(_manifest_steps(client, JOB)) == last_durable
        assert last_durable < progressed
        # When S3 comes back, the retried upload lands and the row moves on
        proxy.restore()
        _until(lambda: recorded() > last_durable, what="a checkpoint after the outage")
        assert any("failed, retrying" in line for line in agent.log_tail)
        assert max(_manifest_steps(client, JOB)) >= recorded()
        # And the agent still takes an on-demand final checkpoint and stops cleanly
        rc = cli.checkpoint_now_main(["--job-id", JOB, "--socket", config.socket_path, "--timeout", "60"])
        assert rc == 0
        thread.join(60)
        assert result == {"rc": 0}
        final = store.get(JOB).final_checkpoint
        assert final is not None and final.step in _manifest_steps(client, JOB)
    finally:
        proxy.close()
        if agent.child is not None and agent.child.poll() is None:
            agent.child.kill()
        thread.join(10)


# --- restore: a transient outage is retried, a persistent one fails clearly -----------------


class FaultyRestoreStorage(ck.S3CheckpointStorage):
    """S3 storage through the proxy whose first `at` call (list / manifest / files) starts a
    transient outage: the proxy drops the next `connections` connections."""

    def __init__(self, client: Any, proxy: SwitchableProxy, at: str, connections: int) -> None:
        super().__init__(client, BUCKET, "restore")
        self.proxy, self.at, self.connections = proxy, at, connections

    def _maybe_fail(self, call: str) -> None:
        if call == self.at:
            self.at = ""  # once
            self.proxy.fail_next(self.connections)

    def list_checkpoints(self) -> list[ck.CheckpointId]:
        self._maybe_fail("list")
        return super().list_checkpoints()

    def read_manifest(self, checkpoint: ck.CheckpointId) -> bytes | None:
        self._maybe_fail("manifest")
        return super().read_manifest(checkpoint)

    def fetch(
        self, checkpoint: ck.CheckpointId, files: Sequence[ck.ManifestFile], dest_dir: str
    ) -> dict[str, str]:
        self._maybe_fail("files")
        return super().fetch(checkpoint, files, dest_dir)


def _proxied_client(proxy: SwitchableProxy) -> Any:
    # Two tries per request and short timeouts: botocore gives up on each request fast, so
    # the outage outlasts botocore's own retries, as a longer one does on AWS.
    config = Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", region_name=REGION, endpoint_url=proxy.url, config=config)


def _two_checkpoints(client: Any, tmp_path: Any) -> dict[str, Any]:
    storage = ck.S3CheckpointStorage(client, BUCKET, "restore")
    newest = {"step": 2, "w": torch.arange(2_000_000, dtype=torch.float32)}
    with Checkpointer(storage, job_id="restore", staging_dir=str(tmp_path / "saving")) as ckpt:
        ckpt.save_now({"step": 1, "w": torch.zeros(2_000_000)}, 1)
        ckpt.save_now(newest, 2)
    return newest


@pytest.mark.parametrize("at", ["list", "manifest", "files"])
@pytest.mark.parametrize("reserve", [True, False], ids=["one-pass", "two-pass"])
def test_a_transient_s3_outage_during_restore_is_retried_not_taken_for_corruption(
    tmp_path: Any, s3_server: tuple[str, Any], at: str, reserve: bool
) -> None:
    url, client = s3_server
    newest = _two_checkpoints(client, tmp_path)
    host, port = url.removeprefix("http://").split(":")
    proxy = SwitchableProxy((host, int(port)))
    try:
        # Given S3 unreachable for a while right when restore reads the listing, the
        # newest manifest or its files (longer than botocore's own retries last)
        storage = FaultyRestoreStorage(_proxied_client(proxy), proxy, at, connections=6)
        with Checkpointer(
            storage, job_id="restore", staging_dir=str(tmp_path / "r"), retry_initial_seconds=0.2
        ) as ckpt:
            state = ckpt.restore(reserve=reserve)
            # Then restore waited it out and took the newest checkpoint, intact: nothing was
            # skipped as corrupt, and it did not start fresh
            assert proxy.dropped == 6 and proxy.failing == 0  # the outage did happen
            assert ckpt.restored_step == 2 and ckpt.fresh_reason is None
            assert torch.equal(state["w"], newest["w"])
    finally:
        proxy.close()


def test_a_persistent_s3_outage_during_restore_fails_clearly_instead_of_starting_fresh(
    tmp_path: Any, s3_server: tuple[str, Any]
) -> None:
    from trainctl.checkpoint import RestoreFailed

    url, client = s3_server
    _two_checkpoints(client, tmp_path)
    host, port = url.removeprefix("http://").split(":")
    proxy = SwitchableProxy((host, int(port)))
    try:
        # Given S3 reachable for the listing, then gone for good
        storage = FaultyRestoreStorage(_proxied_client(proxy), proxy, "manifest", connections=10**9)
        ckpt = Checkpointer(
            storage,
            job_id="restore",
            staging_dir=str(tmp_path / "r"),
            retry_initial_seconds=0.1,
            restore_retry_seconds=1.0,
        )
        # Then restore fails with a typed error naming what it could not read
        with pytest.raises(RestoreFailed, match=r"could not read checkpoint s3://.*000000000002-a0/"):
            ckpt.restore()
        assert ckpt.fresh_reason is None and ckpt.restored is None
        ckpt.close(flush=False)
    finally:
        proxy.close()


def test_a_checkpoint_file_missing_from_s3_is_skipped_at_once(
    tmp_path: Any, s3_server: tuple[str, Any]
) -> None:
    _url, client = s3_server
    _two_checkpoints(client, tmp_path)
    # Given the newest checkpoint's data file gone (its manifest still there)
    client.delete_object(Bucket=BUCKET, Key="restore/ckpt/000000000002-a0/state.bin")
    storage = ck.S3CheckpointStorage(client, BUCKET, "restore")
    # Then that is an invalid checkpoint, not an outage: skipped by name, no retries
    with Checkpointer(
        storage, job_id="restore", staging_dir=str(tmp_path / "r"), restore_retry_seconds=0.0
    ) as ckpt:
        state = ckpt.restore()
        assert ckpt.restored_step == 1 and state["step"] == 1
