"""Models in and out of Hugging Face transformers, and weights as safetensors.

hvdlm's GPT is exactly GPT-2 with the exact (erf) GELU: transformers' `GPT2LMHeadModel` with
`activation_function="gelu"` computes the same logits from the same weights, so both directions are exact. Its
llama arch is exactly `LlamaForCausalLM` (hvdlm.checkpoint.hf_llama: its names and config.json); the files, the
tokenizer and the directory written whole are the same for both, here.

Export (`hvdlm export`): a checkpoint of any TP size, merged into one unsharded state (its vocabulary padding
removed by hvdlm.checkpoint.reshard), becomes a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` read: config.json, model.safetensors, generation_config.json, tokenizer.json and
tokenizer_config.json. It is written into a temporary directory beside the target and renamed into place, and
never over a directory that holds files.

Import (`--init-from DIR`, train.init_from): `load_init_state` gives the trainer hvdlm's unsharded state for an
hvdlm run directory or checkpoint, or for a directory transformers wrote for a GPT-2 or Llama model (config.json,
and model.safetensors, its shards with their index, or pytorch_model.bin read as data only); every TP rank (and
pipeline stage) then cuts its own part from it.

The weights map one to one (GPT2_NAMES). One layout differs: GPT-2 keeps its linear layers as Conv1D, whose
weight is (in, out), where torch's Linear holds (out, in), so those four are transposed. q, k and v sit in the
same columns in both (q, then k, then v, each head after head), and both tie the output head to the token
embedding.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hvdlm.checkpoint.hf_llama import from_llama, llama_config, llama_shape, to_llama
from hvdlm.checkpoint.run import load_run_checkpoint, model_config, run_tokenizer
from hvdlm.checkpoint.stages import head_is_tied
from hvdlm.checkpoint.store import refuse_missing_run
from hvdlm.config import ModelConfig
from hvdlm.data.tokenizer import byte_tokenizer_json
from hvdlm.errors import InputError
from hvdlm.fsutil import atomic_write, fsync_directory
from hvdlm.runfiles import CHECKPOINT_DIR

# hvdlm name -> transformers GPT2LMHeadModel name; {i} is a block's index.
GPT2_NAMES = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "blocks.{i}.ln_1.weight": "transformer.h.{i}.ln_1.weight",
    "blocks.{i}.ln_1.bias": "transformer.h.{i}.ln_1.bias",
    "blocks.{i}.attn.qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blocks.{i}.attn.qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blocks.{i}.attn.proj.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blocks.{i}.attn.proj.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blocks.{i}.ln_2.weight": "transformer.h.{i}.ln_2.weight",
    "blocks.{i}.ln_2.bias": "transformer.h.{i}.ln_2.bias",
    "blocks.{i}.mlp.fc.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blocks.{i}.mlp.fc.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blocks.{i}.mlp.proj.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blocks.{i}.mlp.proj.bias": "transformer.h.{i}.mlp.c_proj.bias",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
}
# Linear weights that GPT-2 stores as Conv1D, (in, out): transposed both ways.
CONV1D = {
    "blocks.{i}.attn.qkv.weight",
    "blocks.{i}.attn.proj.weight",
    "blocks.{i}.mlp.fc.weight",
    "blocks.{i}.mlp.proj.weight",
}
# Both models tie the output head to the token embedding, so hvdlm's head.weight and GPT-2's lm_head.weight are
# never stored on their own. Old GPT-2 files also hold the causal masks as buffers, which carry no weights.
TIED_HEAD = ("head.weight", "lm_head.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")

LAYER_NORM_EPS = 1e-5  # model.norm_eps's default: torch.nn.LayerNorm's (and GPT-2's own value)
EXACT_GELU = ("gelu", "gelu_python")  # transformers' names for F.gelu, the erf form (GPT-2's "gelu_new" is tanh)
# What transformers assumes for a key a config.json leaves out (GPT2Config's defaults).
GPT2_DEFAULTS = {
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "n_positions": 1024,
    "vocab_size": 50257,
    "activation_function": "gelu_new",
    "n_inner": None,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}

CONFIG_FILE, WEIGHTS_FILE, GENERATION_FILE = "config.json", "model.safetensors", "generation_config.json"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
SHARDED_INDEX, TORCH_WEIGHTS = "model.safetensors.index.json", "pytorch_model.bin"


def _names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(hvdlm name, GPT-2 name, transposed) for every tensor of an n_layer model."""
    return [
        (ours.format(i=i), theirs.format(i=i), ours in CONV1D)
        for ours, theirs in GPT2_NAMES.items()
        for i in (range(n_layer) if "{i}" in ours else [0])
    ]


# ------------------------------------------------------------------------------------------------------------
# The weights, both ways
# ------------------------------------------------------------------------------------------------------------


def to_gpt2(state: dict[str, torch.Tensor], n_layer: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """GPT-2's tensors from hvdlm's unsharded model state."""
    out = {}
    for ours, theirs, transposed in _names(n_layer):
        t = state.get(ours)
        if t is None and ours.endswith(".bias"):
            # model.bias = false: GPT-2 always has biases, and a zero bias is no bias (the logits stay exact).
            t = torch.zeros(state[ours.removesuffix(".bias") + ".weight"].shape[0])
        out[theirs] = (t.t() if transposed else t).float().contiguous()
    # The real vocabulary only: rows beyond it are padding (a merged checkpoint has none, this makes sure).
    out["transformer.wte.weight"] = out["transformer.wte.weight"][:vocab_size].clone()
    return out


def from_gpt2(weights: dict[str, torch.Tensor], n_layer: int, source: str) -> dict[str, torch.Tensor]:
    """hvdlm's unsharded model state from GPT-2's tensors (a save_pretrained file's, named with or without the
    `transformer.` prefix of GPT2LMHeadModel)."""
    theirs = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in weights.items()}
    state, missing = {}, []
    for ours, name, transposed in _names(n_layer):
        if name not in theirs:
            missing.append(name)
            continue
        t = theirs.pop(name).float()
        state[ours] = (t.t() if transposed else t).contiguous()
    head = theirs.pop("lm_head.weight", None)
    unexpected = [k for k in theirs if not k.endswith(MASK_BUFFERS)]
    if missing or unexpected:
        raise InputError(
            f"the weights in '{source}' are not those of a {n_layer}-layer GPT-2 as its config.json describes it: "
            f"{len(missing)} missing (first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]}). "
            "Save the model again with transformers' save_pretrained."
        )
    if head is not None and not torch.equal(head.float(), state["tok_emb.weight"]):
        raise InputError(
            f"'{source}' has an output head (lm_head.weight) apart from its token embedding; hvdlm's GPT ties the "
            "two, as GPT-2 does, so it cannot start from this model."
        )
    state["head.weight"] = state["tok_emb.weight"]  # tied, as in hvdlm's model
    return state


# ------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------


def gpt2_config(model: dict[str, Any], eot_id: int | None) -> dict[str, Any]:
    """config.json of GPT2LMHeadModel for hvdlm's model configuration (a ModelConfig as a dict)."""
    dropout = float(model.get("dropout", 0.0))
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu",  # the exact GELU hvdlm computes; GPT-2's default "gelu_new" is not it
        "n_layer": model["n_layer"],
        "n_head": model["n_head"],
        "n_embd": model["d_model"],
        "n_inner": None,  # 4 n_embd, as in hvdlm's MLP
        "n_positions": model["seq_len"],
        "vocab_size": model["vocab_size"],
        "layer_norm_epsilon": model.get("norm_eps", LAYER_NORM_EPS),
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        # The run's dropout, where GPT-2 has it (transformers defaults to 0.1); evaluation never drops.
        "attn_pdrop": dropout,
        "embd_pdrop": dropout,
        "resid_pdrop": dropout,
        "initializer_range": 0.02,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
    }


def tokenizer_files(tokenizer, seq_len: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json with which transformers' AutoTokenizer encodes and decodes as
    `tokenizer` (hvdlm's) does."""
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": seq_len,
        "add_prefix_space": False,
        # transformers would otherwise drop the space before punctuation when decoding: text must come back as is.
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.kind == "byte":
        return {TOKENIZER_FILE: byte_tokenizer_json(), TOKENIZER_CONFIG_FILE: _dumps(settings)}
    eot = tokenizer.eot
    settings.update(
        bos_token=eot,
        eos_token=eot,
        # As in hvdlm, "<|endoftext|>" inside a text is plain text; only a document's end is the EOT id.
        split_special_tokens=True,
    )
    return {TOKENIZER_FILE: tokenizer.to_json(), TOKENIZER_CONFIG_FILE: _dumps(settings)}


def export_hf(source: str | Path, out: str | Path, ema: bool = False) -> dict[str, Any]:
    """Write the checkpoint SOURCE (a run directory: its newest readable one; or a checkpoint file or shard) as a
    transformers GPT-2 directory OUT; returns what was written, for the summary line. A damaged newer checkpoint
    of a run directory is reported on stderr and passed over, as `hvdlm generate` does."""
    from safetensors.torch import save_file

    out = Path(out)
    check_export_target(out)  # before anything is read: a wrong -o answers at once
    refuse_missing_run(source)
    source = Path(source)
    run_dir = source if (source / CHECKPOINT_DIR).is_dir() else None
    path, state = load_run_checkpoint(run_dir or source, None if run_dir else source)
    cfg = model_config(state, path)
    weights = state["model"]
    if ema:
        if not state.get("ema"):
            raise InputError(f"checkpoint '{path}' holds no EMA weights (the run had train.ema_decay = 0). Drop --ema.")
        weights = state["ema"]
    tokenizer = run_tokenizer(state["config"], path)
    config, tensors = _for_transformers(
        cfg, {**state["config"]["model"], "vocab_size": cfg.vocab_size}, weights, tokenizer.eot_id
    )
    files = {
        CONFIG_FILE: _dumps(config),
        GENERATION_FILE: _dumps({"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}),
        **tokenizer_files(tokenizer, cfg.seq_len),
    }

    def write(staging: Path) -> None:
        with _os_errors_of_safetensors():
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})  # transformers asks for "pt"
        for name, text in files.items():
            (staging / name).write_text(text)

    _publish_directory(out, write)
    return {
        "checkpoint": path,
        "step": int(state["step"]),
        "weights": "ema" if ema else "model",
        "parameters": sum(t.numel() for t in tensors.values()),
        "tokenizer": tokenizer.kind,
        "architecture": config["architectures"][0],
    }


def _for_transformers(
    cfg: ModelConfig, model: dict[str, Any], weights: dict[str, torch.Tensor], eot_id: int | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the tensors of the transformers model of cfg's arch."""
    if cfg.arch == "llama":
        return llama_config(cfg, eot_id), to_llama(weights, cfg)
    return gpt2_config(model, eot_id), to_gpt2(weights, cfg.n_layer, cfg.vocab_size)


def check_export_target(out: Path) -> None:
    """An export goes into a new or empty directory only: it never replaces or mixes with files already there."""
    if out.exists() and not out.is_dir():
        raise InputError(f"'{out}' is a file. Pass -o the path of a new (or empty) directory for the export.")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(
            f"'{out}' is not empty; hvdlm writes an export only into a new or empty directory and never over files. "
            "Pass -o another path, or move its files away."
        )


def _publish_directory(out: Path, write) -> None:
    """Run write(staging) on a temporary directory beside `out`, then rename it to `out` (an empty directory is
    replaced; rename is atomic): a failure or an interrupt leaves no half export."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot create '{out}': {e.strerror or e}. Pass -o a path you can write to.") from None
    try:
        write(staging)
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp's directory is private, and safetensors' file too: an export is for whoever may read the folder.
        os.chmod(staging, 0o777 & ~umask)
        for f in staging.iterdir():
            os.chmod(f, 0o666 & ~umask)
        fsync_directory(staging, files=True)
        os.rename(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(f"cannot write the export '{out}': {e.strerror or e}. Nothing was written.") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(out.parent)


@contextlib.contextmanager
def _os_errors_of_safetensors():
    """safetensors reports a failed write (a full disk, a read-only one) as its own SafetensorError, naming the OS
    error inside its text ("... No space left on device (os error 28)"): raise it as that OSError, which every
    writer here handles."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None


def _dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------------------


def is_transformers_dir(path: str | Path) -> bool:
    """A directory that transformers wrote (config.json), not an hvdlm run directory (config.toml)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def load_init_state(path: str | Path, dataset: str | Path | None = None) -> dict[str, Any]:
    """hvdlm's unsharded state for --init-from PATH: an hvdlm run directory (its newest checkpoint), checkpoint
    file or shard, or a transformers GPT-2 directory. Beside "model", "step" and "config" it holds "source" (for
    messages) and "origin" (where the weights came from, for the log).

    With `dataset` (the run's data), a transformers directory's tokenizer must be the one the data was tokenized
    with: the model's token ids would otherwise mean other text.
    """
    from hvdlm.checkpoint.reshard import load_full_state
    from hvdlm.checkpoint.store import resolve_checkpoint

    if not is_transformers_dir(path):
        source = str(resolve_checkpoint(path))
        state = load_full_state(source)
        return {**state, "source": source, "origin": f"{source} (its weights at step {state['step']})"}
    directory = Path(path)
    config = _read_config(directory)
    model = hvdlm_shape(config, directory)
    if model["arch"] == "llama":
        weights, name = from_llama(read_weights(directory), ModelConfig(**model), str(directory)), "Llama"
    else:
        weights, name = from_gpt2(read_weights(directory), model["n_layer"], str(directory)), "GPT-2"
    state = {
        "model": weights,
        "step": 0,
        "config": {"model": model},
        "source": str(directory),
        "origin": f"the transformers {name} model in {directory}",
    }
    if dataset is not None:
        check_tokenizer(directory, Path(dataset), model["vocab_size"])
    return state


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read '{directory / CONFIG_FILE}': {e}. Save the model again.") from None
    if not isinstance(config, dict):
        raise InputError(f"'{directory / CONFIG_FILE}' is no model configuration (a JSON object). Save it again.")
    return config


def hvdlm_shape(raw: dict[str, Any], directory: Path) -> dict[str, Any]:
    """hvdlm's [model] keys for a GPT-2 or Llama config.json; refuses, naming every difference, a model hvdlm does
    not compute exactly."""
    kind = raw.get("model_type")
    if kind == "llama":
        shape, differs = llama_shape(raw)
        what = "the Llama architecture (transformers' LlamaForCausalLM with the default RoPE)"
    elif kind == "gpt2":
        shape, differs = _gpt2_shape({**GPT2_DEFAULTS, **raw})
        what = 'the GPT-2 architecture with the exact GELU (transformers\' GPT2LMHeadModel, activation_function "gelu")'
    else:
        architectures = ", ".join(raw.get("architectures") or []) or "no architectures named"
        shape, differs = {}, [f"model_type is {kind!r} ({architectures}), not 'gpt2' or 'llama'"]
        what = "GPT-2 or Llama (transformers' GPT2LMHeadModel or LlamaForCausalLM)"
    if differs:
        raise InputError(
            f"'{directory}' holds a model hvdlm cannot start from: {'; '.join(differs)}. hvdlm computes exactly {what}."
        )
    return shape


def _gpt2_shape(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """hvdlm's [model] keys for a GPT-2 config.json (its defaults filled in), and what hvdlm cannot compute."""
    differs = []
    activation = config["activation_function"]
    if activation not in EXACT_GELU:
        differs.append(f"activation_function is {activation!r}, and hvdlm computes only the exact GELU ('gelu')")
    if config["n_inner"] not in (None, 4 * config["n_embd"]):
        differs.append(f"n_inner is {config['n_inner']}, and hvdlm's MLP is 4 n_embd = {4 * config['n_embd']} wide")
    for key in (
        "tie_word_embeddings",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "add_cross_attention",
    ):
        if config[key] != GPT2_DEFAULTS[key]:
            differs.append(f"{key} is {config[key]}, hvdlm's GPT has {GPT2_DEFAULTS[key]}")
    shape = {
        "arch": "gpt2",
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "d_model": config["n_embd"],
        "seq_len": config["n_positions"],
        "vocab_size": config["vocab_size"],
        "bias": True,  # GPT-2 has biases everywhere
        "norm_eps": float(config["layer_norm_epsilon"]),
    }
    return shape, differs


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a save_pretrained directory: model.safetensors (or its shards), else pytorch_model.bin read
    with weights_only (data, never code)."""
    from safetensors.torch import load_file

    files = [directory / WEIGHTS_FILE]
    if not files[0].is_file() and (directory / SHARDED_INDEX).is_file():
        index = json.loads((directory / SHARDED_INDEX).read_text())
        files = [directory / name for name in sorted(set(index.get("weight_map", {}).values()))]
    try:
        if all(f.is_file() for f in files):
            return {name: t for f in files for name, t in load_file(str(f)).items()}
        if (directory / TORCH_WEIGHTS).is_file():
            return torch.load(directory / TORCH_WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - both readers raise many kinds on damaged bytes
        raise InputError(
            f"cannot read the weights in '{directory}': {type(e).__name__}: {str(e)[:200]}. Save the model again."
        ) from None
    raise InputError(
        f"'{directory}' has a config.json but no weights ({WEIGHTS_FILE}, {SHARDED_INDEX} with its files, or "
        f"{TORCH_WEIGHTS}). Save the model with transformers' save_pretrained into it."
    )


# Text the two tokenizers must encode alike: words, punctuation, accents, other scripts, whitespace runs, code.
_PROBE = "The naïve café's 3 déjà-vu — 日本語, Ελληνικά, emoji 🎉!\n\n\tdef f(x):\n        return x  # ok\r\n"


def check_tokenizer(directory: Path, dataset: Path, vocab_size: int) -> None:
    """Refuse a tokenizer in `directory` with ids beyond its model's vocabulary, and a run whose data was tokenized
    otherwise than with it."""
    from tokenizers import Tokenizer

    from hvdlm.data.tokenizer import load_tokenizer

    path = directory / TOKENIZER_FILE
    fix = (
        f"Prepare the data with the model's tokenizer, `hvdlm data prepare SOURCES --tokenizer {directory} --out "
        "DATASET`, and set data.dataset to it."
    )
    if not path.is_file():
        raise InputError(
            f"'{directory}' has no {TOKENIZER_FILE}, so hvdlm cannot tell which tokens its model reads. "
            "Save the model's tokenizer into it with save_pretrained."
        )
    try:
        theirs = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for a malformed file
        raise InputError(f"cannot read the tokenizer '{path}': {e}. Save the tokenizer again.") from None
    if theirs.get_vocab_size() > vocab_size:
        raise InputError(
            f"the tokenizer in '{directory}' has {theirs.get_vocab_size():,} tokens, but its model's vocabulary only "
            f"{vocab_size:,} (config.json vocab_size): the ids beyond it have no embedding. Save the model's own "
            "tokenizer into the directory."
        )
    theirs.encode_special_tokens = True  # as hvdlm encodes: special tokens' text is plain text
    ours = load_tokenizer(dataset)
    if (
        ours.vocab_size != theirs.get_vocab_size()
        or ours.encode(_PROBE) != theirs.encode(_PROBE, add_special_tokens=False).ids
    ):
        raise InputError(
            f"the run's dataset '{dataset}' was tokenized with another tokenizer ({ours.kind}, {ours.vocab_size:,} "
            f"tokens) than the model in '{directory}' reads ({theirs.get_vocab_size():,} tokens): its token ids "
            f"would mean other text to the model. {fix}"
        )


# ------------------------------------------------------------------------------------------------------------
# safetensors for hvdlm's own weights
# ------------------------------------------------------------------------------------------------------------


def write_safetensors(state: dict[str, Any], target: Path) -> int:
    """The model's weights (and the EMA's, named `ema.NAME`) of an unsharded checkpoint state as one safetensors
    file, atomically; returns the number of tensors. The step and the configuration go into its metadata."""
    from safetensors.torch import save

    tied = head_is_tied(state)  # a tied head is the embedding's tensor, stored once (safetensors shares none)
    tensors = {name: t.contiguous() for name, t in state["model"].items() if name != TIED_HEAD[0] or not tied}
    for name, t in (state.get("ema") or {}).items():
        if name != TIED_HEAD[0] or not tied:
            tensors[f"ema.{name}"] = t.contiguous()
    metadata = {
        "format": "pt",
        "step": str(state.get("step")),
        "config": json.dumps(state.get("config", {})),
        "tied": "head.weight is tok_emb.weight" if tied else "no: head.weight is its own",
    }
    atomic_write(target, save(tensors, metadata=metadata))
    return len(tensors)
