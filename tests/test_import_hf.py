"""`--init-from DIR` with a directory transformers wrote: a GPT-2 model and its tokenizer start an hvdlm run.

A randomly initialised GPT2LMHeadModel (activation_function="gelu", every tensor perturbed so that no bias is
zero and no LayerNorm gain one: a misplaced tensor shows) and a BPE tokenizer are saved by transformers; the data
is prepared with `hvdlm data prepare --tokenizer DIR`. hvdlm's step-0 validation loss equals the one transformers
computes on the same windows, at TP 1 and TP 2, and the fine-tuned run exports back into transformers. Models hvdlm
does not compute (Mistral, gelu_new), a missing weights file, a tokenizer larger than the model's vocabulary, data
of another tokenizer and a job of another shape are refused with exit code 2 before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, metrics, mpirun, run_cli, sets, train_argv

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub, no network

from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from hvdlm.data import open_dataset  # noqa: E402
from hvdlm.data.sampler import WindowSampler  # noqa: E402
from hvdlm.data.tokenizer import EOT, train_bpe  # noqa: E402

pytestmark = pytest.mark.distributed

SEQ_LEN, BATCH, EVAL_BATCHES, SEED = 64, 4, 2, 1337
# The [model] keys that must match the transformers config (vocab_size follows from the tokenizer).
MODEL_KEYS = ["model.n_layer=2", "model.n_head=2", "model.d_model=32", f"model.seq_len={SEQ_LEN}"]


def _sources() -> list[str]:
    return sorted(str(p) for p in (REPO / "hvdlm").rglob("*.py"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 with the exact GELU and its tokenizer, as transformers' save_pretrained writes them."""
    out = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    tok = train_bpe((Path(p).read_text() for p in _sources()), 320)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok._tok, bos_token=EOT, eos_token=EOT)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=SEQ_LEN, vocab_size=len(tokenizer), activation_function="gelu"
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _prepare(out: Path, tokenizer: str) -> Path:
    r = run_cli("data", "prepare", REPO / "hvdlm", "--glob", "**/*.py", "--tokenizer", tokenizer, "--out", out)
    assert r.code == 0, r.out
    return out


@pytest.fixture(scope="module")
def dataset(hf_dir, tmp_path_factory) -> Path:
    """hvdlm's sources in the model's tokens."""
    out = _prepare(tmp_path_factory.mktemp("data") / "with-hf-tokenizer", str(hf_dir))
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["type"] == "pretrained"
    return out


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory) -> Path:
    """The same sources in byte tokens: data the model cannot read."""
    return _prepare(tmp_path_factory.mktemp("data") / "bytes", "byte")


def _train(np: int, job: Path, run_dir: Path, cache: Path, init_from: Path, *overrides: str):
    settings = [
        *MODEL_KEYS,
        f"train.batch_size={BATCH}",
        f"train.eval_batches={EVAL_BATCHES}",
        f"train.seed={SEED}",
        "train.max_steps=2",
        "train.eval_interval=2",
        "train.sample_tokens=0",
        *overrides,
    ]
    return mpirun(np, train_argv(job, run_dir, "--init-from", str(init_from), *sets(*settings)), cache)


def _transformers_val_loss(model_dir: Path, dataset: Path) -> float:
    """transformers' loss on the validation windows hvdlm's step-0 evaluation reads (one replica, the same seed)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batches = WindowSampler(open_dataset(dataset).val, SEQ_LEN, BATCH, 0, 1, SEED)
    losses = []
    with torch.no_grad():
        for i in range(EVAL_BATCHES):
            x, y = batches.eval_batch(i)
            logits = model(x).logits
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tp", [1, 2])
def test_step_0_validation_loss_is_transformers_and_the_run_exports_back(hf_dir, dataset, job, tmp_path, cache_dir, tp):
    run_dir = tmp_path / f"ft-tp{tp}"
    r = _train(tp, job, run_dir, cache_dir, hf_dir, f"parallel.tp={tp}", f"data.dataset={dataset}")
    assert r.code == 0, r.out[-4000:]
    assert f"initialised from the transformers GPT-2 model in {hf_dir}" in r.out
    step0 = next(row["val_loss"] for row in metrics(run_dir) if row.get("step") == 0 and "val_loss" in row)
    assert step0 == pytest.approx(_transformers_val_loss(hf_dir, dataset), abs=1e-5)

    # The fine-tuned run goes back out: transformers reads it, with the data's (the model's) tokenizer.
    out = tmp_path / "back"
    r = run_cli("export", str(run_dir), "-o", str(out), cache=cache_dir)
    assert r.code == 0, r.out
    assert "pretrained tokenizer" in r.out
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.config.vocab_size == 320
    final = next(row["val_loss"] for row in reversed(metrics(run_dir)) if "val_loss" in row)
    assert final == pytest.approx(_transformers_val_loss(out, dataset), abs=1e-5)


def _variant(hf_dir: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the transformers directory with one thing changed by edit(directory)."""
    out = tmp_path / name
    shutil.copytree(hf_dir, out)
    edit(out)
    return out


def _set_config(**changes):
    def edit(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def _save_model(**changes):
    def edit(directory: Path) -> None:
        config = GPT2Config(**{**json.loads((directory / "config.json").read_text()), **changes})
        GPT2LMHeadModel(config).save_pretrained(directory)

    return edit


MISTRAL = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_act": "silu"}


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("mistral", _set_config(**MISTRAL), "model_type is 'mistral' (MistralForCausalLM), not 'gpt2' or 'llama'"),
        ("gelu-new", _set_config(activation_function="gelu_new"), "activation_function is 'gelu_new'"),
        ("no-weights", lambda d: (d / "model.safetensors").unlink(), "but no weights (model.safetensors"),
        ("no-tokenizer", lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
        ("byte-data", lambda d: None, "tokenized with another tokenizer (byte, 256 tokens)"),
        ("small-model", _save_model(vocab_size=300), "has 320 tokens, but its model's vocabulary only 300"),
    ],
)
def test_what_hvdlm_cannot_start_from_is_refused(
    hf_dir, dataset, byte_dataset, job, tmp_path, cache_dir, name, edit, message
):
    source = _variant(hf_dir, tmp_path, name, edit)
    before = sorted(p.name for p in source.iterdir())
    run_dir = tmp_path / "run"
    data = byte_dataset if name == "byte-data" else dataset
    r = _train(1, job, run_dir, cache_dir, source, f"data.dataset={data}")
    assert r.code == 2, r.out[-3000:]
    assert message in r.out and "Traceback" not in r.out
    assert not run_dir.exists()  # refused before the run directory is written
    assert sorted(p.name for p in source.iterdir()) == before


def test_the_shape_refusal_names_the_keys_to_set(hf_dir, dataset, job, tmp_path, cache_dir):
    r = _train(1, job, tmp_path / "run", cache_dir, hf_dir, f"data.dataset={dataset}", "model.d_model=64")
    assert r.code == 2
    assert "Set the [model] keys to the checkpoint's" in r.out
    assert "n_layer=2, n_head=2, d_model=32, seq_len=64, vocab_size=320" in r.out
