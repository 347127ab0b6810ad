"""The plain reference for hvdlm's GPU step: GPT-2 (124M) trained by one single-file PyTorch loop, nanoGPT-style;
with --arch llama, a Llama of the same loop (RMSNorm, RoPE, SwiGLU, grouped-query attention, an untied head),
torchtitan-style.

What the best single-GPU GPT-2 trainers do (nanoGPT train.py / model.py, llm.c train_gpt2.py): torch.compile,
fused AdamW, bf16 autocast, TF32 for what stays fp32, flash attention (scaled_dot_product_attention), the
vocabulary padded to a multiple of 64 (50257 -> 50304), weight tying, no host synchronisation inside a step
(the loss is read only at the end of the timing). Nothing here imports hvdlm: it is the yardstick.

    python bench/plain_gpt2.py --steps 50                     # GPT-2 small on the GPU, random tokens
    python bench/plain_gpt2.py --device cpu --n-layer 2 --d-model 64 --n-head 2 --seq-len 64 --batch 4 \\
        --vocab 512 --steps 4 --dtype fp32 --no-compile      # the logic, on a CPU, in seconds
    python bench/plain_gpt2.py --arch llama --n-kv-head 4 --d-ff 2048 --vocab 32000 --real-vocab 32000 \\
        --steps 50                                            # a ~125M Llama (d 768, 12 layers, 12 on 4 heads)

Prints one JSON line: tokens_per_s, ms_per_step, mfu (when --peak-tflops or a known GPU gives a peak), loss.
The tokens are random (uniform over the real vocabulary) unless --tokens names a flat binary file of token ids
(uint16 or uint32, --tokens-dtype): a speed check needs the shapes, not the text.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on GPUs
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        # GPT-2's GELU is the exact erf one (as hvdlm's): the same FLOPs and numerics as the model compared.
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, n_layer: int, n_head: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class RMSNorm(nn.Module):
    """Llama's norm, computed in fp32 (as transformers' LlamaRMSNorm and hvdlm): a gain, no shift."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).type_as(x)


def rope(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) of rotary positions over the two halves of each head (transformers' rotate_half)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in fp32 (torchtitan and hvdlm rotate in fp32 under bf16 autocast too), back in x's dtype."""
    h = x.float()
    a, b = h.chunk(2, dim=-1)
    return (h * cos + torch.cat([-b, a], dim=-1) * sin).type_as(x)


class LlamaAttention(nn.Module):
    def __init__(self, d: int, n_head: int, n_kv_head: int):
        super().__init__()
        self.n_head, self.n_kv, self.hs = n_head, n_kv_head, d // n_head
        self.qkv = nn.Linear(d, d + 2 * n_kv_head * self.hs, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([C, self.n_kv * self.hs, self.n_kv * self.hs], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv, self.hs).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # Each key/value head serves n_head / n_kv query heads (flash attention reads them once).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class LlamaBlock(nn.Module):
    def __init__(self, d: int, n_head: int, n_kv_head: int, d_ff: int):
        super().__init__()
        self.ln_1, self.attn = RMSNorm(d), LlamaAttention(d, n_head, n_kv_head)
        self.ln_2 = RMSNorm(d)
        self.gate, self.up = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin)
        h = self.ln_2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))  # SwiGLU


class Llama(nn.Module):
    """The Llama decoder; no position table, the head untied from the token embedding (as Llama 3 8B)."""

    def __init__(self, vocab: int, seq_len: int, n_layer: int, n_head: int, d: int, n_kv_head: int, d_ff: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, n_head, n_kv_head, d_ff) for _ in range(n_layer))
        self.ln_f = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.apply(GPT._init)
        for name, p in self.named_parameters():  # the scaled init of the residual projections, as GPT-2's
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
        cos, sin = rope(seq_len, d // n_head, 10000.0, "cpu")
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x, cos, sin = self.wte(idx), self.cos[:T], self.sin[:T]  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


# Peak dense bf16 TFLOP/s (datasheets, no sparsity), for MFU; --peak-tflops overrides.
PEAKS = {"H100 NVL": 835.0, "H100 PCIe": 756.5, "H100": 989.4, "H200 NVL": 835.0, "H200": 989.4, "A100": 312.0}


def peak_of(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS.items():  # longest names first in the table's order
        if key.lower() in name.lower():
            return value
    return None


def make_model(args) -> nn.Module:
    shape = (args.vocab, args.seq_len, args.n_layer, args.n_head, args.d_model)
    if args.model == "plain" and args.arch == "llama":
        return Llama(*shape, args.n_kv_head or args.n_head, args.d_ff or ffn_width(args.d_model))
    if args.model == "plain":
        return GPT(*shape)
    from hvdlm.config import ModelConfig
    from hvdlm.model.gpt import GPT as HvdlmGPT

    llama = {"n_kv_head": args.n_kv_head, "d_ff": args.d_ff, "tie_embeddings": False} if args.arch == "llama" else {}
    shape = ModelConfig(args.n_layer, args.n_head, args.d_model, args.seq_len, args.vocab, arch=args.arch, **llama)
    return HvdlmGPT(shape)


def ffn_width(d: int) -> int:
    """SwiGLU's default width: 8/3 d rounded up to a multiple of 256 (Meta's multiple_of)."""
    return -(-8 * d // (3 * 256)) * 256


def variant_name(args) -> str:
    name = "plain" if args.arch == "gpt2" else "plain llama"
    if args.model == "hvdlm":
        name += " (hvdlm's model, compile_parts)" if args.compile_parts else " (hvdlm's model)"
    return name + (" + a host read each step" if args.sync_each_step else "")


def loss_of(out) -> torch.Tensor:
    return out[1] if isinstance(out, tuple) else out  # hvdlm's model returns (logits, loss)


def write_profile(path: str, one_step, device: torch.device, steps: int = 5) -> None:
    """The operators (and on GPUs the kernels) of `steps` steps by their own time, as hvdlm's train.profile_steps
    writes them, so that the two profiles of the GPU check compare line by line."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
    with open(path, "w") as f:
        f.write(f"torch.profiler over {steps} step(s) of the plain loop, {device.type}; sorted by {sort}\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps, timed after --warmup")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing (compilation)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per micro-step")
    ap.add_argument("--accumulation", type=int, default=1, help="micro-steps per optimizer step")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304, help="model vocabulary: GPT-2's 50257 padded to 64")
    ap.add_argument("--real-vocab", type=int, default=50257, help="token ids are drawn below this")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    ap.add_argument("--n-kv-head", type=int, default=0, help="llama: key/value heads (0: --n-head)")
    ap.add_argument("--d-ff", type=int, default=0, help="llama: SwiGLU width (0: 8/3 d_model up to 256)")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--tokens", default="", help="flat binary file of token ids to sample windows from")
    ap.add_argument("--tokens-dtype", default="uint16")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--profile", default="", help="after the timing, record 5 steps with torch.profiler into FILE")
    # What splits hvdlm's gap to this loop: its model in this loop, compiled as its trainer does, and this loop with
    # the trainer's one host read a step (the skip check of a non-finite loss or gradient norm).
    ap.add_argument("--model", choices=("plain", "hvdlm"), default="plain", help="hvdlm: hvdlm.model.gpt.GPT")
    ap.add_argument("--compile-parts", action="store_true", help="hvdlm's model: compile_parts() as its trainer")
    ap.add_argument("--sync-each-step", action="store_true", help="read loss and norm on the host each step")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    # TF32 for what stays in fp32 (nanoGPT, llm.c): no effect on the bf16 matmuls.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = make_model(args).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"  # one kernel for the whole update (CPU: the default foreach path)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    if args.compile and args.compile_parts:
        model.compile_parts()  # each block, and the head with the loss (hvdlm's trainer on GPUs)
    step_model = torch.compile(model) if args.compile and not args.compile_parts else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    B, T, real_vocab = args.batch, args.seq_len, min(args.real_vocab, args.vocab)
    data = np.memmap(args.tokens, dtype=args.tokens_dtype, mode="r") if args.tokens else None
    gen = torch.Generator().manual_seed(args.seed)
    pin = device.type == "cuda"

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        if data is None:
            xy = torch.randint(0, real_vocab, (B, T + 1), generator=gen)
        else:
            starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen).tolist()
            xy = torch.from_numpy(np.stack([data[s : s + T + 1].astype(np.int64) for s in starts]))
        if pin:
            xy = xy.pin_memory()
        xy = xy.to(device, non_blocking=True)  # the copy overlaps the GPU's work on the previous step
        return xy[:, :-1], xy[:, 1:]

    total = args.warmup + args.steps
    batches = [batch()]  # the next micro-batch, prepared ahead

    def one_step() -> torch.Tensor:
        for _ in range(args.accumulation):
            x, y = batches.pop()
            with autocast:
                loss = loss_of(step_model(x, y)) / args.accumulation
            batches.append(batch())  # the next batch is prepared while the GPU runs this one's backward
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if args.sync_each_step:  # a skip decided on the host (hvdlm.training.verdict): one wait for the device
            torch.stack([torch.isfinite(loss), torch.isfinite(norm)]).tolist()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach() * args.accumulation

    losses = []
    for step in range(total):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = one_step()
        if step in (0, total - 1):
            losses.append(loss)  # read after the timing: no sync in the loop
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if args.profile:  # after the timing, so the figures above are the profiler's free
        write_profile(args.profile, one_step, device)
    tokens_per_s = B * T * args.accumulation * args.steps / elapsed
    # Parameters in matmuls: all but the tables only looked up (nanoGPT's non-embedding count, as hvdlm's
    # num_params): GPT-2's position table (its tied head counts once); a Llama's token table (its head is apart).
    lookup = args.vocab if args.arch == "llama" else args.seq_len
    matmul_params = sum(p.numel() for p in model.parameters()) - lookup * args.d_model
    flops_per_token = 6 * matmul_params + 12 * args.n_layer * T * args.d_model  # as hvdlm (PaLM appendix B)
    peak = args.peak_tflops or peak_of(device)
    row = {
        "impl": variant_name(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params_M": round(matmul_params / 1e6, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "mfu": round(tokens_per_s * flops_per_token / (peak * 1e12), 4) if peak else None,
        "loss_first": round(losses[0].item(), 4),
        "loss_last": round(losses[-1].item(), 4),
        "compile": args.compile,
        "dtype": args.dtype,
    }
    if device.type == "cuda":
        row["max_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
