"""One pipeline stage of the GPT: a run of consecutive blocks, with the embeddings on the first stage and the
final norm, output head and loss on the last (Megatron's pre_process / post_process).

    first stage    idx (B, T)  -> tok_emb (+ pos_emb) -> blocks[a:b] -> x (B, T, C)
    middle stage   x (B, T, C) -> blocks[b:c]                        -> x (B, T, C)
    last stage     x (B, T, C) -> blocks[c:L] -> ln_f -> head        -> loss

Parameter names are those of the whole GPT (`blocks.5.attn.qkv.weight` on whichever stage holds block 5), so the
stages' state dicts put together are the GPT's, and checkpoints merge by union (hvdlm.checkpoint.reshard).

A tied output head (model.tie_embeddings) is the token embedding, which lives on the first stage. The last stage
holds its own copy (`head.weight`, marked `pipeline_tied_copy`), initialised to the same values; the trainer sums
the two copies' gradients over the embedding group every step, so both take the same update and stay
bit-identical. An untied head (llama) lives on the last stage only, and nothing is exchanged.

Initialisation is layout-independent: the stage draws every full tensor of the whole GPT in the GPT's order from
torch's global generator (one tensor at a time) and keeps the ones it holds, so a stage built after
torch.manual_seed(s) holds exactly the tensors of the GPT built after torch.manual_seed(s).

With virtual stages (parallel.virtual_stages = v, hvdlm.parallel.interleaved) the split has p x v chunks and
stage r holds chunks r, r + p, ...: blocks of several non-adjacent runs, still under their global names (so
checkpoints join and cut as any other), the embeddings with chunk 0 of stage 0 and the head with the last chunk of
the last stage. `forward(inp, targets, chunk=c)` runs the stage's c-th chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from hvdlm.config import ModelConfig
from hvdlm.model.gpt import GPT, Block, check_tp_size, embed, initial_values, learned_positions, output_head
from hvdlm.model.parts import PARTS, rotary_of
from hvdlm.model.recompute import recomputed
from hvdlm.parallel.layers import VocabParallelEmbedding, vocab_parallel_cross_entropy
from hvdlm.parallel.split import layer_range, rank_chunks
from hvdlm.parallel.topology import Group


class GPTStage(nn.Module):
    """Stage `stage` of a GPT split into len(counts) / virtual stages, counts[j] blocks in chunk j
    (hvdlm.parallel.split), `virtual` chunks per stage."""

    def __init__(
        self,
        cfg: ModelConfig,
        counts: list[int],
        stage: int,
        tp_group: Group | None = None,
        virtual: int = 1,
        init: bool = True,
    ):
        super().__init__()
        rng = torch.get_rng_state()  # where the whole GPT's construction would start drawing
        stages = len(counts) // virtual
        self.cfg, self.stage, self.counts, self.virtual = cfg, stage, counts, virtual
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        # The global block indices of each of the stage's chunks.
        self.chunks = [list(layer_range(counts, j)) for j in rank_chunks(stages, virtual, stage)]
        self.tp_group = g = tp_group or Group.single()
        check_tp_size(cfg, g.size)
        if self.is_first:
            self.tok_emb = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, g)
            self.pos_emb = learned_positions(cfg)
            self.drop = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed by the global block index: the names match the whole GPT's.
        rotary = rotary_of(cfg)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, g, rotary) for chunk in self.chunks for i in chunk})
        if self.is_last:
            self.ln_f = PARTS[cfg.arch].norm(cfg)
            # One stage: tied as in the GPT; a last stage of several: the tied weight's copy, or an untied head.
            self.head = output_head(cfg, g, self.tok_emb if self.is_first else None)
        torch.set_rng_state(rng)
        with torch.device("meta"):  # the whole GPT's parameter counts, without memory or random draws
            whole = GPT(cfg, g, init=False)
        self._whole = whole.num_params(non_embedding=False), whole.num_params()
        if init:  # (init=False: the tensors as allocated, for a caller that places `initial_values` itself)
            with torch.no_grad():
                for p, value in self.initial_values():
                    p.copy_(value)

    def initial_values(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """This stage's parameters with the values the whole GPT built now would give them: every full tensor is
        drawn in the GPT's order (hvdlm.model.gpt.initial_values), the stage's kept; a last stage's tied head copy
        gets the embedding's."""
        own, tied = dict(self.named_parameters(remove_duplicate=False)), self.cfg.tie_embeddings
        for key, value in initial_values(self.cfg, self.tp_group):
            for target in (key, "head.weight") if key == "tok_emb.weight" and tied else (key,):
                if target in own:
                    yield own[target], value

    def num_params(self, non_embedding: bool = True) -> int:
        """The whole GPT's parameter count (as GPT.num_params), for FLOPs and the banner."""
        return self._whole[1] if non_embedding else self._whole[0]

    def forward(self, inp: torch.Tensor, targets: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        """First stage's first chunk: token ids (B, T); others: the residual stream (B, T, C). Returns the residual
        stream (B, T, C), or from the last stage's last chunk the mean cross-entropy against targets (B, T)."""
        if self.is_first and chunk == 0:
            x = self.drop(embed(self.tok_emb, self.pos_emb, inp))  # (B, T, C)
        else:
            x = inp
        for i in self.chunks[chunk]:
            block = self.blocks[str(i)]
            x = recomputed(block, x) if self.cfg.recompute == "full" else block(x)  # as in GPT.forward
        if not (self.is_last and chunk == self.virtual - 1):
            return x
        logits = self.head(self.ln_f(x))  # (B, T, V / p)
        return vocab_parallel_cross_entropy(logits, targets, self.tp_group, self.cfg.vocab_size)


def tied_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stage's copy of the tied embedding/head weight: the embedding on the first stage, the head on the last
    (both on a one-stage model, where they are one tensor); none on middle stages, and none with an untied head."""
    if not model.cfg.tie_embeddings:
        return []
    found = {id(p): p for name, p in model.named_parameters() if name in ("tok_emb.weight", "head.weight")}
    return list(found.values())
