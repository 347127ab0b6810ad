"""Which layers each pipeline stage holds: pure arithmetic, import-light (the config's validation reads it).

A split is a list of layer counts, one per stage, summing to n_layer; stage s holds the consecutive blocks
[sum(counts[:s]), sum(counts[:s + 1])). `parallel.pp_layers` gives one explicitly ("3,5"); without it the layers
are spread as evenly as possible, and the layers that do not divide go to the stages with the least other work:
the middle stages first, then the first (whose embedding lookup is cheap), the last stage last (its output head
and loss, a d_model x vocabulary matmul, already make it the slowest stage; Megatron's advice is the same).

With virtual stages (`parallel.virtual_stages` = v > 1, the interleaved schedule) the model is cut into p x v equal
chunks, and pipeline rank r holds chunks r, r + p, ..., r + (v - 1) p: the split is then a list of p x v counts,
one per chunk, in model order (`chunk_layers`), and `rank_chunks` names the chunks of one rank.
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


def check_virtual_stages(
    n_layer: int, pp: int, virtual: int, microbatches: int, pp_layers: str | list[int] = ""
) -> None:
    """What the interleaved schedule needs (Megatron's constraints): stages to interleave, p x v equal chunks, and
    micro-batches in whole groups of p (the schedule runs each chunk on p micro-batches at a time)."""
    if virtual == 1:
        return
    if virtual < 1:
        raise InputError(f"parallel.virtual_stages = {virtual} must be 1 (no interleaving) or more.")
    if pp == 1:
        raise InputError(
            f"parallel.virtual_stages = {virtual} interleaves the chunks of pipeline stages, and parallel.pp = 1 has "
            "none: set parallel.pp > 1 (e.g. 2), or virtual_stages = 1."
        )
    if parse_split(pp_layers):
        raise InputError(
            f"parallel.pp_layers with parallel.virtual_stages = {virtual} is not supported: the interleaved schedule "
            "cuts the model into pp x virtual_stages equal chunks. Leave pp_layers empty, or set virtual_stages = 1."
        )
    chunks = pp * virtual
    if n_layer % chunks:
        fits = [v for v in range(2, n_layer // pp + 1) if n_layer % (pp * v) == 0]
        hint = f"virtual_stages among {fits}" if fits else "virtual_stages = 1"
        raise InputError(
            f"model.n_layer = {n_layer} does not divide into parallel.pp x parallel.virtual_stages = {pp} x "
            f"{virtual} = {chunks} equal chunks of layers: the interleaved schedule gives every chunk the same "
            f"number of layers. Use {hint}, or an n_layer that is a multiple of {chunks}."
        )
    if microbatches % pp:
        raise InputError(
            f"parallel.microbatches = {microbatches} is not a multiple of parallel.pp = {pp}: the interleaved "
            f"schedule (parallel.virtual_stages = {virtual}) runs the micro-batches through each chunk in groups of "
            f"pp. Use microbatches = {' or '.join(str(n) for n in _multiples_near(microbatches, pp))}."
        )


def _multiples_near(n: int, k: int) -> list[int]:
    """The multiples of k next to n (below it where there is one above 0, and above it)."""
    below = n // k * k
    return [below, below + k] if below else [k]


def chunk_layers(n_layer: int, pp: int, pp_layers: str | list[int] = "", virtual: int = 1) -> list[int]:
    """The layer counts of the model's pp x virtual chunks, in model order (chunk j on pipeline rank j % pp);
    with virtual = 1, the stages' (`stage_layers`)."""
    if virtual == 1:
        return stage_layers(n_layer, pp, pp_layers)
    return [n_layer // (pp * virtual)] * (pp * virtual)


def rank_chunks(pp: int, virtual: int, rank: int) -> list[int]:
    """The chunks pipeline rank `rank` holds, in its order: rank, rank + pp, ..., rank + (virtual - 1) pp."""
    return [rank + c * pp for c in range(virtual)]


def layers_per_rank(counts: list[int], pp: int, virtual: int = 1) -> list[int]:
    """The layers each pipeline rank holds, over all its chunks (`counts`: the chunks' layer counts)."""
    return [sum(counts[j] for j in rank_chunks(pp, virtual, r)) for r in range(pp)]
