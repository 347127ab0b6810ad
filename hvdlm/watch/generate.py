"""`hvdlm generate`: sample text from a run's checkpoint, in one plain process (no launcher, no MPI, no Horovod).

A checkpoint of any TP size is merged into one unsharded state (hvdlm.checkpoint.run.load_run_checkpoint) and
loaded into the plain model (TP size 1, whose layers never communicate). The model is rebuilt from the configuration
the checkpoint records, and the text is encoded with the tokenizer of the dataset that configuration names, so the
token ids mean what they meant in training. The same seed gives the same text (on the same device).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvdlm.checkpoint.run import load_run_checkpoint, model_config, run_tokenizer
from hvdlm.errors import InputError


@dataclass
class Generation:
    text: str  # the prompt followed by the continuation
    checkpoint: Path  # the file read (the first shard of a sharded checkpoint)
    step: int
    prompt_tokens: int
    context: int  # the model's seq_len: only the last `context` tokens condition each new token
    weights: str  # "model" or "ema"


@dataclass(frozen=True)
class Sampling:
    """How the continuation is sampled (`hvdlm generate`'s options of the same names)."""

    max_tokens: int = 200  # tokens to generate
    temperature: float = 0.8  # divides the logits: > 0; near 0, the most likely token almost always
    top_k: int = 40  # sample from the k most likely tokens (1: greedy)
    seed: int = 0  # the same seed gives the same text (on the same device)


def check_options(prompt: str, sampling: Sampling) -> None:
    """Refuse a prompt or sampling options that cannot work, before any checkpoint is read."""
    if not prompt:
        raise InputError("the prompt is empty: pass the text to continue, e.g. --prompt 'def main('.")
    if sampling.max_tokens < 1:
        raise InputError(f"--max-tokens {sampling.max_tokens}: generate at least 1 token, e.g. --max-tokens 200.")
    if not sampling.temperature > 0:  # also refuses NaN
        raise InputError(
            f"--temperature {sampling.temperature}: it must be > 0 (it divides the logits). Use e.g. 0.8; values "
            "near 0 pick the most likely token almost always."
        )
    if sampling.top_k < 1:
        raise InputError(
            f"--top-k {sampling.top_k}: sample from at least 1 token, e.g. --top-k 40 (--top-k 1 is greedy)."
        )


def generate(
    run_dir: str | Path,
    prompt: str,
    sampling: Sampling | None = None,
    checkpoint: str | Path | None = None,
    ema: bool = False,
) -> Generation:
    """Continue PROMPT with tokens sampled (`sampling`, default: Sampling()) from RUN_DIR's newest complete
    checkpoint, or from CHECKPOINT."""
    sampling = sampling or Sampling()
    check_options(prompt, sampling)
    run_dir = Path(run_dir)
    if checkpoint is None and not run_dir.is_dir():
        what = "is a file, not a directory" if run_dir.exists() else "does not exist"
        raise InputError(
            f"run directory '{run_dir}' {what}. Name a directory given to `hvdlm train --run-dir`"
            + (", or pass the file with --checkpoint." if run_dir.exists() else ".")
        )

    import torch  # only now: option errors above answer at once

    path, state = load_run_checkpoint(run_dir, checkpoint)
    cfg = model_config(state, path)
    tokenizer = run_tokenizer(state["config"], path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise InputError(
            f"the dataset's tokenizer has {tokenizer.vocab_size} tokens but the model of '{path}' only "
            f"{cfg.vocab_size}: the configuration names another dataset than the one the run trained on. "
            "Prepare the run's dataset again, or pass --checkpoint of a run trained on this dataset."
        )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = _plain_model(cfg, state, path, ema).to(device).eval()
    ids = tokenizer.encode(prompt)
    if not ids:  # cannot happen for byte-level tokenizers and a non-empty prompt, but the model needs a token
        raise InputError("the prompt encodes to no tokens; pass a longer --prompt.")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    # model.generate feeds back at most seq_len tokens: a longer prompt is cropped to its last seq_len tokens.
    out = model.generate(
        idx, sampling.max_tokens, temperature=sampling.temperature, top_k=sampling.top_k, generator=generator
    )
    return Generation(
        text=tokenizer.decode(out[0].tolist()),
        checkpoint=path,
        step=int(state["step"]),
        prompt_tokens=len(ids),
        context=cfg.seq_len,
        weights="ema" if ema else "model",
    )


def _plain_model(cfg, state: dict[str, Any], path: Path, ema: bool):
    """The plain model (TP size 1) with the checkpoint's weights, or its EMA weights."""
    from hvdlm.checkpoint.reshard import load_model
    from hvdlm.model import GPT
    from hvdlm.parallel.topology import Group

    # A group of one never communicates, so no MPI or Horovod is initialised.
    model = GPT(cfg, Group.single())
    if ema:
        if not state.get("ema"):
            raise InputError(
                f"checkpoint '{path}' holds no EMA weights (the run had train.ema_decay = 0). Drop --ema to "
                "sample with the trained weights."
            )
        state = {**state, "model": state["ema"]}
    load_model(model, state, str(path), 0, 1)
    return model
