"""Memory benchmark: the per-rank memory account and tokens/s of replicated data parallelism, ZeRO-1, ZeRO-2,
full recomputation and ZeRO with it, DP=2, the same model in one run; then the largest model (by n_layer at d_model
1024) that fits a per-rank memory budget, replicated against ZeRO-1 or ZeRO-2 + full recomputation.

    python bench/memory.py                  # the figures for bench/log/RESULTS.md
    python bench/memory.py --steps 6        # quicker

Part 1 trains with the real `hvdlm train` under mpirun (2 ranks, one thread each) and reads the memory account and
tokens/s from metrics.jsonl (tokens/s: the median of the rows after the first two steps).
`--settings replicated zero1 --repeats 3` interleaves an A/B comparison.

Part 2 is computed, not trained: weights, gradients and optimizer state from hvdlm.plan.memory's state_mb
(fp32, AdamW), plus activations measured with hvdlm.training.memory_account's ActivationMeter on this CPU for 1
and 2 layers of the d_model 1024 model (one sequence of seq_len tokens; the meter counts what a forward pass saves
for backward) and extrapolated linearly in n_layer and the micro-batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SETTINGS = {  # name: --set overrides
    "replicated": [],
    "zero1": ["train.zero=1"],
    "full recompute": ["model.recompute=full"],
    "zero1 + full recompute": ["train.zero=1", "model.recompute=full"],
    # ZeRO-2 with 2 MB buckets: the default 25 MB would put this 12 MB model in one bucket (no overlap, and the whole
    # gradient in flight at once); 2 MB is about the ratio of the default to a 100M-parameter model.
    "zero2": ["train.zero=2", "train.zero_bucket_mb=2"],
    "zero2 + full recompute": ["train.zero=2", "train.zero_bucket_mb=2", "model.recompute=full"],
}
MODEL = ["model.n_layer=4", "model.n_head=4", "model.d_model=256", "model.seq_len=128", "train.batch_size=8"]
KEYS = ("params_mb", "grads_mb", "optimizer_mb", "activations_mb")


def trained(steps: int, names: list[str]) -> dict[str, dict]:
    from helpers import TINY_JOB, mpirun, sets, train_argv

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.toml"
        job.write_text(TINY_JOB)
        common = [*MODEL, f"train.max_steps={steps}", "train.eval_interval=0", "train.sample_tokens=0"]
        common += ["train.log_interval=1", "train.tensorboard=false", "train.threads=1"]
        for i, name in enumerate(names):
            extra = SETTINGS[name]
            run_dir = Path(tmp) / f"{i}-{name.replace(' ', '_')}"
            proc = mpirun(2, train_argv(job, run_dir, *sets(*common, *extra)), timeout=1800)
            assert proc.code == 0, proc.out[-3000:]
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "loss" in r]
            figures = {k: rows[0][k] for k in KEYS}
            figures["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rows[2:])
            out.setdefault(name, []).append(figures)
            print(name, json.dumps(figures), flush=True)
    return out


def activation_mb_per_layer(d_model: int, seq_len: int, recompute: str) -> tuple[float, float]:
    """(MB per layer, MB of the rest) saved for backward by one sequence, from 1- and 2-layer models."""
    import torch

    from hvdlm.config import ModelConfig
    from hvdlm.model import GPT
    from hvdlm.plan.memory import MB
    from hvdlm.training.memory_account import ActivationMeter

    measured = []
    for n_layer in (1, 2):
        cfg = ModelConfig(n_layer=n_layer, n_head=16, d_model=d_model, seq_len=seq_len, recompute=recompute)
        model = GPT(cfg).train()
        x = torch.zeros(1, seq_len, dtype=torch.long)
        meter = ActivationMeter(model)
        with meter:
            model(x, x)[1]
        measured.append(meter.peak_bytes / MB)
    return measured[1] - measured[0], 2 * measured[0] - measured[1]


def largest_models(budget_gb: float, dp: int, micro_batch: int, seq_len: int = 1024, d_model: int = 1024) -> dict:
    from hvdlm.config import ModelConfig
    from hvdlm.model.size import parameter_count
    from hvdlm.plan.memory import state_mb

    out = {}
    # ZeRO-2's buckets in flight (a few train.zero_bucket_mb) are left out: tens of MB against a budget of GBs.
    settings = (("replicated", 0, "none"), ("zero1 + full recompute", 1, "full"), ("zero2 + full recompute", 2, "full"))
    for name, zero, recompute in settings:
        per_layer, rest = activation_mb_per_layer(d_model, seq_len, recompute)
        best = 0
        for n_layer in range(1, 1025):
            params = parameter_count(ModelConfig(n_layer=n_layer, n_head=16, d_model=d_model, seq_len=seq_len))
            state = state_mb(params, "adamw", dp=dp, zero=zero)
            total = sum(state.values()) + micro_batch * (per_layer * n_layer + rest)
            if total > budget_gb * 1024:
                break
            best = n_layer
        out[name] = {"n_layer": best, "activation_mb_per_layer_per_sequence": round(per_layer, 1)}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip-training", action="store_true", help="part 2 only")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help=f"of {list(SETTINGS)}, in this order")
    parser.add_argument("--repeats", type=int, default=1, help="the settings this many times, interleaved")
    parser.add_argument("--budget-gb", type=float, default=16.0)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    if not args.skip_training:
        print(json.dumps({"trained": trained(args.steps, args.settings * args.repeats)}))
    for dp in (2, 8):
        largest = largest_models(args.budget_gb, dp=dp, micro_batch=args.micro_batch)
        print(json.dumps({"largest": largest, "dp": dp, "budget_gb": args.budget_gb, "micro_batch": args.micro_batch}))


if __name__ == "__main__":
    main()
