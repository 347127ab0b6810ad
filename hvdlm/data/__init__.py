"""Data: sources -> tokenizer -> token shards on disk (`hvdlm data prepare`) -> memory-mapped splits.

    from hvdlm.data.prepare import prepare       # write a dataset directory
    from hvdlm.data import open_dataset          # read one: .train / .val splits, .tokenizer, .meta
    from hvdlm.data import load_tokenizer        # just its tokenizer: encode / decode
    from hvdlm.data.sampler import WindowSampler # the trainer's batches (imports torch)

Import-light (numpy only), because `hvdlm data prepare` is a CLI command.
"""

from hvdlm.data.dataset import Dataset, TokenSplit, open_dataset
from hvdlm.data.tokenizer import load_tokenizer

__all__ = ["Dataset", "TokenSplit", "load_tokenizer", "open_dataset"]
