"""Agreement across ranks: the two protocols that keep ranks from parting ways at a collective.

A rank that raises on its own while the others walk into the next collective hangs the job. So bad input found
on any rank (a missing file on one node, a checkpoint that does not fit) is made every rank's error:

- `together(name)`: every rank runs the block; if it raised InputError on any rank, every rank raises the first
  such rank's error (by rank), and none goes on alone.
- `rank0_decides(decide, name)`: rank 0 alone looks (at the run directory, say) and decides; every rank hears
  the decision, or every rank raises rank 0's error.

Both are collectives (hvdlm.parallel.jobwide): every rank of the job must call them in the same order, with the
same `name`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from hvdlm.errors import InputError
from hvdlm.parallel import jobwide

T = TypeVar("T")


def raise_if_any(error: str | None, name: str) -> None:
    """Every rank raises the first rank's error, or none does."""
    # Gathering every rank's outcome is also the barrier that keeps the ranks in step.
    errors = [e for e in jobwide.allgather_object(error, name) if e]
    if errors:
        raise InputError(errors[0])


@contextlib.contextmanager
def together(name: str) -> Iterator[None]:
    """Run the block on every rank; an InputError on any rank becomes every rank's (the first rank's message)."""
    error = None
    try:
        yield
    except InputError as e:
        error = str(e)
    raise_if_any(error, name)


def rank0_decides(decide: Callable[[], T], name: str) -> T:
    """Rank 0 calls `decide()`; every rank returns its result, or raises the InputError it raised."""
    import horovod.torch as hvd

    answer: dict = {}
    if hvd.rank() == 0:
        try:
            answer["value"] = decide()
        except InputError as e:
            answer["error"] = str(e)
    # The broadcast doubles as the barrier that keeps other ranks from racing ahead of rank 0's look.
    answer = jobwide.broadcast_object(answer, 0, name)
    if "error" in answer:
        raise InputError(answer["error"])
    return answer["value"]
