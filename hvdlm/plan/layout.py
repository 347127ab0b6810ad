"""One layout: the tp x pp x dp grid of GPUs and the choices that shape a step (ZeRO stage, recomputation,
micro-batches). The memory and timing models read it; `layouts` enumerates and ranks them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    recompute: str
    micro_batch: int  # sequences per micro-batch (train.batch_size)
    microbatches: int  # micro-batches per step per replica (parallel.microbatches, or train.accumulation_steps)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
