"""A candidate: one layout the planner scores, i.e. the tp x pp x dp grid of GPUs and the choices that shape a step
(ZeRO stage, recomputation, micro-batches). The memory and timing models read it; `layouts` enumerates and ranks
the candidates. Its answers (text and JSON) call it a layout, the word users know."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    tp: int
    pp: int
    dp: int
    zero: int
    recompute: str
    micro_batch: int  # sequences per micro-batch (train.batch_size)
    microbatches: int  # micro-batches per step per replica (parallel.microbatches, or train.accumulation_steps)
    virtual_stages: int = 1  # chunks per pipeline stage (parallel.virtual_stages): the interleaved schedule

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all replicas."""
        return self.micro_batch * self.microbatches * self.dp

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
