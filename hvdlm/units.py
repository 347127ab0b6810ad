"""Counts for people: "1,234", "56.8K", "1.2M", "3.4B". Standard library only (the CLI and the watchers use it)."""

from __future__ import annotations

_SCALES = ((1e3, "K"), (1e6, "M"), (1e9, "B"), (1e12, "T"))


def format_count(n: float) -> str:
    """A token, document or parameter count at a glance: exact below 10,000, else about 3 significant figures.

    A small dataset reads "56.8K" where a fixed "{n / 1e6:.1f}M" prints "0.1M" or "0.0M".
    """
    if abs(n) < 10_000:  # short enough to read exactly
        return f"{round(n):,}"
    for divisor, suffix in _SCALES:
        scaled = n / divisor
        # One decimal while it tells something (1.2M, 56.8K), none from 100 up (123M, not 123.4M).
        text = f"{scaled:.0f}" if abs(scaled) >= 99.95 else f"{scaled:.1f}"
        if abs(float(text)) < 1000 or suffix == _SCALES[-1][1]:  # 999,960 is "1.0M", not "1000K"
            return text + suffix
    raise AssertionError("unreachable")


def counted(n: int, word: str, plural: str = "") -> str:
    """ "1 node", "2 nodes", "1,024 nodes": a count and its noun, for sentences (`plural`: where an s is not it,
    e.g. "micro-batches")."""
    return f"{n:,} {word if n == 1 else plural or word + 's'}"
