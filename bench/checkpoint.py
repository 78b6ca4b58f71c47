"""Checkpoint stall, durability and restore: trainctl's Checkpointer against this machine's
own anchors and PyTorch DCP `async_save`, in one run.

    python -m bench.checkpoint                      # 1 GiB and 4 GiB states, 2 rounds
    python -m bench.checkpoint --sizes 1 --rounds 3
    python -m bench.checkpoint --quick              # 64/256 MiB smoke run (make bench --quick)

Per state size (weights + two Adam-like moments, float32 torch tensors of <= 64 MiB):

* anchors, every round: `dd conv=fdatasync`, a 64 MiB-block O_DIRECT write, a 64 MiB-block
  O_DIRECT read, and one memcpy of the state into an existing (pre-faulted) buffer;
* trainctl: stall of `Checkpointer.save` (the snapshot), time until durable (staged with
  O_DIRECT, fsynced, manifest renamed last, local storage), and the slowdown of a
  one-thread CPU training loop that keeps running while the save completes;
* DCP `async_save` (single process, no process group), same three figures;
* restore into live tensors (cold page cache for the checkpoint's files): time and the
  growth of peak RSS, against a restore that allocates fresh tensors;
* `torch.save` vs safetensors (save + fsync, load) for the state;
* upload CPU-seconds per GiB to a moto S3 server (separate process) via s3transfer, with
  trainctl's S3 storage adapter (64 MiB parts, 8 in flight).

Every ratio is against a figure measured in the same run; a round whose anchor varies more
than 1.5x from another round is flagged (the disk here is shared and bursty).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import mmap
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from trainctl.checkpoint import Checkpointer
from trainctl_core.checkpoints import (
    CheckpointId,
    LocalCheckpointStorage,
    S3CheckpointStorage,
    checkpoint_prefix,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 64 * MiB
TENSOR_BYTES = 64 * MiB
NOTICE_SECONDS = 120.0
NOTICE_MARGIN_SECONDS = 20.0  # signal hop, snapshot, manifest, handshake: kept out of the budget
ANCHOR_SPREAD_LIMIT = 1.5
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- helpers -------------------------------------------------------------------------------------


def make_state(nbytes: int) -> dict[str, Any]:
    """Weights + exp_avg + exp_avg_sq, a third each, as float32 tensors of <= 64 MiB."""
    per_group = nbytes // 3
    sizes = [TENSOR_BYTES] * (per_group // TENSOR_BYTES)
    if per_group % TENSOR_BYTES:
        sizes.append(per_group % TENSOR_BYTES // 4 * 4)
    model: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(0)
    for index, size in enumerate(sizes):
        name = f"layer{index:03d}.weight"
        # Random content (a disk or a hash cannot shortcut it); uniform_ is cheap to fill.
        model[name] = torch.empty(size // 4).uniform_(generator=generator)
        state[name] = {
            "exp_avg": torch.empty(size // 4).uniform_(generator=generator),
            "exp_avg_sq": torch.empty(size // 4).uniform_(generator=generator),
        }
    return {"model": model, "optimizer": {"state": state, "lr": 1e-3}, "position": {"step": 0}}


def tensors(state: Any) -> Iterator[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from tensors(value)


def state_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(state))


def rss_peak_reset() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def rss_kib(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def drop_file_cache(root: str) -> None:
    """Evict `root`'s files from the page cache (only these files: others' work is untouched)."""
    for directory, _dirs, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def aligned_block(size: int = BLOCK) -> mmap.mmap:
    block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.write(os.urandom(MiB) * (size // MiB))
    return block


class TrainingLoop:
    """A small CPU training step on one thread (torch intra-op threads set to 1 while it runs)."""

    def __init__(self) -> None:
        torch.manual_seed(1)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU()
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.inputs = torch.randn(64, 256)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.inputs).pow(2).mean().backward()
        self.optimizer.step()

    def rate_for(self, seconds: float) -> float:
        with one_thread():
            steps, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                self.step()
                steps += 1
            return steps / elapsed

    def run_until(self, done: Callable[[], bool]) -> tuple[int, float]:
        with one_thread():
            steps, start = 0, time.perf_counter()
            while not done():
                self.step()
                steps += 1
            return steps, time.perf_counter() - start


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The training loop runs on one thread; copies (snapshot, memcpy anchor, DCP staging)
    use torch's default intra-op threads, as in a real job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- anchors ------------------------------------------------------------------------------------


@dataclass
class Anchors:
    dd_gbps: float
    odirect_write_gbps: float  # written by a background thread while the training loop runs
    odirect_write_slowdown: float  # what that bare write does to the loop (the VM's IO cost)
    direct_read_gbps: float
    memcpy_seconds: float


def measure_anchors(state: dict[str, Any], scratch: str, loop: TrainingLoop) -> Anchors:
    nbytes = state_bytes(state)
    blocks = max(1, nbytes // BLOCK)
    size = blocks * BLOCK
    path = os.path.join(scratch, "anchor.bin")
    start = time.perf_counter()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={path}",
            f"bs={BLOCK}",
            f"count={blocks}",
            "conv=fdatasync",
            "status=none",
        ],
        check=True,
    )
    dd = size / (time.perf_counter() - start)
    os.unlink(path)

    block = aligned_block()
    view = memoryview(block)

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            for _ in range(blocks):
                os.write(fd, view)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    # Same conditions as a background checkpoint: the training loop runs meanwhile.
    baseline = loop.rate_for(1.0)
    writer = threading.Thread(target=write)
    start = time.perf_counter()
    writer.start()
    steps, elapsed = loop.run_until(lambda: not writer.is_alive())
    writer.join()
    odirect = size / (time.perf_counter() - start)
    write_slowdown = baseline / (steps / elapsed) if steps and elapsed > 0 else 1.0

    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(blocks):
            os.readv(fd, [view])
    finally:
        os.close(fd)
    direct_read = size / (time.perf_counter() - start)
    view.release()
    block.close()
    os.unlink(path)

    # One memcpy of the state into an existing, pre-faulted buffer (the primitive the
    # snapshot uses: torch copy_). A ring of <= 1 GiB keeps the bench's RSS down; every
    # byte still goes to memory, far beyond the caches. Best of two.
    ring = torch.zeros(min(nbytes, GiB), dtype=torch.uint8)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        offset = 0
        for tensor in tensors(state):
            raw = tensor.view(-1).view(torch.uint8)
            if offset + raw.numel() > ring.numel():
                offset = 0
            ring[offset : offset + raw.numel()].copy_(raw)
            offset += raw.numel()
        best = min(best, time.perf_counter() - start)
    del ring
    gc.collect()
    return Anchors(dd / 1e9, odirect / 1e9, write_slowdown, direct_read / 1e9, best)


def direct_read_gbps(nbytes: int, scratch: str) -> float:
    """The direct-read anchor alone, taken right before a restore."""
    blocks = max(1, nbytes // BLOCK)
    path = os.path.join(scratch, "read-anchor.bin")
    block = aligned_block()
    view = memoryview(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for _ in range(blocks):
            os.write(fd, view)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(blocks):
            os.readv(fd, [view])
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    view.release()
    block.close()
    os.unlink(path)
    return blocks * BLOCK / seconds / 1e9


# --- the contenders -------------------------------------------------------------------------------


@dataclass
class SaveRound:
    stall_seconds: float
    durable_seconds: float
    slowdown: float  # training-loop step time while the save completes / before it


@dataclass
class FirstSave:
    cold_stall_seconds: float  # first save of a fresh Checkpointer: allocates the buffer
    reserve_seconds: float  # Checkpointer.reserve in the background (what restore does)
    reserved_stall_seconds: float  # first save after reserve


def trainctl_rounds(
    state: dict[str, Any], scratch: str, rounds: int, loop: TrainingLoop
) -> tuple[FirstSave, list[SaveRound], list[Anchors], str]:
    """First-save stalls (cold, and after `reserve`), then `rounds` of (anchors, warm save)
    back to back, so each save is compared with the disk as it was a moment before."""
    store = os.path.join(scratch, "trainctl-store")

    def checkpointer() -> Checkpointer:
        return Checkpointer(
            LocalCheckpointStorage(store, "bench"),
            job_id="bench",
            staging_dir=os.path.join(scratch, "trainctl-staging"),
            keep=1,
        )

    with checkpointer() as cold:
        start = time.perf_counter()
        cold.save(state, 1)
        cold_stall = time.perf_counter() - start
    gc.collect()
    ckpt = checkpointer()
    try:
        start = time.perf_counter()
        ckpt.reserve(state)
        ckpt.flush()
        reserve_seconds = time.perf_counter() - start
        start = time.perf_counter()
        ckpt.save(state, 2)
        first = FirstSave(cold_stall, reserve_seconds, time.perf_counter() - start)
        ckpt.flush()
        results, anchors = [], []
        for step in range(3, rounds + 3):
            anchors.append(measure_anchors(state, scratch, loop))
            state["position"]["step"] = step
            baseline = loop.rate_for(1.5)
            start = time.perf_counter()
            ckpt.save(state, step)
            stall = time.perf_counter() - start

            def durable(step: int = step) -> bool:
                return ckpt.last_durable is not None and ckpt.last_durable.step == step

            steps, elapsed = loop.run_until(durable)
            durable_seconds = time.perf_counter() - start
            during = steps / elapsed if elapsed > 0 else baseline
            results.append(SaveRound(stall, durable_seconds, baseline / during))
            ckpt.flush()  # retention and staging clean-up, outside the measurement
        return first, results, anchors, store
    finally:
        ckpt.close()  # frees the host buffer before the next contender allocates


def dcp_rounds(state: dict[str, Any], scratch: str, rounds: int, loop: TrainingLoop) -> list[SaveRound]:
    import torch.distributed.checkpoint as dcp

    results = []
    for index in range(rounds):
        target = os.path.join(scratch, f"dcp-{index}")
        baseline = loop.rate_for(1.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            start = time.perf_counter()
            future: Any = dcp.async_save(state, checkpoint_id=target)
            stall = time.perf_counter() - start
        steps, elapsed = loop.run_until(future.done)
        future.result()
        durable_seconds = time.perf_counter() - start
        during = steps / elapsed if elapsed > 0 else baseline
        results.append(SaveRound(stall, durable_seconds, baseline / during))
        del future
        gc.collect()
        shutil.rmtree(target, ignore_errors=True)
    return results


@dataclass
class RestoreResult:
    direct_read_gbps: float  # anchor taken right before
    one_pass_seconds: float  # restore(into=live): O_DIRECT read + hash into the save buffer, copy
    one_pass_rss_growth_bytes: int | None  # = the host buffer the next save needs anyway
    in_place_seconds: float  # restore(into=live, reserve=False): hash pass, then read in place
    in_place_rss_growth_bytes: int | None
    fresh_seconds: float  # restore(reserve=False) into freshly allocated tensors
    fresh_rss_growth_bytes: int | None


def measure_restore(state: dict[str, Any], store: str, scratch: str) -> RestoreResult:
    first = next(tensors(state["model"]))
    reference = first.clone()

    def restore(into: Any, reserve: bool, name: str) -> tuple[float, int | None]:
        first.zero_()  # the restore must bring the saved values back
        drop_file_cache(store)
        gc.collect()
        resettable = rss_peak_reset()
        before = rss_kib()
        with Checkpointer(
            LocalCheckpointStorage(store, "bench"), job_id="bench", staging_dir=os.path.join(scratch, name)
        ) as ckpt:
            start = time.perf_counter()
            restored = ckpt.restore(into=into, reserve=reserve)
            seconds = time.perf_counter() - start
            growth = (rss_kib("VmHWM") - before) * 1024 if resettable else None
        if restored is None:
            raise RuntimeError(f"restore found no checkpoint: {ckpt.fresh_reason}")
        value = next(tensors(restored["model"]))
        if into is not None and value is not first:
            raise RuntimeError("restore(into=...) did not return the live tensors")
        if not torch.equal(value, reference):
            raise RuntimeError("the restored state differs from the saved one")
        del restored, value
        gc.collect()
        return seconds, growth

    anchor = direct_read_gbps(state_bytes(state), scratch)
    one_pass = restore(state, True, "restore-one-pass")
    in_place = restore(state, False, "restore-in-place")
    fresh = restore(None, False, "restore-fresh")
    first.copy_(reference)
    return RestoreResult(anchor, *one_pass, *in_place, *fresh)


@dataclass
class SerializerResult:
    torch_save_seconds: float
    torch_load_seconds: float
    safetensors_save_seconds: float
    safetensors_load_seconds: float


def measure_serializers(state: dict[str, Any], scratch: str) -> SerializerResult:
    from safetensors.torch import load_file, save_file

    flat = {}
    for name, tensor in state["model"].items():
        flat[name] = tensor
        for moment, value in state["optimizer"]["state"][name].items():
            flat[f"{name}.{moment}"] = value

    def synced(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    path = os.path.join(scratch, "state.pt")
    start = time.perf_counter()
    torch.save(flat, path)
    synced(path)
    torch_save = time.perf_counter() - start
    start = time.perf_counter()
    loaded = torch.load(path)
    torch_load = time.perf_counter() - start
    del loaded
    os.unlink(path)
    gc.collect()

    path = os.path.join(scratch, "state.safetensors")
    start = time.perf_counter()
    save_file(flat, path)
    synced(path)
    safetensors_save = time.perf_counter() - start
    gc.collect()
    start = time.perf_counter()
    loaded = load_file(path)
    safetensors_load = time.perf_counter() - start
    del loaded
    os.unlink(path)
    gc.collect()
    return SerializerResult(torch_save, torch_load, safetensors_save, safetensors_load)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def measure_upload_cpu(nbytes: int, scratch: str) -> dict[str, float]:
    """Client CPU-seconds per GiB uploading one file to a moto S3 server in another process."""
    import boto3

    path = os.path.join(scratch, "upload.bin")
    block = aligned_block(min(BLOCK, nbytes))
    with open(path, "wb") as handle:
        for _ in range(max(1, nbytes // len(block))):
            handle.write(block)
    block.close()
    size = os.path.getsize(path)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        storage = S3CheckpointStorage(client, "bench", "bench")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        storage.put_files(CheckpointId(1, 0), [(path, "state.bin")], lambda: False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        key = checkpoint_prefix("bench", CheckpointId(1, 0)) + "state.bin"
        head = client.head_object(Bucket="bench", Key=key)
        if head["ContentLength"] != size:
            raise RuntimeError("the uploaded object has the wrong size")
        storage.close()
    finally:
        server.terminate()
        server.wait(10)
        os.unlink(path)
    gib = size / GiB
    return {"bytes": size, "cpu_seconds_per_gib": cpu / gib, "wall_gbps_to_moto": size / wall / 1e9}


# --- reporting -----------------------------------------------------------------------------------


@dataclass
class SizeResult:
    nbytes: int
    anchors: list[Anchors]
    first: FirstSave
    trainctl: list[SaveRound]
    dcp: list[SaveRound]
    restore: RestoreResult
    serializers: SerializerResult | None
    flags: list[str] = field(default_factory=list)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def verdicts(result: SizeResult) -> dict[str, Any]:
    gb = result.nbytes / 1e9
    pairs = list(zip(result.anchors, result.trainctl, strict=True))
    stall = _median([r.stall_seconds for r in result.trainctl])
    durable = _median([r.durable_seconds for r in result.trainctl])
    slowdown = _median([r.slowdown for r in result.trainctl])
    dcp_stall = _median([r.stall_seconds for r in result.dcp])
    dcp_durable = _median([r.durable_seconds for r in result.dcp])
    # Ratios per round (anchor and save back to back), then the median of the ratios.
    stall_vs_memcpy = _median([r.stall_seconds / a.memcpy_seconds for a, r in pairs])
    durable_vs_odirect = _median([gb / r.durable_seconds / a.odirect_write_gbps for a, r in pairs])
    restore_gbps = gb / result.restore.one_pass_seconds
    restore_vs_read = restore_gbps / result.restore.direct_read_gbps
    durable_gbps = gb / durable
    growth = result.restore.in_place_rss_growth_bytes
    return {
        "stall_s": stall,
        "stall_vs_memcpy": stall_vs_memcpy,
        "stall_dcp_over_ours": dcp_stall / stall,
        "durable_s": durable,
        "durable_gbps": durable_gbps,
        "durable_vs_odirect": durable_vs_odirect,
        "durable_dcp_over_ours": dcp_durable / durable,
        "slowdown": slowdown,
        "anchor_write_slowdown": _median([a.odirect_write_slowdown for a in result.anchors]),
        "dcp_slowdown": _median([r.slowdown for r in result.dcp]),
        "restore_gbps": restore_gbps,
        "restore_vs_direct_read": restore_vs_read,
        "notice_gb_this_disk": durable_gbps * (NOTICE_SECONDS - NOTICE_MARGIN_SECONDS),
        "notice_gb_at_1gbps": 1.0 * (NOTICE_SECONDS - NOTICE_MARGIN_SECONDS),
        "goals": {
            "stall <= 1.5x memcpy": stall_vs_memcpy <= 1.5,
            "stall >= 10x lower than DCP async": dcp_stall >= 10 * stall,
            "durable >= 0.8x O_DIRECT": durable_vs_odirect >= 0.8,
            "durable >= 3x faster than DCP async": dcp_durable >= 3 * durable,
            "training slowdown <= 1.05": slowdown <= 1.05,
            "restore >= 0.8x direct read": restore_vs_read >= 0.8,
            "restore adds no second copy (RSS growth < 10% of state)": growth is not None
            and growth < 0.1 * result.nbytes,
        },
    }


def anchor_flags(anchors: list[Anchors]) -> list[str]:
    flags = []
    for name in ("dd_gbps", "odirect_write_gbps", "direct_read_gbps", "memcpy_seconds"):  # not slowdowns
        values = [getattr(a, name) for a in anchors]
        if len(values) > 1 and max(values) > ANCHOR_SPREAD_LIMIT * min(values):
            flags.append(f"{name} varied {max(values) / min(values):.2f}x between rounds: {values}")
    return flags


def _rounds(rounds: list[SaveRound]) -> str:
    return "; ".join(f"{r.stall_seconds:.3f}, {r.durable_seconds:.2f}, {r.slowdown:.2f}" for r in rounds)


def render(results: list[SizeResult], upload: dict[str, float] | None) -> str:
    lines = []
    for result in results:
        v = verdicts(result)
        size = result.nbytes / GiB
        lines.append(f"### {size:g} GiB state ({len(result.trainctl)} rounds; medians)")
        lines.append("")
        lines.append("| anchor | " + " | ".join(f"round {i + 1}" for i in range(len(result.anchors))) + " |")
        lines.append("|---|" + "---|" * len(result.anchors))
        for label, key, fmt in (
            ("dd conv=fdatasync (GB/s)", "dd_gbps", "{:.2f}"),
            ("O_DIRECT 64 MiB write, loop running (GB/s)", "odirect_write_gbps", "{:.2f}"),
            ("loop slowdown during that bare write", "odirect_write_slowdown", "{:.3f}"),
            ("O_DIRECT read (GB/s)", "direct_read_gbps", "{:.2f}"),
            ("memcpy into existing buffer (s)", "memcpy_seconds", "{:.3f}"),
        ):
            lines.append(
                f"| {label} | " + " | ".join(fmt.format(getattr(a, key)) for a in result.anchors) + " |"
            )
        lines.append("")
        lines.append("| | trainctl | DCP async_save |")
        lines.append("|---|---|---|")
        lines.append(
            f"| stall per save (s) | {v['stall_s']:.3f} "
            f"(first save: {result.first.cold_stall_seconds:.3f} cold, "
            f"{result.first.reserved_stall_seconds:.3f} after a "
            f"{result.first.reserve_seconds:.2f} s background reserve) "
            f"| {_median([r.stall_seconds for r in result.dcp]):.3f} |"
        )
        lines.append(
            f"| durable (s) | {v['durable_s']:.2f} | {_median([r.durable_seconds for r in result.dcp]):.2f} |"
        )
        lines.append(
            f"| training-loop slowdown while saving | {v['slowdown']:.3f} | {v['dcp_slowdown']:.3f} |"
        )
        lines.append(
            f"| each round (stall s, durable s, slowdown) | {_rounds(result.trainctl)} "
            f"| {_rounds(result.dcp)} |"
        )
        lines.append("")
        restore = result.restore

        def growth(value: int | None) -> str:
            return "n/a" if value is None else f"{value / MiB:.0f} MiB"

        lines.append(
            "Restore (cold page cache; direct-read anchor just before: "
            f"{restore.direct_read_gbps:.2f} GB/s): "
            f"into live tensors, one pass through the save buffer {restore.one_pass_seconds:.2f} s "
            f"({v['restore_gbps']:.2f} GB/s, peak RSS +{growth(restore.one_pass_rss_growth_bytes)}: "
            f"the host buffer every save uses anyway); into live tensors without a buffer "
            f"(`reserve=False`: hash pass, then in place) {restore.in_place_seconds:.2f} s "
            f"(peak RSS +{growth(restore.in_place_rss_growth_bytes)}); into fresh tensors "
            f"{restore.fresh_seconds:.2f} s (peak RSS +{growth(restore.fresh_rss_growth_bytes)})."
        )
        if result.serializers is not None:
            s = result.serializers
            lines.append(
                f"Serializers (save+fsync / load): torch.save {s.torch_save_seconds:.2f} / "
                f"{s.torch_load_seconds:.2f} s, safetensors {s.safetensors_save_seconds:.2f} / "
                f"{s.safetensors_load_seconds:.2f} s; trainctl stall {v['stall_s']:.3f} s + background write."
            )
        lines.append(
            "Largest checkpoint durable within the 2-minute notice "
            f"({NOTICE_SECONDS - NOTICE_MARGIN_SECONDS:.0f} s "
            f"budget): {v['notice_gb_this_disk']:.0f} GB at this run's durable rate "
            f"({v['durable_gbps']:.2f} GB/s), {v['notice_gb_at_1gbps']:.0f} GB at 1 GB/s."
        )
        lines.append("")
        lines.append("| goal | ratio | met |")
        lines.append("|---|---|---|")
        ratios = {
            "stall <= 1.5x memcpy": f"{v['stall_vs_memcpy']:.2f}x memcpy",
            "stall >= 10x lower than DCP async": f"DCP/ours {v['stall_dcp_over_ours']:.1f}x",
            "durable >= 0.8x O_DIRECT": f"{v['durable_vs_odirect']:.2f}x O_DIRECT",
            "durable >= 3x faster than DCP async": f"DCP/ours {v['durable_dcp_over_ours']:.2f}x",
            "training slowdown <= 1.05": (
                f"{v['slowdown']:.3f} (bare O_DIRECT write: {v['anchor_write_slowdown']:.3f})"
            ),
            "restore >= 0.8x direct read": f"{v['restore_vs_direct_read']:.2f}x direct read",
            "restore adds no second copy (RSS growth < 10% of state)": (
                f"{growth(restore.in_place_rss_growth_bytes)} without a buffer; "
                f"{growth(restore.one_pass_rss_growth_bytes)} one-pass (= the save buffer)"
            ),
        }
        for goal, met in v["goals"].items():
            lines.append(f"| {goal} | {ratios[goal]} | {'yes' if met else '**no**'} |")
        for flag in result.flags:
            lines.append(f"\n**Flag:** {flag}")
        lines.append("")
    if upload is not None:
        lines.append(
            f"Upload to moto S3 (server in another process) via s3transfer, trainctl's adapter: "
            f"{upload['cpu_seconds_per_gib']:.2f} client CPU-s per GiB "
            f"({upload['bytes'] / GiB:.2f} GiB, {upload['wall_gbps_to_moto']:.2f} GB/s to moto)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4", help="state sizes in GiB, comma separated (default 1,4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per size (default 2)")
    parser.add_argument("--quick", action="store_true", help="64 and 256 MiB, 2 rounds (smoke run)")
    parser.add_argument(
        "--dir", default=None, help="scratch directory on the disk to measure (default /work)"
    )
    parser.add_argument("--no-serializers", action="store_true", help="skip torch.save vs safetensors")
    parser.add_argument("--no-upload", action="store_true", help="skip the moto S3 upload CPU figure")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        sizes = [0.0625, 0.25] if args.quick else [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be numbers of GiB separated by commas, got {args.sizes!r}")
    if not sizes or any(s <= 0 or s > 8 for s in sizes):
        parser.error("--sizes must be between 0 and 8 GiB (the machine has 24 GB, shared)")
    logging.getLogger("trainctl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP, single process
    base = args.dir or (
        os.path.dirname(REPO_ROOT) if os.access(os.path.dirname(REPO_ROOT), os.W_OK) else None
    )
    scratch = tempfile.mkdtemp(prefix="trainctl-bench-ckpt-", dir=base)
    # A stopped bench still removes its (GB-sized) scratch files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"scratch: {scratch} (removed at the end); sizes {sizes} GiB; {args.rounds} rounds", flush=True)
    results: list[SizeResult] = []
    upload = None
    loop = TrainingLoop()
    try:
        for size in sizes:
            state = make_state(int(size * GiB))
            nbytes = state_bytes(state)
            print(f"\n-- {nbytes / GiB:.2f} GiB: anchors + trainctl", flush=True)
            first, ours, anchors, store = trainctl_rounds(state, scratch, args.rounds, loop)
            print("   DCP async_save", flush=True)
            dcp = dcp_rounds(state, scratch, args.rounds, loop)
            print("   restore", flush=True)
            restore = measure_restore(state, store, scratch)
            shutil.rmtree(store, ignore_errors=True)
            serializers = None
            if not args.no_serializers:
                print("   torch.save / safetensors", flush=True)
                serializers = measure_serializers(state, scratch)
            result = SizeResult(nbytes, anchors, first, ours, dcp, restore, serializers)
            result.flags = anchor_flags(anchors)
            results.append(result)
            del state
            gc.collect()
        if not args.no_upload:
            print("\n-- upload CPU to moto S3", flush=True)
            upload = measure_upload_cpu(int(min(sizes[0], 1.0) * GiB), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print()
    print(render(results, upload))
    print(f"\nPeak RSS of the bench process: {peak / GiB:.1f} GiB; CPUs: {os.cpu_count()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "results": [{**_asdict(r), "verdicts": verdicts(r)} for r in results],
                    "upload": upload,
                    "peak_rss_bytes": peak,
                },
                handle,
                indent=2,
                default=str,
            )
    return 0


def _asdict(result: SizeResult) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(result)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
