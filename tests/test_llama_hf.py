"""The llama arch and transformers both ways: `--init-from` a LlamaForCausalLM directory, `hvdlm export` back.

A randomly initialised LlamaForCausalLM (4 query heads on 2 key/value heads, RoPE theta 500000, an untied head,
every tensor perturbed so that no norm gain is one: a misplaced tensor shows) and a BPE tokenizer are saved by
transformers, its weights as sharded safetensors with their index; the data is prepared with
`hvdlm data prepare --tokenizer DIR`. hvdlm's step-0 validation loss equals transformers' on the same windows at
TP 2 and, from a pytorch_model.bin, on two pipeline stages; the fine-tuned TP 2 run exports back into a
LlamaForCausalLM whose logits and greedy text are hvdlm's. Biases, a tied head and the refusals (rotary scaling,
sliding windows, unequal biases, experts, another activation) are checked in-process.
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

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from hvdlm.checkpoint.hf import load_init_state  # noqa: E402
from hvdlm.checkpoint.hf_llama import from_llama, llama_config, to_llama  # noqa: E402
from hvdlm.checkpoint.reshard import load_model  # noqa: E402
from hvdlm.checkpoint.run import load_run_checkpoint, model_config  # noqa: E402
from hvdlm.config import ModelConfig  # noqa: E402
from hvdlm.data import open_dataset  # noqa: E402
from hvdlm.data.sampler import WindowSampler  # noqa: E402
from hvdlm.data.tokenizer import EOT, train_bpe  # noqa: E402
from hvdlm.errors import InputError  # noqa: E402
from hvdlm.model import GPT  # noqa: E402
from hvdlm.parallel.topology import Group  # noqa: E402

pytestmark = pytest.mark.distributed

SEQ_LEN, BATCH, EVAL_BATCHES, SEED, VOCAB = 64, 4, 2, 1337, 320
SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# The [model] keys of the job: what the transformers config says (vocab_size follows from the tokenizer).
MODEL_KEYS = [
    "model.arch=llama",
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.d_model=64",
    "model.d_ff=160",
    f"model.seq_len={SEQ_LEN}",
    "model.tie_embeddings=false",
    "model.rope_theta=500000",
]


def _llama(**changes) -> LlamaForCausalLM:
    config = LlamaConfig(
        **{**SHAPE, "vocab_size": VOCAB, "max_position_embeddings": SEQ_LEN, "rms_norm_eps": 1e-5, **changes},
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Llama, its weights in safetensors shards with an index, and its tokenizer, as save_pretrained writes."""
    out = tmp_path_factory.mktemp("hf") / "llama-tiny"
    sources = sorted((REPO / "hvdlm").rglob("*.py"))
    tok = train_bpe((p.read_text() for p in sources), VOCAB)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok._tok, bos_token=EOT, eos_token=EOT)
    assert len(tokenizer) == VOCAB
    _llama().save_pretrained(out, max_shard_size="100KB")
    tokenizer.save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    return out


@pytest.fixture(scope="module")
def bin_dir(hf_dir, tmp_path_factory) -> Path:
    """The same model with its weights in one pytorch_model.bin."""
    out = tmp_path_factory.mktemp("hf") / "llama-bin"
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, out / name)
    torch.save(_llama().state_dict(), out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def dataset(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "with-hf-tokenizer"
    r = run_cli("data", "prepare", REPO / "hvdlm", "--glob", "**/*.py", "--tokenizer", str(hf_dir), "--out", out)
    assert r.code == 0, r.out
    return out


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


def _transformers_val_loss(model: torch.nn.Module, dataset: Path) -> float:
    """transformers' loss on the validation windows hvdlm's evaluation reads (one replica, the same seed)."""
    batches = WindowSampler(open_dataset(dataset).val, SEQ_LEN, BATCH, 0, 1, SEED)
    losses = []
    with torch.no_grad():
        for i in range(EVAL_BATCHES):
            x, y = batches.eval_batch(i)
            logits = model(x).logits
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    return sum(losses) / len(losses)


def _val_losses(run_dir: Path) -> list[float]:
    return [row["val_loss"] for row in metrics(run_dir) if "val_loss" in row]


@pytest.fixture(scope="module")
def tp2_run(hf_dir, dataset, job, tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("llama-ft") / "tp2"
    r = _train(2, job, run_dir, cache_dir, hf_dir, "parallel.tp=2", f"data.dataset={dataset}")
    assert r.code == 0, r.out[-4000:]
    assert f"initialised from the transformers Llama model in {hf_dir}" in r.out
    return run_dir


def test_step_0_validation_loss_is_transformers_at_tp2(tp2_run, dataset):
    expected = _transformers_val_loss(_llama(), dataset)
    assert _val_losses(tp2_run)[0] == pytest.approx(expected, abs=1e-5)


def test_a_pytorch_bin_starts_a_two_stage_pipeline(bin_dir, dataset, job, tmp_path, cache_dir):
    pp = ("parallel.pp=2", "parallel.microbatches=2", f"data.dataset={dataset}")
    r = _train(2, job, tmp_path / "pp2", cache_dir, bin_dir, *pp)
    assert r.code == 0, r.out[-4000:]
    assert _val_losses(tmp_path / "pp2")[0] == pytest.approx(_transformers_val_loss(_llama(), dataset), abs=1e-5)


@pytest.fixture(scope="module")
def exported(tp2_run, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "llama"
    r = run_cli("export", str(tp2_run), "-o", str(out), cache=cache_dir)
    assert r.code == 0, r.out
    assert "(transformers LlamaForCausalLM)" in r.out and "pretrained tokenizer" in r.out
    return out


def _hvdlm_model(run_dir: Path) -> tuple[GPT, ModelConfig]:
    path, state = load_run_checkpoint(run_dir, None)
    cfg = model_config(state, path)
    model = GPT(cfg, Group.single())
    load_model(model, state, str(path), 0, 1)
    return model.eval(), cfg


def test_the_export_is_a_llama_with_hvdlms_logits_and_greedy_text(tp2_run, exported, dataset):
    config = json.loads((exported / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["intermediate_size"] == 160
    assert config["rope_theta"] == 500000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == VOCAB
    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ours, cfg = _hvdlm_model(tp2_run)
    x = WindowSampler(open_dataset(dataset).val, SEQ_LEN, 2, 0, 1, SEED).eval_batch(0)[0]  # (2, T)
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() < 1e-5
        prompt = x[:1, :8]
        want = theirs.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        got = prompt
        for _ in range(16):
            got = torch.cat([got, ours(got)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, want)
    # And back: the final validation loss the run logged is transformers' on the export.
    assert _val_losses(tp2_run)[-1] == pytest.approx(_transformers_val_loss(theirs, dataset), abs=1e-5)


@pytest.mark.parametrize("tie, bias", [(True, True), (False, True), (True, False)])
def test_biases_and_a_tied_head_go_out_and_come_back(tie, bias, tmp_path):
    """In-process: hvdlm's weights written as an export writes them, read by transformers (same logits) and by
    --init-from (the same tensors)."""
    cfg = ModelConfig(
        arch="llama", n_layer=2, n_head=4, n_kv_head=1, d_model=32, seq_len=16, vocab_size=300,
        bias=bias, tie_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(1)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {name: t.detach() for name, t in ours.state_dict().items()}
    save_file(to_llama(state, cfg), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(llama_config(cfg, None)))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() < 1e-5
    back = load_init_state(tmp_path)["model"]
    for name, t in state.items():
        assert torch.equal(back[name], t[:300] if t.shape[0] == 320 else t), name
    assert from_llama(to_llama(state, cfg), cfg, "x").keys() == back.keys()


def _refusal(directory: Path) -> str:
    with pytest.raises(InputError) as e:
        load_init_state(directory)
    return str(e.value)


def test_what_hvdlm_cannot_compute_is_refused_naming_every_difference(hf_dir, tmp_path):
    source = tmp_path / "odd"
    shutil.copytree(hf_dir, source)
    config = json.loads((source / "config.json").read_text())
    config.update(
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        sliding_window=4096,
        attention_bias=True,
        num_local_experts=8,
        hidden_act="gelu",
    )
    (source / "config.json").write_text(json.dumps(config))
    message = _refusal(source)
    for difference in (
        "rope_scaling is {'rope_type': 'linear', 'factor': 2.0}",
        "sliding_window is 4096",
        "attention_bias is True and mlp_bias False",
        "num_local_experts is 8",
        "hidden_act is 'gelu'",
        "hvdlm computes exactly the Llama architecture",
    ):
        assert difference in message, message
    config = {**json.loads((hf_dir / "config.json").read_text()), "model_type": "mistral"}
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    assert "model_type is 'mistral' (MistralForCausalLM), not 'gpt2' or 'llama'" in _refusal(source)


def test_a_refused_model_starts_nothing(hf_dir, dataset, job, tmp_path, cache_dir):
    source = tmp_path / "scaled"
    shutil.copytree(hf_dir, source)
    config = json.loads((source / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0}
    (source / "config.json").write_text(json.dumps(config))
    r = _train(1, job, tmp_path / "run", cache_dir, source, f"data.dataset={dataset}")
    assert r.code == 2, r.out[-3000:]
    assert "rope_parameters is" in r.out and "only the default RoPE" in r.out and "Traceback" not in r.out
    assert not (tmp_path / "run").exists()


def test_gpt2s_norm_eps_goes_out_and_comes_back(tmp_path):
    """model.norm_eps is GPT-2's layer_norm_epsilon both ways (its default, 1e-5, as before)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hvdlm.checkpoint.hf import gpt2_config, hvdlm_shape, to_gpt2

    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=8, vocab_size=300, norm_eps=1e-2)
    torch.manual_seed(2)
    ours = GPT(cfg).eval()
    config = gpt2_config(cfg.__dict__, None)
    theirs = GPT2LMHeadModel(GPT2Config(**config)).eval()
    theirs.load_state_dict(to_gpt2(ours.state_dict(), 1, 300), strict=False)
    x = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() < 1e-5
    assert hvdlm_shape(config, tmp_path)["norm_eps"] == 1e-2
