"""Asynchronous saves (train.async_checkpoint): one rank's files of a save copied to host memory at the save's
step and written by a thread of their own while training goes on, put in place only once every rank has written.

What hvdlm.checkpoint.manager does with a background save, in order:

1. copy (`host_copy`, on the training thread, at the agreed step): every tensor the rank's files hold is copied
   into host memory (`HostBuffers`, kept from one save to the next; pinned, copied on the GPU's stream, for
   tensors on a GPU), so the next step may change the live ones; the rest (numbers, strings) cannot change;
2. write (`BackgroundWrite`, a daemon thread): each file streams to its temporary name beside the target
   (hvdlm.fsutil.atomic_writer with publish=False: `.step-N.pt.tmp-PID`), hashed for the manifest as it goes,
   and fsynced. Nothing is renamed: no reader sees a file of this save, and a crash or SIGKILL leaves the previous
   complete checkpoint the newest (the next run's store.remove_stale_temporaries deletes the temporaries);
3. agreement (the manager's poll, at step boundaries): once every rank's thread is done, every rank renames its
   files into place (`publish`), and rank 0 writes the manifest and prunes, as after a synchronous save. A write
   that failed on any rank (a full disk) becomes every rank's error there, once each has taken back its own
   temporaries (`discard`).

`fits_in_host_memory` is train.async_checkpoint = "auto"'s test. HVDLM_TEST_CHECKPOINT_WRITE_DELAY="STEP:SECONDS"
keeps the write of step STEP in flight SECONDS longer, after its files are on disk and before the thread ends (the
tests' SIGKILL during a write; never set it in a real run).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hvdlm.checkpoint.format import save_checkpoint
from hvdlm.fsutil import publish, temporary_path

DELAY_VARIABLE = "HVDLM_TEST_CHECKPOINT_WRITE_DELAY"
# The host copies of every rank on a node must fit in this share of the memory the kernel calls available: the
# rest stays for the page cache the writes go through and for what the run itself allocates later.
_HOST_SHARE = 0.5

RUNNING, DONE = "running", "done"  # a write's state in the ranks' poll; anything else is its failure, said


class HostBuffers:
    """Host tensors kept from one background save for the next, which has the same shapes: a fresh allocation
    costs its page faults (5 times the copy itself for a 229 MB state on this project's CPU machine,
    bench/async_checkpoint.py), and pinned memory for GPUs costs more still. They hold the state's size in host
    memory for the rest of the run, which is what train.async_checkpoint = "auto" checks for."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """A host tensor of `like`'s shape and type (pinned when `like` is on a GPU), free to be overwritten."""
        pinned = like.device.type != "cpu"
        free = self._free.get((tuple(like.shape), like.dtype, pinned))
        if free:
            return free.pop()
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=pinned)

    def give_back(self, tensors: list[torch.Tensor]) -> None:
        """Tensors a finished write no longer reads, for the next save."""
        for t in tensors:
            self._free.setdefault((tuple(t.shape), t.dtype, t.is_pinned()), []).append(t)


def host_copy(tree: Any, buffers: HostBuffers) -> tuple[Any, list[torch.Tensor]]:
    """`tree` (dicts, lists and tuples of tensors and plain values) with every tensor copied into host memory from
    `buffers`, and the copies (to give back once written); tensors that shared storage (tied weights) share their
    copy. Waits for GPU copies to land."""
    copies: dict[tuple, torch.Tensor] = {}
    copied = _copy(tree, copies, buffers)
    if any(t.is_pinned() for t in copies.values()):
        torch.cuda.synchronize()  # the non-blocking copies must land before the thread reads them
    return copied, list(copies.values())


def _copy(obj: Any, copies: dict[tuple, torch.Tensor], buffers: HostBuffers) -> Any:
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype)
        if key not in copies:
            # From a GPU into pinned memory the copy runs as a DMA, without the training thread's waiting on it.
            copies[key] = buffers.take(obj).copy_(obj.detach(), non_blocking=obj.device.type != "cpu")
        return copies[key]
    if isinstance(obj, dict):
        return {k: _copy(v, copies, buffers) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_copy(v, copies, buffers) for v in obj)
    return obj  # numbers, strings, None: nothing the training can change under the writer


def tensor_bytes(tree: Any) -> int:
    """The bytes of the tensors in `tree`: what `host_copy` allocates (shared storage counted once per view)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def available_host_bytes() -> int | None:
    """The memory the kernel says a new allocation can have without swapping (MemAvailable), or None: unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def fits_in_host_memory(nbytes: int, ranks_on_node: int) -> bool:
    """Whether a host copy of `nbytes` per rank, for every rank of the node, fits (unknown memory: it does not)."""
    available = available_host_bytes()
    return available is not None and nbytes * ranks_on_node <= _HOST_SHARE * available


def _test_delay(step: int) -> float:
    """The test hook's delay for the write of `step` (0 when unset or for another step)."""
    spec = os.environ.get(DELAY_VARIABLE, "")
    if ":" not in spec:
        return 0.0
    at, seconds = spec.split(":", 1)
    return float(seconds) if at.strip() == str(step) else 0.0


def _yield_cores_to_training() -> None:
    """Lower this thread's scheduling priority (nice 10; Linux sets it per thread): where the ranks fill the cores,
    the write (serialising, hashing, copying into the page cache) then takes the time training leaves idle instead
    of slowing its steps. Elsewhere, or where it is not allowed, the thread runs as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class BackgroundWrite:
    """One rank's files of the save at `step` (host copies), written by a thread, not yet renamed into place.

    `describe(path, error)` words a failed write (an OSError) as the message every rank will stop with."""

    def __init__(
        self,
        step: int,
        files: list[tuple[Path, dict]],
        describe: Callable[[Path, OSError], str],
        buffers: list[torch.Tensor] = (),
    ):
        self.step = step
        self.buffers = list(buffers)  # the host copies' tensors, for the next save once this one has ended
        self.written: dict[str, dict] = {}  # name -> size and digest, for the manifest
        self.staged: list[Path] = []  # the targets whose temporaries are whole and fsynced
        self.published: list[Path] = []  # those renamed into place (`publish`)
        self.error: str | None = None
        self.started = time.perf_counter()
        self._files, self._describe = files, describe
        self._thread = threading.Thread(target=self._run, name=f"hvdlm-checkpoint-{step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _yield_cores_to_training()
        path = None
        try:
            for path, state in self._files:
                save_checkpoint(path, state, self.written, publish=False)
                self.staged.append(path)
            time.sleep(_test_delay(self.step))
        except OSError as e:
            self.error = self._describe(path, e)
        except BaseException as e:  # noqa: BLE001 - whatever stops the thread must reach the ranks' poll as words
            self.error = f"the background write of checkpoint '{path}' failed ({type(e).__name__}: {e})"
        finally:
            self._files = []  # the host copies go as soon as they are on disk

    def state(self) -> str:
        """RUNNING, DONE, or the failure's message (what this rank contributes to the poll)."""
        if self._thread.is_alive():
            return RUNNING
        return self.error or DONE

    def wait(self) -> float:
        """Wait for the thread to end; returns the seconds waited."""
        start = time.perf_counter()
        self._thread.join()
        return time.perf_counter() - start

    def publish(self) -> None:
        """Rename this rank's written files into place (every rank's thread is done: the ranks agreed)."""
        while self.staged:
            publish(self.staged[0])
            self.published.append(self.staged.pop(0))

    def discard(self) -> None:
        """Wait for the thread, then take back what it wrote (its temporaries, and any file a failed `publish` put
        in place): a save that will never be complete leaves nothing."""
        self.wait()
        for path in self.staged:
            temporary_path(Path(os.path.realpath(path))).unlink(missing_ok=True)
        for path in self.published:
            path.unlink(missing_ok=True)
        self.staged, self.published = [], []
