"""Data: the corpus on disk as token arrays, and the sampler that hands each data-parallel rank its windows."""

from hvdlm.data.corpus import TokenSplits, load_corpus
from hvdlm.data.sampler import WindowSampler

__all__ = ["TokenSplits", "WindowSampler", "load_corpus"]
