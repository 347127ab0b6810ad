"""Which layers each pipeline stage holds: pure arithmetic, import-light (the config's validation reads it).

A split is a list of layer counts, one per stage, summing to n_layer; stage s holds the consecutive blocks
[sum(counts[:s]), sum(counts[:s + 1])). `parallel.pp_layers` gives one explicitly ("3,5"); without it the layers
are spread as evenly as possible, and the layers that do not divide go to the stages with the least other work:
the middle stages first, then the first (whose embedding lookup is cheap), the last stage last (its output head
and loss, a d_model x vocabulary matmul, already make it the slowest stage; Megatron's advice is the same).
"""

from __future__ import annotations

from hvdlm.errors import InputError


def parse_split(text: str | list[int]) -> list[int]:
    """`parallel.pp_layers` as a list of layer counts ("3,5" or [3, 5]); empty: no explicit split."""
    if isinstance(text, list):
        return list(text)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise InputError(
            f"parallel.pp_layers = '{text}' is not a list of layer counts: write one whole number per stage, "
            'e.g. pp_layers = "3,5" (or [3, 5]) for 3 layers on the first stage and 5 on the second.'
        ) from None


def even_split(n_layer: int, pp: int) -> list[int]:
    """n_layer over pp stages as evenly as possible; the remainder to the middle, then the first, then the last."""
    counts = [n_layer // pp] * pp
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 1 else [0]
    for s in order[: n_layer % pp]:
        counts[s] += 1
    return counts


def stage_layers(n_layer: int, pp: int, pp_layers: str | list[int] = "") -> list[int]:
    """The layer counts per stage: `pp_layers` checked, or the even split."""
    if pp > n_layer:
        raise InputError(
            f"parallel.pp = {pp} is more pipeline stages than the model has layers (model.n_layer = {n_layer}): "
            f"every stage needs at least one transformer block. Use pp <= {n_layer}, or a deeper model."
        )
    counts = parse_split(pp_layers)
    if not counts:
        return even_split(n_layer, pp)
    if len(counts) != pp or sum(counts) != n_layer or min(counts) < 1:
        raise InputError(
            f"parallel.pp_layers = {counts} does not split the model: it needs {pp} counts (one per stage, "
            f"parallel.pp = {pp}), each at least 1, that add up to model.n_layer = {n_layer} (these add up to "
            f'{sum(counts)}). For example pp_layers = "{",".join(map(str, even_split(n_layer, pp)))}", or leave it '
            "empty for the even split."
        )
    return counts


def layer_range(counts: list[int], stage: int) -> range:
    """The global indices of the blocks stage `stage` holds."""
    first = sum(counts[:stage])
    return range(first, first + counts[stage])
