"""Muon for the transformer blocks' matrices, AdamW for everything else, in one optimizer (train.optimizer = "muon").

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") keeps a momentum of each
matrix's gradient and steps along that momentum orthogonalized: U V^T of its SVD U S V^T, approximated by a few
Newton-Schulz iterations, so that every direction of the matrix moves by about the same amount. Embeddings, the
output head, LayerNorm gains and biases are no hidden matrices and keep AdamW, as in the published recipe.

The update of a matrix of A x B is scaled by 0.2 sqrt(max(A, B)), which gives it about the RMS of an AdamW update
(Liu et al. 2025, "Muon is scalable for LLM training"), so one learning rate and schedule (train.lr) serves both
kinds of parameter, and weight decay is decoupled as in AdamW.

With tensor parallelism a rank holds a slice of each matrix, and orthogonalizing slices would be another
optimizer: each rank gathers the whole matrix's update from its TP group (one allgather per matrix and step, the
matrix's size), orthogonalizes it as TP = 1 would, and keeps its own slice. ZeRO's flat slices are refused.

One class rather than torch.optim.Muon beside torch.optim.AdamW: Horovod's DistributedOptimizer wraps a single
optimizer, and checkpoints save one. torch.optim.Muon also iterates in bfloat16, which on these CPUs runs 13x
slower than fp32 (bench/log/RESULTS.md); here the iteration runs in bfloat16 on GPUs only.
"""

from __future__ import annotations

import math

import torch

from hvdlm.parallel.collectives import allgather
from hvdlm.parallel.layers import Sharding, full_shape, merge, shard
from hvdlm.parallel.topology import Group

# The quintic iteration's coefficients (Jordan et al. 2024): chosen for the steepest slope at zero, so that five
# steps bring every singular value into about [0.7, 1.2], close enough to 1 for an update direction.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """The parameters Muon steps: the blocks' 2-D weights (attention and MLP). Stage modules name blocks alike."""
    return p.dim() == 2 and name.startswith("blocks.")


def muon_groups(model: torch.nn.Module, groups: list[dict]) -> list[dict]:
    """The blocks' matrices taken out of `groups` (optim.param_groups' decay / no-decay split) into a first group
    that Muon steps, with the decay of the group they came from; AdamW steps what stays (embeddings, the tied head,
    biases, LayerNorm gains)."""
    hidden = [p for name, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(name, p)]
    for p in hidden:
        if hasattr(p, "tp_shard"):
            # Read by the step (a group cannot travel in the param groups: checkpoints save those).
            p.muon_tp_group = model.tp_group
    ids = {id(p) for p in hidden}
    decay = next(g["weight_decay"] for g in groups if any(id(p) in ids for p in g["params"]))
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids], "muon": False} for g in groups]
    return [{"params": hidden, "weight_decay": decay, "muon": True}, *rest]


def orthogonalize_shard(m: torch.Tensor, spec: Sharding, group: Group, steps: int = 5) -> torch.Tensor:
    """This rank's slice of the orthogonalized whole matrix, of which each rank of `group` holds the slice m."""
    if group.size == 1:
        return orthogonalize(m, steps)
    shards = allgather(m.unsqueeze(0), group, dim=0).unbind(0)
    return shard(orthogonalize(merge(list(shards), spec), steps), spec, group.rank, group.size)


def orthogonalize(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T for m = U S V^T: `steps` Newton-Schulz iterations on m scaled to norm 1."""
    x = m.to(torch.bfloat16 if m.is_cuda else torch.float32)
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=1e-7)  # the Frobenius norm bounds the spectral one: every singular value <= 1
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return (x if wide else x.T).to(m.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked "muon", AdamW (torch's update, state and names) on the others.

    Every hyperparameter has a default so that Horovod can rebuild the optimizer from its parameter groups alone.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
    ):
        # Per group: "muon" (muon_groups marks the blocks' matrices; the rest steps with AdamW), and the
        # Newton-Schulz iterations (five, the published setting).
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum, ns_steps=5, muon=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu)  # Nesterov: a step past the momentum
        spec = getattr(p, "tp_shard", None)
        if spec is None:
            direction = orthogonalize(update, group["ns_steps"])
        else:
            direction = orthogonalize_shard(update, spec, p.muon_tp_group, group["ns_steps"])
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(direction, alpha=-lr * 0.2 * math.sqrt(max(full_shape(p))))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        (beta1, beta2), lr, g = group["betas"], group["lr"], p.grad
        state["step"] += 1
        step = state["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
