"""`hvdlm export`: a trained run read by transformers gives hvdlm's logits, greedy text and token ids.

Two tiny runs, trained once for the module on data prepared from hvdlm's own sources: byte tokens on one rank
(without biases, with an EMA, and a model vocabulary larger than the tokenizer's), and a 300-token BPE at TP 2
(whose vocabulary rows are padded to 192 per rank). Each is exported by the real CLI and loaded offline by
`AutoModelForCausalLM` / `AutoTokenizer`. Also: `checkpoint merge --format safetensors`, and the refusals.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_imports_nothing_heavy, mpirun, run_cli, sets, train_argv

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub, no network: everything is read from the exported directory

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hvdlm.checkpoint.hf import LAYER_NORM_EPS  # noqa: E402
from hvdlm.checkpoint.reshard import load_full_state, load_model  # noqa: E402
from hvdlm.checkpoint.run import load_run_checkpoint, model_config, run_tokenizer  # noqa: E402
from hvdlm.model import GPT  # noqa: E402
from hvdlm.parallel.topology import Group  # noqa: E402

pytestmark = pytest.mark.distributed

# Non-ASCII text, whitespace runs, and GPT-2's end-of-text marker as plain text (hvdlm never reads it as a token).
TEXTS = [
    "def café(x):\n\t\treturn 'naïve'  # déjà vu — 日本語 🎉\n\n\n",
    "   leading spaces,    runs of them\r\nand <|endoftext|> inside a document",
    "<|endoftext|>",
    "x .  , ;\u00a0\u2003end",
]

RUNS = {  # name: (ranks, overrides)
    "byte-tp1": (1, ["model.bias=false", "model.vocab_size=300", "train.ema_decay=0.9"]),
    "bpe-tp2": (2, ["parallel.tp=2"]),
}


def _prepare(hvdlm, out: Path, *options: str) -> Path:
    r = hvdlm("data", "prepare", str(REPO / "hvdlm"), "--glob", "**/*.py", "--out", str(out), *options)
    assert r.code == 0, r.out
    return out


@pytest.fixture(scope="module")
def runs(hvdlm_module, job, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("export-runs")
    data = {
        "byte-tp1": _prepare(hvdlm_module, base / "data-byte"),
        "bpe-tp2": _prepare(hvdlm_module, base / "data-bpe", "--tokenizer", "bpe", "--vocab-size", "300"),
    }
    out = {}
    for name, (np, overrides) in RUNS.items():
        common = [f"data.dataset={data[name]}", "model.seq_len=64", "train.max_steps=6", "train.sample_tokens=0"]
        proc = mpirun(np, train_argv(job, base / name, *sets(*common, *overrides)), hvdlm_module.cache)
        assert proc.code == 0, f"{name}:\n{proc.out[-4000:]}"
        out[name] = base / name
    return out


@pytest.fixture(scope="module")
def hvdlm_module(cache_dir):
    """The `hvdlm` fixture for module-scoped fixtures (conftest's is per test)."""

    def run(*args: str, timeout: float = 300):
        return run_cli(*args, cache=cache_dir, timeout=timeout)

    run.cache = cache_dir
    return run


@pytest.fixture(scope="module")
def exported(runs, hvdlm_module, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("exported")
    out = {}
    for name, run_dir in runs.items():
        r = hvdlm_module("export", str(run_dir), "-o", str(base / name))
        assert r.code == 0, r.out
        assert "transformers GPT2LMHeadModel" in r.out
        out[name] = base / name
    return out


def _hvdlm_model(run_dir: Path, ema: bool = False):
    """The run's newest checkpoint in hvdlm's plain model (tp 1), and its tokenizer."""
    path, state = load_run_checkpoint(run_dir, None)
    cfg = model_config(state, path)
    model = GPT(cfg, Group.single())
    load_model(model, {**state, "model": state["ema"] if ema else state["model"]}, str(path), 0, 1)
    return model.eval(), run_tokenizer(state["config"], path), cfg


def _tokens(tokenizer, seq_len: int) -> torch.Tensor:
    ids = [i for t in TEXTS for i in tokenizer.encode(t)]
    while len(ids) < 2 * seq_len:
        ids += ids
    return torch.tensor([ids[:seq_len], ids[seq_len : 2 * seq_len]])  # (2, seq_len)


@pytest.mark.parametrize("name", list(RUNS))
def test_transformers_gives_hvdlms_logits(runs, exported, name):
    ours, tokenizer, cfg = _hvdlm_model(runs[name])
    theirs = AutoModelForCausalLM.from_pretrained(exported[name]).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    c = theirs.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions) == (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.seq_len)
    assert c.vocab_size == cfg.vocab_size == 300  # the real vocabulary: no padding rows
    assert c.activation_function == "gelu" and c.tie_word_embeddings
    assert c.layer_norm_epsilon == LAYER_NORM_EPS == ours.ln_f.eps
    assert c.eos_token_id == tokenizer.eot_id and c.bos_token_id == tokenizer.eot_id
    x = _tokens(tokenizer, cfg.seq_len)
    with torch.no_grad():
        expected, _ = ours(x)
        got = theirs(x).logits
    assert got.shape == expected.shape == (2, cfg.seq_len, cfg.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(RUNS))
def test_greedy_generation_is_the_same(runs, exported, name):
    ours, tokenizer, _ = _hvdlm_model(runs[name])
    theirs = AutoModelForCausalLM.from_pretrained(exported[name]).eval()
    theirs.generation_config.eos_token_id = None  # hvdlm does not stop at the end-of-document token either
    prompt = torch.tensor([tokenizer.encode("def main(")[:16]])
    expected = ours.generate(prompt, 32, top_k=1)  # top-1 sampling is greedy
    with torch.no_grad():
        got = theirs.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert got.shape == (1, prompt.shape[1] + 32)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("name", list(RUNS))
def test_autotokenizer_encodes_and_decodes_as_hvdlm(runs, exported, name):
    _, tokenizer, _ = _hvdlm_model(runs[name])
    theirs = AutoTokenizer.from_pretrained(exported[name])
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == tokenizer.decode(ids) == text
    if tokenizer.kind == "byte":
        assert len(tokenizer.encode("<|endoftext|>")) == 13  # bytes, in both
        assert theirs.eos_token is None
    else:
        assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == tokenizer.eot_id
        assert theirs.decode([tokenizer.eot_id]) == "<|endoftext|>"


def test_a_model_without_biases_is_exported_with_zero_biases(exported):
    weights = load_file(str(exported["byte-tp1"] / "model.safetensors"))
    biases = [name for name in weights if name.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1 and all(not weights[name].any() for name in biases)
    assert "lm_head.weight" not in weights  # tied to transformer.wte.weight


def test_ema_weights_are_exported_with_ema(runs, hvdlm, tmp_path):
    r = hvdlm("export", str(runs["byte-tp1"]), "-o", str(tmp_path / "ema"), "--ema")
    assert r.code == 0, r.out
    assert "exported ema weights" in r.out
    ours, tokenizer, cfg = _hvdlm_model(runs["byte-tp1"], ema=True)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ema").eval()
    x = _tokens(tokenizer, cfg.seq_len)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-5, rtol=0)
    r = hvdlm("export", str(runs["bpe-tp2"]), "-o", str(tmp_path / "none"), "--ema")
    assert r.code == 2 and "holds no EMA weights" in r.out
    assert not (tmp_path / "none").exists()


def test_export_into_an_empty_directory_and_never_over_files(runs, hvdlm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = hvdlm("export", str(runs["bpe-tp2"]), "-o", str(empty))
    assert r.code == 0, r.out
    assert (empty / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine\n")
    for target in (full, full / "notes.txt"):
        r = hvdlm("export", str(runs["bpe-tp2"]), "-o", str(target))
        assert r.code == 2, r.out
        assert "Traceback" not in r.out and "Pass -o" in r.out
    assert [p.name for p in full.iterdir()] == ["notes.txt"] and (full / "notes.txt").read_text() == "mine\n"


def test_merge_to_safetensors_holds_the_unsharded_weights(runs, hvdlm, tmp_path):
    shard = runs["bpe-tp2"] / "checkpoints" / "step-0000006.tp0-of-2.pt"
    out = tmp_path / "merged.safetensors"
    r = hvdlm("checkpoint", "merge", str(shard), "--format", "safetensors", "--out", str(out))
    assert r.code == 0, r.out
    weights = load_file(str(out))
    state = load_full_state(shard)
    assert set(weights) == set(state["model"]) - {"head.weight"}
    for name, t in weights.items():
        assert torch.equal(t, state["model"][name]), name
    assert weights["tok_emb.weight"].shape[0] == 300  # the padding of each rank's rows is gone

    ema_run = runs["byte-tp1"] / "checkpoints" / "step-0000006.pt"
    r = hvdlm("checkpoint", "merge", str(ema_run), "--format", "safetensors")
    assert r.code == 0, r.out
    weights = load_file(str(ema_run.with_name("step-0000006-merged.safetensors")))
    assert {n for n in weights if n.startswith("ema.")} == {f"ema.{n}" for n in weights if not n.startswith("ema.")}


def test_export_answers_help_without_importing_torch():
    assert_imports_nothing_heavy(["export", "--help"])


def test_the_advice_for_data_of_another_tokenizer_works_as_written(runs, exported, hvdlm, job, tmp_path):
    """Starting from a byte-level export on BPE data is refused with a command to prepare the data with the
    export's tokenizer; that command, run as written, prepares data the export's model then trains on."""
    import re
    import shlex

    import tomllib

    export = exported["byte-tp1"]
    bpe_data = tomllib.loads((runs["bpe-tp2"] / "config.toml").read_text())["data"]["dataset"]
    settings = ["--set", "model.seq_len=64", "--set", "model.vocab_size=300", "--set", "train.max_steps=2"]
    settings += ["--set", "train.sample_tokens=0"]  # the export's shape (its vocabulary padded to 300)
    refused = hvdlm("train", str(job), "--run-dir", str(tmp_path / "a"), "--init-from", str(export),
                    "--set", f"data.dataset={bpe_data}", *settings)  # fmt: skip
    assert refused.code == 2 and "tokenized with another tokenizer" in refused.out, refused.out
    advice = re.search(r"`(hvdlm data prepare [^`]+)`", refused.out).group(1)
    argv = shlex.split(advice.replace("SOURCES", shlex.join([str(REPO / "hvdlm"), "--glob", "**/*.py"])))
    argv = [str(tmp_path / "data") if word == "DATASET" else word for word in argv]
    prepared = hvdlm(*argv[1:])
    assert prepared.code == 0, prepared.out
    trained = hvdlm("train", str(job), "--run-dir", str(tmp_path / "b"), "--init-from", str(export),
                    "--set", f"data.dataset={tmp_path / 'data'}", *settings)  # fmt: skip
    assert trained.code == 0 and f"initialised from the transformers GPT-2 model in {export}" in trained.out, (
        trained.out
    )
