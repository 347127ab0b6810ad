"""The checkpoint policy of a training run: when it saves, what every save holds, which saves it keeps, and how
a save is put back.

Every rank calls `save` at the same step (it gathers every rank's RNG state and ends in a barrier); the first
replica's ranks write one shard each, one per (pipeline stage, TP rank) (the whole model when tp = pp = 1), with
ZeRO every rank its slice of the optimizer state beside its shard (with ZeRO-3 its slice of the weights too:
hvdlm.checkpoint.slices), and only once every
file is on disk does rank 0 write the save's checksum manifest (every file's digest, hashed as it was written:
hvdlm.checkpoint.manifest) and then prune beyond `train.keep_checkpoints`, so the newest save is whole
before an older one goes.

With train.async_checkpoint a periodic save copies the state to host memory and a thread writes it
(hvdlm.checkpoint.async_writer); `poll`, at every step boundary while it is in flight, puts it in place once every
rank has written. At most one save is in flight: the next save, preemption and the end of the run wait for it
(`drain`); an error exit takes it back (`abandon`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import horovod.torch as hvd
import torch

from hvdlm.checkpoint.async_writer import (
    DONE,
    RUNNING,
    BackgroundWrite,
    HostBuffers,
    fits_in_host_memory,
    host_copy,
    tensor_bytes,
)
from hvdlm.checkpoint.format import save_checkpoint, training_state
from hvdlm.checkpoint.manifest import manifest_path, write_manifest
from hvdlm.checkpoint.reshard import load_optimizer, merge_tp, shard_state
from hvdlm.checkpoint.store import checkpoint_path, find_checkpoints, prune_checkpoints, slice_name
from hvdlm.config import JobConfig
from hvdlm.errors import InputError
from hvdlm.parallel import jobwide
from hvdlm.parallel.agreement import together
from hvdlm.parallel.split import chunk_layers, layer_range, layers_per_rank, rank_chunks
from hvdlm.parallel.topology import Topology, dp_group_ranks, elastic_job


class CheckpointedOptimizer(Protocol):
    """What a save asks of the optimizer (hvdlm.optim.interface.TrainingOptimizer has it)."""

    def checkpoint_view(self) -> Any:
        """The optimizer as the shard file saves and a resume loads it, like a plain torch optimizer."""

    def checkpoint_slice(self) -> dict[str, Any] | None:
        """This rank's slice of the state for a file of its own (ZeRO), or None: the shard file holds it."""


class RunState(Protocol):
    """What a save holds beyond the config: the Trainer has these."""

    model: torch.nn.Module
    optimizer: CheckpointedOptimizer
    ema: Any  # WeightEMA or None
    precision: Any  # Precision: the fp16 gradient scaler
    train_batches: Any  # WindowSampler: the data position
    progress: dict


class CheckpointManager:
    def __init__(self, run_dir: Path, cfg: JobConfig, topo: Topology, device: torch.device):
        self.run_dir, self.cfg, self.topo, self.device = run_dir, cfg, topo, device
        self.in_flight: BackgroundWrite | None = None  # the background save not yet put in place
        self._noted_sync = False  # "auto" said once why it writes synchronously
        self._host_buffers = HostBuffers()  # the host copies' memory, reused by every background save

    def due(self, step: int) -> bool:
        """A periodic save falls on this step (the final one is the trainer's to ask for)."""
        interval = self.cfg.train.checkpoint_interval
        return bool(interval) and step % interval == 0 and step != self.cfg.train.max_steps

    def paths(self, step: int) -> list[Path]:
        """The files of the save at `step`, one per (stage, TP rank), stage-major."""
        tp, pp = self.topo.tp, self.topo.pp
        return [checkpoint_path(self.run_dir, step, r % tp, tp, r // tp, pp) for r in range(pp * tp)]

    def save(self, step: int, run: RunState, background: bool = False) -> None:
        """The checkpoint at `step`, written by the first replica's TP ranks; called by every rank. `background`:
        written by a thread while training goes on when train.async_checkpoint allows (see `poll`); a save still
        in flight is always put in place first (at most one is in flight: the next one waits for it)."""
        self._wait_for_previous(step)
        topo = self.topo
        path = self.paths(step)[topo.pp_rank * topo.tp + topo.tp_rank]
        if hvd.rank() == 0:
            # A manifest of an earlier save at this step (a resumed attempt) would not describe the files about to
            # replace its own; it goes before any rank writes (the allgather below orders that).
            manifest_path(path).unlink(missing_ok=True)
        # Every rank's RNG state, by global rank; a shard keeps those of its DP group, in DP-rank order.
        rngs = jobwide.allgather_object(rng_state(self.device), f"rng.{step}")
        files = self._own_files(step, run, path, run.optimizer.checkpoint_slice(), rngs)
        if background and self._in_background(step, files):
            copied, buffers = host_copy(files, self._host_buffers)
            self.in_flight = BackgroundWrite(step, copied, self._failure_message, buffers)
            return
        # Every rank hears whether every shard (and ZeRO slice) is on disk: a full disk on one writer stops all ranks
        # together, and each takes back the files of this save it did write (whole, yet useless without the rest).
        written: dict[str, dict] = {}  # name -> size and digest, for the manifest
        try:
            with together(f"saved.{step}"):
                for file, state in files:
                    self._write(file, state, written)
        except InputError:
            for name in written:
                (path.parent / name).unlink(missing_ok=True)
            raise
        self._complete(step, written)

    def _complete(self, step: int, written: dict[str, dict]) -> None:
        """Every file of the save at `step` is on disk on every rank: the manifest, then pruning (rank 0)."""
        self._write_manifest(step, self.paths(step)[0], written)
        if hvd.rank() == 0:
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints, newest=step)

    # -- saves in the background (hvdlm.checkpoint.async_writer) ----------------------------------------------

    def _in_background(self, step: int, files: list[tuple[Path, dict]]) -> bool:
        """Whether this save goes to a thread: train.async_checkpoint, and with "auto" every rank's host copy
        fits in its node's memory (every rank hears every rank's answer, so all decide alike)."""
        setting = self.cfg.train.async_checkpoint
        if setting == "off" or elastic_job():  # an elastic reset between steps would strand a save's agreement
            return False
        if setting == "on":
            return True
        need = tensor_bytes([state for _, state in files])
        fits = all(jobwide.allgather_object(fits_in_host_memory(need, hvd.local_size()), f"async_fits.{step}"))
        if not fits and not self._noted_sync and hvd.rank() == 0:
            self._noted_sync = True
            print(
                f'note: train.async_checkpoint = "auto": saves are written synchronously, as a host copy of the '
                f"state ({need / 2**20:,.0f} MiB per rank) does not fit in the memory available on every node",
                flush=True,
            )
        return fits

    def poll(self, step: int) -> None:
        """At the boundary after `step` (every rank, the same step): put the save in flight in place once every
        rank's write is done; a write that failed on any rank stops every rank. Nothing in flight: no collective."""
        if self.in_flight is None:
            return
        states = jobwide.allgather_object(self.in_flight.state(), f"async_poll.{step}")
        if RUNNING in states and set(states) <= {RUNNING, DONE}:
            return  # still writing somewhere, and nothing failed: ask again after the next step
        self._conclude(states)

    def drain(self) -> float:
        """Wait for the save in flight and put it in place (every rank calls it, at the same point: preemption,
        the end of the run, the next save); returns the seconds this rank waited."""
        if self.in_flight is None:
            return 0.0
        waited = self.in_flight.wait()
        self._conclude(jobwide.allgather_object(self.in_flight.state(), f"async_drain.{self.in_flight.step}"))
        return waited

    def abandon(self) -> None:
        """An error exit on this rank: wait for the write in flight to end, then take its files back. Putting them
        in place needs every rank's word, which an error exit cannot ask for: the previous save stays the newest."""
        if self.in_flight is not None:
            self.in_flight.discard()
            self.in_flight = None  # (its buffers go with the run)

    def _wait_for_previous(self, step: int) -> None:
        if self.in_flight is None:
            return
        previous = self.in_flight.step
        waited = self.drain()
        if waited > 0.01 and hvd.rank() == 0:
            print(
                f"checkpoint: the save of step {step} waited {waited:.2f} s for the write of step {previous} "
                "(at most one save is in flight; a longer train.checkpoint_interval avoids the wait)",
                flush=True,
            )

    def _conclude(self, states: list[str]) -> None:
        """Every rank's write has ended (or one failed): every rank puts its files in place and rank 0 completes
        the save, or every rank takes its files back and raises the first failure."""
        written, self.in_flight = self.in_flight, None
        failures = [s for s in states if s not in (RUNNING, DONE)]
        if failures:
            written.discard()
            raise InputError(failures[0])
        self._host_buffers.give_back(written.buffers)  # every rank's thread has ended: nothing reads them now
        with together(f"published.{written.step}"):
            try:
                written.publish()
            except OSError as e:
                written.discard()
                raise InputError(self._failure_message(self.paths(written.step)[0], e)) from None
        self._complete(written.step, written.written)

    def _write_manifest(self, step: int, path: Path, written: dict[str, dict]) -> None:
        """Rank 0 writes the save's manifest, last: every rank's file digests, gathered once all are on disk."""
        digests = jobwide.allgather_object(written, f"digests.{step}")
        with together(f"manifest.{step}"):
            if hvd.rank() == 0:
                files = {name: entry for rank in digests for name, entry in rank.items()}
                try:
                    write_manifest(manifest_path(path), step, files)
                except OSError as e:
                    raise InputError(
                        f"cannot write the checksum manifest of step {step} in '{path.parent}': {e.strerror or e}. "
                        "Its files are whole and load unverified; free space there and continue with --resume auto."
                    ) from None

    def _own_files(
        self, step: int, run: RunState, path: Path, own_slice: dict | None, rngs: list
    ) -> list[tuple[Path, dict]]:
        """This rank's part of the save at `step`, as (file, state) in writing order: its ZeRO slice, and its shard
        if it is its DP group's first. The states hold the live tensors (a background save copies them)."""
        topo = self.topo
        sliced = own_slice is not None
        files = []
        if sliced:
            # ZeRO: each DP rank writes its own slice of the optimizer state; no rank holds the whole. The shard's
            # writer writes its slice first, so a shard file on disk always has a slice file naming their count.
            state = {"step": step, **own_slice}
            files.append((path.with_name(slice_name(path.name, topo.dp_rank, topo.dp)), state))
        if topo.dp_rank == 0:
            state = training_state(
                run.model,
                run.optimizer.checkpoint_view(),
                step,
                self.cfg.to_dict(),
                topo.tp_rank,
                topo.tp,
                data=run.train_batches.state_dict(),  # (epoch, position, seed): a resume takes the next sample
                ema=run.ema.state_dict() if run.ema else None,
                scaler=run.precision.state_dict(),
                rng=[rngs[r] for r in dp_group_ranks(hvd.rank(), hvd.size(), topo.tp, topo.pp)],
                progress=dict(run.progress),
                pp=stage_record(self.cfg, topo.pp_rank) if topo.pp > 1 else None,
                zero_slices={"size": topo.dp, "files": [slice_name(path.name, d, topo.dp) for d in range(topo.dp)]}
                if sliced
                else None,
            )
            if sliced and "weights" in own_slice:  # ZeRO-3: the slices hold the weights, never gathered to save
                held = {name for names in own_slice["weights"]["names"] for name in names}
                state["model"] = {name: t for name, t in state["model"].items() if name not in held}
            if topo.tp == 1:  # one file: the real vocabulary, without the rows padded for fast kernels
                state = merge_tp([state])
            files.append((path, state))
        return files

    def _write(self, path: Path, state: dict[str, Any], written: dict[str, dict]) -> None:
        try:
            save_checkpoint(path, state, digests=written)
        except OSError as e:
            raise InputError(self._failure_message(path, e)) from None

    def _failure_message(self, path: Path, e: OSError) -> str:
        """What every rank stops with when checkpoint file `path` cannot be written."""
        step = int(path.name.split(".")[0].removeprefix("step-"))
        older = [saved.step for saved in find_checkpoints(self.run_dir) if saved.step < step]
        kept = f"the checkpoint of step {older[0]} is intact" if older else "no earlier checkpoint exists"
        return (
            f"cannot write checkpoint '{path}': {e.strerror or e}. Nothing half-written is left and {kept}. "
            "Free space there (or fix its permissions), or resume in a run directory on another disk, "
            "then continue with --resume auto."
        )

    def restore(self, state: dict[str, Any], run: RunState, local: bool = False, sliced: bool = False) -> int:
        """Put a save's optimizer, EMA, scaler, data position and RNG back into `run` (whose model is loaded);
        returns its step. `local`: `state` is this TP rank's own file (its tensors loaded as they are); `sliced`:
        the optimizer has taken its own slice file already (ZeRO at the layout that saved)."""
        topo = self.topo
        if not sliced:
            load_optimizer(run.optimizer.checkpoint_view(), run.model, state, topo.tp_rank, topo.tp, local)
        if run.ema is not None and "ema" in state:
            run.ema.load_state_dict(shard_state(run.model, state["ema"], topo.tp_rank, topo.tp, local))
        # (a save without an EMA: it starts from the weights, which is what WeightEMA() did)
        run.precision.load_state_dict(state.get("scaler"))
        run.train_batches.load_state_dict(state["data"])
        rngs = state.get("rng") or []
        if len(rngs) == topo.dp:
            set_rng_state(rngs[topo.dp_rank], self.device)
        else:  # another number of replicas: new dropout streams, so not bit-identical to an uninterrupted run
            torch.manual_seed(self.cfg.train.seed + 1 + topo.dp_rank + 7919 * state["step"])
            if hvd.rank() == 0:
                print(
                    f"note: the checkpoint was written by another layout ({len(rngs)} replica(s) or other pipeline "
                    f"stages; this run has {topo.dp} replica(s)); dropout draws new masks from here",
                    flush=True,
                )
        run.progress.update(state.get("progress") or {})
        return state["step"]


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's random generators (dropout's streams), as a save keeps them."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put a saved rng_state back, so the resumed run draws what the uninterrupted one would have."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def stage_record(cfg: JobConfig, rank: int) -> dict[str, Any]:
    """Which stage a file holds: its index, the number of stages, and the layers per stage; with virtual stages
    also their number and the global indices of this stage's blocks."""
    p = cfg.parallel
    counts = chunk_layers(cfg.model.n_layer, p.pp, p.pp_layers, p.virtual_stages)
    record = {"rank": rank, "size": p.pp, "layers": layers_per_rank(counts, p.pp, p.virtual_stages)}
    if p.virtual_stages > 1:
        chunks = rank_chunks(p.pp, p.virtual_stages, rank)
        record |= {"virtual_stages": p.virtual_stages, "blocks": [list(layer_range(counts, j)) for j in chunks]}
    return record
