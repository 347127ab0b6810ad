"""A blend of prepared datasets (`[[data.blend]]`): its parts, each part's share of the training sequences, and
the checks a blend must pass before anything starts.

Import-light (no numpy): `hvdlm launch` runs the same checks on a login node that the ranks run when they start.

Shares are whole numbers of sequences in every PERIOD: each weight / the sum of the weights, times PERIOD, rounded
by largest remainders so that they add up to PERIOD exactly. The blend sampler (hvdlm.data.blend_sampler) repeats
a schedule of PERIOD sequences, so over the long run a dataset's share is its weight's to within 1 / PERIOD.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from hvdlm.config import DataConfig
from hvdlm.data.meta import check_windows, load_meta, missing_dataset, prepare_advice
from hvdlm.errors import InputError

PERIOD = 1 << 16  # sequences in one repetition of the blend's schedule


@dataclass(frozen=True)
class BlendPart:
    """One dataset of a blend: its label (val_loss/NAME), directory, configured weight and share of each PERIOD."""

    name: str
    path: Path
    weight: float
    share: int

    @property
    def fraction(self) -> float:
        """Its share of the sequences, as a fraction (what the weights normalised say, to 1 / PERIOD)."""
        return self.share / PERIOD


def blend_parts(data: DataConfig) -> list[BlendPart]:
    """The blend's parts in the job's order, with their shares (config validation has checked the entries)."""
    shares = apportion([b.weight for b in data.blend], PERIOD)
    return [BlendPart(b.label, Path(b.dataset), b.weight, s) for b, s in zip(data.blend, shares)]


def apportion(weights: list[float], total: int) -> list[int]:
    """Whole shares of `total` in proportion to the positive `weights`, adding up to `total` (largest remainders;
    ties to the earlier weight)."""
    top = max(weights)
    scaled = [w / top for w in weights]  # in (0, 1]: their sum cannot overflow
    exact = [s * total / sum(scaled) for s in scaled]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def check_blend(data: DataConfig, seq_len: int | None = None) -> list[BlendPart]:
    """Every dataset of the blend is prepared and whole, has a share, and shares the first one's tokenizer; with
    `seq_len`, each split holds a window of seq_len + 1 tokens. Returns the parts; the first problem is an
    InputError naming the entry."""
    parts = blend_parts(data)
    metas = []
    for i, part in enumerate(parts, start=1):
        where = f"data.blend entry {i} ('{part.name}')"
        if part.share == 0:
            raise InputError(
                f"{where} has weight {part.weight:g}, less than 1/{PERIOD:,} of the blend's total weight: its share "
                f"rounds to no sequence in each {PERIOD:,}. Raise its weight, or remove it from the blend."
            )
        metas.append(_dataset_meta(part.path, where))
        if seq_len is not None:
            check_windows(part.path, metas[-1], seq_len, where)
    first = _tokenizer_identity(parts[0].path, metas[0])
    for part, meta in zip(parts[1:], metas[1:]):
        if _tokenizer_identity(part.path, meta) != first:
            raise InputError(_mixed_tokenizers(parts[0], metas[0], part, meta))
    return parts


def _dataset_meta(path: Path, where: str) -> dict:
    """The checked meta.json of a blend's dataset; a missing or damaged one is an error naming the entry."""
    what = missing_dataset(path)
    if what:
        raise InputError(
            f"{where}: dataset '{path}' {what}; a blend's datasets are directories written by `hvdlm data prepare`. "
            f"{prepare_advice(path)}, or fix the path in the blend."
        )
    try:
        return load_meta(path)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def _tokenizer_identity(path: Path, meta: dict) -> tuple:
    """What makes two datasets' token ids mean the same text: the vocabulary size, the end-of-document id, and the
    tokenizer.json's content (parsed, so that formatting does not count), if the tokenizer has one."""
    tok = meta["tokenizer"]
    content = None
    if tok["type"] != "byte":
        try:
            parsed = json.loads((path / tok.get("file", "tokenizer.json")).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the tokenizer of dataset '{path}': {e}. Prepare it again.") from None
        content = hashlib.sha256(json.dumps(parsed, sort_keys=True).encode()).hexdigest()
    return tok["vocab_size"], tok.get("eot_id"), content


def _mixed_tokenizers(first: BlendPart, first_meta: dict, other: BlendPart, other_meta: dict) -> str:
    ours, theirs = first_meta["tokenizer"], other_meta["tokenizer"]

    def described(part: BlendPart, tok: dict) -> str:
        return f"'{part.name}' ({part.path}) is in {tok['type']} tokens (vocabulary {tok['vocab_size']:,})"

    if (ours["vocab_size"], ours.get("eot_id")) == (theirs["vocab_size"], theirs.get("eot_id")):
        how = (
            f"'{first.name}' ({first.path}) and '{other.name}' ({other.path}) have tokenizers of the same size "
            "whose tokenizer.json differ (a BPE trained on other text)"
        )
    else:
        how = f"{described(first, ours)}, {described(other, theirs)}"
    same = "byte" if ours["type"] == "byte" else shlex.quote(str(first.path))
    return (
        f"data.blend mixes tokenizers: {how}. A model reads one vocabulary, so every dataset of a blend must be "
        f"prepared with the same tokenizer: prepare '{other.name}' again with the first dataset's, `hvdlm data "
        f"prepare SOURCES... --tokenizer {same} --out {shlex.quote(str(other.path))}`."
    )
