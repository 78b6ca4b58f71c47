"""Snapshot an arbitrary state tree into a reused host buffer, write it, read it back.

Why not `torch.save`: it serialises *and* writes on the caller's thread, and every call
allocates fresh memory (slow on first touch on these VMs). Here a save is split in two:

1. `Snapshotter.snapshot(state)` — on the training thread, the only stall: tensors and
   arrays are copied into one page-aligned, reused host buffer (a memcpy), everything else
   is pickled into a small skeleton that refers to them by index.
2. `write_snapshot(...)` — on a background thread: a few large (O_DIRECT where the
   filesystem allows it) writes of the buffer into `state.bin`, the skeleton into
   `state.pkl`, hashed while written; `os.write` releases the GIL, so training continues.

`load_snapshot` reads `state.bin` straight into freshly allocated tensors/arrays (one
copy, no intermediate bytes object) and unpickles the skeleton around them.

Framework-agnostic: numpy arrays and torch tensors (if torch is importable) are stored
raw; anything picklable goes into the skeleton.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import pickle
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

ALIGN = 4096
DATA_FILE = "state.bin"
SKELETON_FILE = "state.pkl"
_WRITE_CHUNK = 64 * 1024 * 1024


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _torch() -> Any:
    # Imported only if the training process already did: the library must not pull in
    # torch for a numpy or plain-Python job.
    return sys.modules.get("torch")


@dataclass(frozen=True)
class TensorEntry:
    kind: str  # "torch" | "numpy"
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class HostBuffer:
    """A page-aligned anonymous mapping, grown on demand and reused across saves.

    Reuse matters: first touch of fresh pages is the slow part of a naive snapshot.
    """

    def __init__(self, size: int = 0) -> None:
        self._map: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self.size = 0
        if size:
            self.ensure(size)

    def ensure(self, size: int) -> None:
        if size <= self.size:
            return
        # Grow by 25 % so that a state that grows a little does not reallocate every save.
        new_size = _align(max(size, int(self.size * 1.25)))
        self._array = None
        if self._map is not None:
            self._map.close()
        # Pre-fault now rather than inside the first copy: MAP_POPULATE has the kernel map
        # every page in one call (faster than touching them one by one, measured ~0.3 vs
        # ~0.5 s per GiB here, and without the GIL held).
        populate = getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(-1, new_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        if not populate:
            self._array[:: mmap.PAGESIZE] = 0
        self.size = new_size

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            raise RuntimeError("buffer not allocated")
        return self._array

    def view(self, start: int, stop: int) -> memoryview:
        return memoryview(self.array[start:stop])  # type: ignore[arg-type]

    def close(self) -> None:
        self._array = None
        if self._map is not None:
            # A view may still be exported (e.g. a tensor the caller kept): the GC frees it.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self.size = 0


@dataclass
class Snapshot:
    """A state captured in host memory: the skeleton and the used part of the buffer."""

    skeleton: bytes
    entries: list[TensorEntry]
    data_bytes: int  # bytes of the buffer in use (aligned)
    buffer: HostBuffer


def _is_tensor(obj: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, collect: Callable[[Any], int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._collect = collect

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            return ("t", self._collect(obj))
        if _is_tensor(obj):
            return ("t", self._collect(obj))
        return None


class Snapshotter:
    """Captures state trees into one reused `HostBuffer`."""

    def __init__(self) -> None:
        self.buffer = HostBuffer()

    @staticmethod
    def measure(state: Any) -> int:
        """Bytes of buffer the tensors/arrays of `state` need (aligned)."""
        total = 0

        def collect(obj: Any) -> int:
            nonlocal total
            total += _align(_nbytes(obj))
            return 0

        _Pickler(io.BytesIO(), collect).dump(state)
        return total

    def snapshot(self, state: Any) -> Snapshot:
        """Copy `state` into host memory. The caller may mutate `state` right after."""
        tensors: list[Any] = []

        def collect(obj: Any) -> int:
            tensors.append(obj)
            return len(tensors) - 1

        skeleton = io.BytesIO()
        _Pickler(skeleton, collect).dump(state)
        needed = sum(_align(_nbytes(t)) for t in tensors)
        self.buffer.ensure(max(needed, ALIGN))
        entries: list[TensorEntry] = []
        offset = 0
        for obj in tensors:
            entries.append(_copy_into(obj, self.buffer, offset))
            offset += _align(entries[-1].nbytes)
        return Snapshot(skeleton=skeleton.getvalue(), entries=entries, data_bytes=offset, buffer=self.buffer)

    def close(self) -> None:
        self.buffer.close()


def _nbytes(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    return int(obj.numel() * obj.element_size())


def _copy_into(obj: Any, buffer: HostBuffer, offset: int) -> TensorEntry:
    nbytes = _nbytes(obj)
    dst = buffer.array[offset : offset + nbytes]
    if isinstance(obj, np.ndarray):
        np.copyto(dst, np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
        return TensorEntry("numpy", obj.dtype.str, tuple(obj.shape), offset, nbytes)
    torch = _torch()
    source = obj.detach()
    if source.device.type != "cpu":
        source = source.cpu()
    source = source.contiguous().reshape(-1)
    if nbytes:
        # torch's copy_ is multi-threaded for large tensors; numpy's copyto is not.
        torch.from_numpy(dst).copy_(source.view(torch.uint8))
    dtype = str(obj.dtype).removeprefix("torch.")
    return TensorEntry("torch", dtype, tuple(obj.shape), offset, nbytes)


# --- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenFile:
    path: str  # relative name inside the checkpoint
    local_path: str
    size: int
    xxh3_128: str


def write_snapshot(snapshot: Snapshot, directory: str, *, direct: bool = True) -> list[WrittenFile]:
    """Write `snapshot` into `directory` (state.bin, state.pkl), fsynced, hashed on the way."""
    os.makedirs(directory, exist_ok=True)
    data_path = os.path.join(directory, DATA_FILE)
    size, digest = _write_buffer(snapshot.buffer, snapshot.data_bytes, data_path, direct=direct)
    header = pickle.dumps(
        {"entries": [e.__dict__ for e in snapshot.entries], "skeleton": snapshot.skeleton},
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    skeleton_path = os.path.join(directory, SKELETON_FILE)
    with open(skeleton_path, "wb") as handle:
        handle.write(header)
        handle.flush()
        os.fsync(handle.fileno())
    return [
        WrittenFile(DATA_FILE, data_path, size, digest),
        WrittenFile(SKELETON_FILE, skeleton_path, len(header), xxhash.xxh3_128_hexdigest(header)),
    ]


def _write_buffer(buffer: HostBuffer, nbytes: int, path: str, *, direct: bool) -> tuple[int, str]:
    hasher = xxhash.xxh3_128()
    # Hash on a second thread while the writes run (both release the GIL): the hash then
    # costs no wall-clock time on the way to durable.
    hashing = threading.Thread(
        target=lambda: hasher.update(buffer.view(0, nbytes)), name="trainctl-ckpt-hash", daemon=True
    )
    hashing.start()
    try:
        _write_out(buffer, nbytes, path, direct=direct)
    finally:
        hashing.join()
    return nbytes, hasher.hexdigest()


def _write_out(buffer: HostBuffer, nbytes: int, path: str, *, direct: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    use_direct = direct and hasattr(os, "O_DIRECT") and nbytes > 0
    fd = -1
    if use_direct:
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError:
            use_direct = False  # tmpfs and some overlay filesystems refuse O_DIRECT
    if fd < 0:
        fd = os.open(path, flags, 0o644)
    try:
        offset = 0
        while offset < nbytes:
            chunk = buffer.view(offset, min(offset + _WRITE_CHUNK, nbytes))
            done = 0
            while done < len(chunk):
                try:
                    done += os.write(fd, chunk[done:])
                except OSError:
                    if not use_direct:
                        raise
                    # The filesystem accepted O_DIRECT at open but refuses this write
                    # (alignment rules): carry on buffered from the same position.
                    os.close(fd)
                    fd = os.open(path, os.O_WRONLY, 0o644)
                    os.lseek(fd, offset + done, os.SEEK_SET)
                    use_direct = False
            offset += len(chunk)
        os.fdatasync(fd)
    finally:
        os.close(fd)


# --- reading -----------------------------------------------------------------------------------


def load_snapshot(directory_or_paths: str | dict[str, str], *, into: Any = None) -> Any:
    """Read a snapshot back: tensors are read from disk straight into their final memory.

    With `into` (a live state tree of the same structure, e.g. the model's and
    optimizer's current tensors), each tensor is read into the matching live tensor in
    place and the returned tree holds those same objects: no second copy of the state in
    RAM. The tensors are matched in the order they were saved; a different count, dtype
    or shape raises `SnapshotMismatch` naming the first difference.
    """
    if isinstance(directory_or_paths, str):
        paths = {
            DATA_FILE: os.path.join(directory_or_paths, DATA_FILE),
            SKELETON_FILE: os.path.join(directory_or_paths, SKELETON_FILE),
        }
    else:
        paths = directory_or_paths
    with open(paths[SKELETON_FILE], "rb") as handle:
        header = pickle.load(handle)
    entries = [TensorEntry(**{**e, "shape": tuple(e["shape"])}) for e in header["entries"]]
    targets = _live_targets(into, entries) if into is not None else None
    objects: list[Any] = []
    with open(paths[DATA_FILE], "rb", buffering=0) as data:
        for index, entry in enumerate(entries):
            if targets is None:
                objects.append(_read_entry(data, entry))
            else:
                _readinto(data, entry.offset, _raw_view(targets[index]))
                objects.append(targets[index])

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            tag, index = pid
            if tag != "t":
                raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
            return objects[index]

    return _Unpickler(io.BytesIO(header["skeleton"])).load()


class SnapshotMismatch(ValueError):
    """The live state given to `load_snapshot(into=...)` does not match the checkpoint."""


def _live_targets(into: Any, entries: list[TensorEntry]) -> list[Any]:
    live: list[Any] = []

    def collect(obj: Any) -> int:
        live.append(obj)
        return len(live) - 1

    _Pickler(io.BytesIO(), collect).dump(into)
    if len(live) != len(entries):
        raise SnapshotMismatch(
            f"the checkpoint holds {len(entries)} tensors/arrays, the live state {len(live)}"
        )
    for index, (obj, entry) in enumerate(zip(live, entries, strict=True)):
        kind = "numpy" if isinstance(obj, np.ndarray) else "torch"
        dtype = obj.dtype.str if kind == "numpy" else str(obj.dtype).removeprefix("torch.")
        shape = tuple(obj.shape)
        if (kind, dtype, shape) != (entry.kind, entry.dtype, entry.shape):
            raise SnapshotMismatch(
                f"tensor #{index}: checkpoint has {entry.kind} {entry.dtype}{list(entry.shape)}, "
                f"live state has {kind} {dtype}{list(shape)}"
            )
        contiguous = (
            obj.flags.c_contiguous and obj.flags.writeable if kind == "numpy" else obj.is_contiguous()
        )
        if not contiguous or (kind == "torch" and obj.device.type != "cpu"):
            raise SnapshotMismatch(f"tensor #{index}: live target must be a contiguous, writable CPU tensor")
    return live


def _raw_view(obj: Any) -> memoryview:
    if isinstance(obj, np.ndarray):
        return memoryview(obj.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    torch = _torch()
    if obj.numel() == 0:
        return memoryview(b"")
    return memoryview(obj.detach().view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _empty_for(entry: TensorEntry) -> Any:
    if entry.kind == "numpy":
        return np.empty(entry.shape, dtype=np.dtype(entry.dtype))
    torch = _torch()
    if torch is None:
        import torch
    return torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))


def _read_entry(data: Any, entry: TensorEntry) -> Any:
    target = _empty_for(entry)
    if entry.nbytes:
        _readinto(data, entry.offset, _raw_view(target))
    return target


def read_into_buffer(path: str, buffer: HostBuffer) -> tuple[int, str]:
    """Read a data file into `buffer` (grown as needed) in a few large O_DIRECT reads,
    hashing on the way: one pass over the disk, no page cache. Returns (size, xxh3-128)."""
    size = os.path.getsize(path)
    # Pre-faulted (MAP_POPULATE): O_DIRECT reads into untouched pages measured no faster
    # here and much less steady.
    buffer.ensure(max(_align(size), ALIGN))
    hasher = xxhash.xxh3_128()
    direct = hasattr(os, "O_DIRECT")
    fd = -1
    if direct:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            direct = False  # tmpfs and some overlay filesystems refuse O_DIRECT
    if fd < 0:
        fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            # Aligned lengths for O_DIRECT; the tail read simply comes back short.
            stop = min(offset + _WRITE_CHUNK, _align(size))
            try:
                read = os.readv(fd, [buffer.view(offset, stop)])
            except OSError:
                if not direct:
                    raise
                os.close(fd)
                fd = os.open(path, os.O_RDONLY)
                os.lseek(fd, offset, os.SEEK_SET)
                direct = False
                continue
            if not read:
                break
            hasher.update(buffer.view(offset, min(offset + read, size)))
            offset += read
    finally:
        os.close(fd)
    return min(offset, size), hasher.hexdigest()


def load_snapshot_from_buffer(skeleton_path: str, buffer: HostBuffer, *, into: Any = None) -> Any:
    """Rebuild a snapshot whose data `read_into_buffer` put in `buffer` (see `load_snapshot`
    for `into`): one memcpy per tensor, into the live tensors or fresh ones."""
    with open(skeleton_path, "rb") as handle:
        header = pickle.load(handle)
    entries = [TensorEntry(**{**e, "shape": tuple(e["shape"])}) for e in header["entries"]]
    targets = _live_targets(into, entries) if into is not None else None
    torch = _torch()
    objects: list[Any] = []
    for index, entry in enumerate(entries):
        target = targets[index] if targets is not None else _empty_for(entry)
        if entry.nbytes:
            source = buffer.array[entry.offset : entry.offset + entry.nbytes]
            dest = np.frombuffer(_raw_view(target), dtype=np.uint8)
            if torch is not None:
                torch.from_numpy(dest).copy_(torch.from_numpy(source))  # multi-threaded copy
            else:
                np.copyto(dest, source)
        objects.append(target)

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            tag, index = pid
            if tag != "t":
                raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
            return objects[index]

    return _Unpickler(io.BytesIO(header["skeleton"])).load()


def _readinto(data: Any, offset: int, target: memoryview) -> None:
    data.seek(offset)
    filled = 0
    while filled < len(target):
        read = data.readinto(target[filled:])
        if not read:
            raise EOFError(f"state.bin ends at {offset + filled}, expected {offset + len(target)}")
        filled += read
