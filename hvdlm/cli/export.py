"""`hvdlm export`: a run's model as a Hugging Face transformers directory. torch loads inside the command only."""

from __future__ import annotations

import click

from hvdlm.checkpoint.store import refuse_missing_run


def _there(ctx: click.Context, param: click.Parameter, source: str) -> str:
    # Checked as click reads it, before a missing -o: what is wrong with the source comes first.
    refuse_missing_run(source)
    return source


@click.command()
@click.argument("source", metavar="RUN_DIR|CHECKPOINT", type=click.Path(), callback=_there)
@click.option(
    "-o", "--out", required=True, type=click.Path(), help="A new (or empty) directory to write the export into."
)
@click.option("--ema", is_flag=True, help="Export the moving average of the weights (train.ema_decay > 0).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf"]),
    default="hf",
    show_default=True,
    help="hf: transformers' GPT2LMHeadModel (arch gpt2) or LlamaForCausalLM (arch llama) with its tokenizer "
    "(config.json, model.safetensors, tokenizer.json).",
)
def export(source: str, out: str, ema: bool, fmt: str) -> None:
    """Export the model of RUN_DIR (its newest checkpoint) or of CHECKPOINT (any TP size) for transformers.

    `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` then give the same
    logits and the same token ids as hvdlm.
    """
    from hvdlm.checkpoint.hf import export_hf

    done = export_hf(source, out, ema=ema)
    click.echo(
        f"exported {done['weights']} weights of step {done['step']} from {done['checkpoint']} "
        f"({done['parameters'] / 1e6:.2f}M parameters, {done['tokenizer']} tokenizer) to {out} "
        f"(transformers {done['architecture']})"
    )
