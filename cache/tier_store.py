"""A worker's lower tiers of the prefix cache: block slots in host memory and block files on
disk, and the copies the scheduler plans for them (cache/tiers.py) each step.

Copies between the latent cache and host slots run before the step's forward, batched (on CUDA
on a stream of their own, the forward waiting only for them; on a CPU host they are one memcpy
each way). Disk writes and deletes run on one I/O thread in the order planned, reads on another
(a request waits for its reads: they must not queue behind spills), so the step never waits for
a disk. A slot is never filled while a write out of it is queued: that write is dropped first.

A block file: a header (magic, the cache fingerprint, the block's hash, token count, payload size,
CRC-32 of tokens and payload), the block's token ids (int32), then its entries, every layer
([layers, block_size, row width] as the cache stores them). Files are written to a temporary
name and renamed, so a crash leaves no half block under a real name; a read checks everything
and a file that fails any check is a miss (and is removed).
"""

from __future__ import annotations

import array
import errno
import hashlib
import json
import logging
import os
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from cache.latent_cache import LatentCache
from engine.messages import StepPlan, StepResult

log = logging.getLogger("mlaserve.tiers")

MAGIC = b"MLAKVB01"
HEADER = struct.Struct("<8s16s16sIQI")  # magic, fingerprint, key, tokens, payload bytes, crc32
SUFFIX = ".kvb"
SAMPLE_BYTES = 1 << 16
SAMPLES_PER_SHARD = 8


def cache_fingerprint(model_dir: str, dtype: torch.dtype, fp8_cache: bool, block_size: int,
                      num_cache_layers: int) -> bytes:
    """16 bytes naming what makes a cached entry valid: the checkpoint's config and weights, the
    cache's dtype and layout, the block size and the layers cached (the MTP layer's included or
    not). The weights enter through each shard's name, size, header and evenly spaced samples of
    its data: a checkpoint of other weights differs there, and a 700 GB one reads 8 MB for it."""
    h = hashlib.sha256(b"mlaserve latent cache v1")
    h.update(json.dumps([str(dtype), fp8_cache, block_size, num_cache_layers]).encode())
    root = Path(model_dir)
    config = root / "config.json"
    h.update(config.read_bytes() if config.exists() else b"")
    for shard in sorted(root.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(f"{shard.name}:{size}".encode())
        with open(shard, "rb") as f:
            head = f.read(8)
            h.update(head)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(f.read(min(header_len, 1 << 24)))
            start = 8 + header_len
            span = max(size - start, 0)
            for i in range(SAMPLES_PER_SHARD):
                f.seek(start + span * i // SAMPLES_PER_SHARD)
                h.update(f.read(SAMPLE_BYTES))
    return h.digest()[:16]


class TierStore:
    def __init__(self, cache: LatentCache, host_blocks: int, disk_dir: str | None, disk_bytes: int,
                 fingerprint: bytes, rank: int):
        self.cache = cache
        data = cache.data
        self.on_cuda = data.device.type == "cuda"
        block_shape = (data.shape[0], data.shape[2], data.shape[3])  # one block, every layer
        self.host = torch.empty((host_blocks, *block_shape), dtype=data.dtype, pin_memory=self.on_cuda)
        self.payload_bytes = self.host[0].numel() * self.host.element_size() if host_blocks else 0
        self.block_size = cache.block_size
        self.fingerprint = fingerprint
        self.dir = Path(disk_dir) / fingerprint.hex() / f"rank{rank}" if disk_dir else None
        file_bytes = HEADER.size + 4 * self.block_size + self.payload_bytes
        self.disk_blocks = disk_bytes // file_bytes if self.dir is not None else 0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="mlaserve-tier-writes")
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="mlaserve-tier-reads")
        self._reads_queued = 0
        self._slot_writes: dict[int, tuple[Future, bytes]] = {}  # pending disk writes out of a slot, and their keys
        self._lock = threading.Condition()
        self._reads_done: list[bytes] = []
        self._reads_failed: list[bytes] = []
        self._writes_failed: list[bytes] = []
        self._disk_full = False
        self._made_dirs: set[str] = set()
        self._copy_seconds = 0.0
        self._stream = torch.cuda.Stream(data.device) if self.on_cuda else None
        self._last_copy: torch.cuda.Event | None = None  # I/O on host slots waits for it (CUDA)

    @property
    def host_blocks(self) -> int:
        return self.host.shape[0]

    def existing_blocks(self) -> list[bytes]:
        """The disk tier's block hashes, oldest first (a restarted engine's LRU order); leftovers
        of interrupted writes are removed."""
        if self.dir is None or not self.dir.exists():
            return []
        found = []
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                name = entry.name
                if name.endswith(".tmp"):
                    _remove(entry.path)
                elif name.endswith(SUFFIX) and len(name) == 32 + len(SUFFIX):
                    try:
                        found.append((entry.stat().st_mtime, bytes.fromhex(name[:32])))
                    except (OSError, ValueError):
                        continue
        found.sort()
        return [k for _, k in found]

    # ---- one step's copies --------------------------------------------------------------------

    def apply(self, plan: StepPlan) -> None:
        """Runs the plan's copies between cache and host slots, then queues its disk work."""
        if plan.offload_blocks or plan.load_blocks:
            start = time.perf_counter()
            for slot in plan.offload_slots:  # a slot being written to disk is not overwritten
                self._settle_write(slot)
            if self.on_cuda:
                self._copy_on_stream(plan)
            else:
                data, index = self.cache.data, torch.tensor
                if plan.offload_blocks:
                    self.host[index(plan.offload_slots)] = data[:, index(plan.offload_blocks)].transpose(0, 1)
                if plan.load_blocks:
                    data[:, index(plan.load_blocks)] = self.host[index(plan.load_slots)].transpose(0, 1)
            self._copy_seconds += time.perf_counter() - start
        bs = self.block_size
        for i, (key, slot) in enumerate(zip(plan.write_keys, plan.write_slots)):
            tokens = plan.write_tokens[i * bs : (i + 1) * bs]
            self._slot_writes[slot] = (self._io.submit(self._write, key, slot, tokens, self._last_copy), key)
        for key in plan.delete_keys:
            self._io.submit(self._delete, key)
        for i, (key, slot) in enumerate(zip(plan.read_keys, plan.read_slots)):
            self._settle_write(slot)
            tokens = plan.read_tokens[i * bs : (i + 1) * bs]
            with self._lock:
                self._reads_queued += 1
            self._reads.submit(self._read, key, slot, tokens, self._last_copy)

    def _settle_write(self, slot: int) -> None:
        """Before a slot is overwritten: a write out of it still queued is dropped (a disk slower
        than the spills loses blocks rather than stalling steps); one under way is waited for."""
        pending = self._slot_writes.pop(slot, None)
        if pending is None:
            return
        write, key = pending
        if write.cancel():
            self._failed_write(key)
        else:
            write.result()

    def _copy_on_stream(self, plan: StepPlan) -> None:
        """CUDA: gathers and scatters on the copy stream (host slots are pinned); the forward's
        stream waits for them, and the I/O thread waits for them before touching a slot."""
        data = self.cache.data
        current = torch.cuda.current_stream(data.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            if plan.offload_blocks:
                gathered = data[:, torch.tensor(plan.offload_blocks, device=data.device)].transpose(0, 1).contiguous()
                for i, slot in enumerate(plan.offload_slots):
                    self.host[slot].copy_(gathered[i], non_blocking=True)
            if plan.load_blocks:
                staged = torch.empty((len(plan.load_slots), *self.host.shape[1:]), dtype=data.dtype, device=data.device)
                for i, slot in enumerate(plan.load_slots):
                    staged[i].copy_(self.host[slot], non_blocking=True)
                data[:, torch.tensor(plan.load_blocks, device=data.device)] = staged.transpose(0, 1)
            self._last_copy = torch.cuda.Event()
            self._last_copy.record(self._stream)
        current.wait_stream(self._stream)

    def report(self, result: StepResult) -> None:
        """Hands what the I/O thread finished since the last result to the scheduler."""
        result.tier_copy_seconds, self._copy_seconds = self._copy_seconds, 0.0
        with self._lock:
            result.reads_done, self._reads_done = self._reads_done, []
            result.reads_failed, self._reads_failed = self._reads_failed, []
            result.writes_failed, self._writes_failed = self._writes_failed, []

    def wait_for_reads(self, timeout_s: float) -> None:
        """For a step with nothing else to do: returns once every read queued has finished, or on
        timeout (with those finished by then)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._reads_queued and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)

    def close(self) -> None:
        """Waits for queued writes (they are what a restart finds) and stops the I/O threads."""
        self._reads.shutdown(wait=True)
        self._io.shutdown(wait=True)

    # ---- the I/O thread -----------------------------------------------------------------------

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.dir / name[:2] / (name + SUFFIX)

    def _write(self, key: bytes, slot: int, tokens: list[int], after: torch.cuda.Event | None) -> None:
        if self._disk_full:
            self._failed_write(key)
            return
        if after is not None:
            after.synchronize()
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # (two engines may share the directory)
        try:
            if path.parent.name not in self._made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made_dirs.add(path.parent.name)
            token_bytes = array.array("i", tokens).tobytes()
            payload = self.host[slot].view(torch.uint8).reshape(-1).numpy()
            crc = zlib.crc32(payload, zlib.crc32(token_bytes))
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, self.fingerprint, key, len(tokens), self.payload_bytes, crc))
                f.write(token_bytes)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as e:
            _remove(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._disk_full = True
                log.warning("the disk tier's disk is full (%s): blocks stop spilling to disk until a "
                            "block file is removed", self.dir)
            else:
                log.warning("could not write a block file to %s: %s", self.dir, e)
            self._failed_write(key)

    def _failed_write(self, key: bytes) -> None:
        with self._lock:
            self._writes_failed.append(key)

    def _delete(self, key: bytes) -> None:
        if _remove(self._path(key)):
            self._disk_full = False  # room again: try writing

    def _read(self, key: bytes, slot: int, tokens: list[int], after: torch.cuda.Event | None) -> None:
        if after is not None:
            after.synchronize()  # (a copy out of this slot from an earlier step may still run)
        ok = False
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                ok = self._read_into(f, key, slot, tokens)
            if ok:
                os.utime(path)  # read recently: a restart's LRU order keeps it
            else:
                log.warning("block file %s failed its checks: treated as a miss and removed", path)
                _remove(path)
        except OSError:
            ok = False
        with self._lock:
            (self._reads_done if ok else self._reads_failed).append(key)
            self._reads_queued -= 1
            self._lock.notify_all()

    def _read_into(self, f, key: bytes, slot: int, tokens: list[int]) -> bool:
        head = f.read(HEADER.size)
        if len(head) != HEADER.size:
            return False
        magic, fingerprint, file_key, num_tokens, payload_bytes, crc = HEADER.unpack(head)
        if (magic, fingerprint, file_key, num_tokens, payload_bytes) != (
                MAGIC, self.fingerprint, key, len(tokens), self.payload_bytes):
            return False
        token_bytes = f.read(4 * num_tokens)
        if token_bytes != array.array("i", tokens).tobytes():
            return False
        payload = self.host[slot].view(torch.uint8).reshape(-1).numpy()
        if f.readinto(payload) != payload_bytes or f.read(1):
            return False
        return zlib.crc32(payload, zlib.crc32(token_bytes)) == crc


def _remove(path) -> bool:
    try:
        os.remove(path)
        return True
    except OSError:
        return False
