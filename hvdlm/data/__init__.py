"""Data: sources -> tokenizer -> token shards on disk (`hvdlm data prepare`) -> memory-mapped splits.

Import-light (numpy only), because `hvdlm data prepare` is a CLI command; the sampler, which hands torch tensors
to the trainer, lives in hvdlm.data.sampler.
"""

from hvdlm.data.dataset import Dataset, TokenSplit, open_dataset
from hvdlm.data.prepare import PrepareOptions, PrepareReport, prepare
from hvdlm.data.tokenizer import load_tokenizer

__all__ = ["Dataset", "PrepareOptions", "PrepareReport", "TokenSplit", "load_tokenizer", "open_dataset", "prepare"]
