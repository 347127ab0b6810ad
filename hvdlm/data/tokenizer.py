"""Tokenizers: byte-level (vocab 256, nothing to train) and byte-level BPE trained with Hugging Face `tokenizers`.

The tokenizer is saved with the dataset it encoded (`tokenizer.json` for BPE, a line of meta.json for bytes), and
`load_tokenizer(dataset_dir)` gives back the very same one, so the trainer and `hvdlm generate` read and write the
token ids the shards hold. Both are byte-level, so every UTF-8 text round-trips: decode(encode(text)) == text.

The API is the same for both:
    tok = load_tokenizer("data/mydataset")
    ids = tok.encode("def f():")          # list[int]
    text = tok.decode(ids)                # str
    tok.vocab_size, tok.eot_id            # eot_id is None for bytes
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

# The BPE vocabulary range lives in the (import-light) config, which checks job files with it too.
from hvdlm.config import MAX_BPE_VOCAB, MIN_BPE_VOCAB
from hvdlm.data.meta import load_meta
from hvdlm.errors import InputError

EOT = "<|endoftext|>"  # GPT-2's end-of-document token, appended after every document by the BPE tokenizer
BPE_FILE = "tokenizer.json"


class ByteTokenizer:
    """One token per UTF-8 byte."""

    kind = "byte"
    vocab_size = 256
    eot_id = None
    # No id is free for an end-of-document token, so documents are separated by a blank line: a window that
    # straddles two files still reads as source text.
    separator = np.frombuffer(b"\n\n", dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # A window can end inside a multi-byte character: show a replacement character rather than fail.
        return bytes(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.uint8)).decode(
            "utf-8", errors="replace"
        )

    def describe(self) -> dict:
        return {"type": "byte", "vocab_size": self.vocab_size, "eot_id": None, "separator": "\n\n"}

    def save(self, directory: Path) -> None:
        """Nothing to save: meta.json's description is enough."""


class BpeTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization), wrapping a Hugging Face `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        # The text "<|endoftext|>" inside a document is plain text: only prepare appends the end-of-document id,
        # so the EOT ids in a shard are exactly its document boundaries. tokenizer.json does not keep this flag,
        # so it is set here, for a trained tokenizer and a loaded one alike.
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eot_id = hf_tokenizer.token_to_id(EOT)
        self.separator = np.array([self.eot_id], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        # Rust threads encode the batch on all cores; the "fast" variant skips offsets we do not need.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict:
        return {"type": "bpe", "vocab_size": self.vocab_size, "eot_id": self.eot_id, "eot": EOT, "file": BPE_FILE}

    def save(self, directory: Path) -> None:
        # Through Python's open, not the library's save: a full disk is then an OSError that prepare can report.
        (directory / BPE_FILE).write_text(self._tok.to_str(pretty=True))


Tokenizer = ByteTokenizer | BpeTokenizer


def check_bpe_vocab(vocab_size: int) -> None:
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise InputError(
            f"BPE vocabulary size {vocab_size:,} is out of range: it needs at least {MIN_BPE_VOCAB} (256 bytes, the "
            f"end-of-document token, and one merge) and at most {MAX_BPE_VOCAB:,}. Pass --vocab-size 4096, say, or "
            "use --tokenizer byte."
        )


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> BpeTokenizer:
    """Learn merges on the texts until the vocabulary (bytes + end-of-document + merges) has vocab_size tokens."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_bpe_vocab(vocab_size)
    tok = HfTokenizer(models.BPE())
    # add_prefix_space=False: the text is encoded as it is, so decoding gives back exactly the input.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those the corpus lacks
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return BpeTokenizer(tok)


def make_tokenizer(description: dict, directory: Path) -> Tokenizer:
    """The tokenizer meta.json describes, loaded from its dataset directory."""
    kind = description.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HfTokenizer

        path = directory / description.get("file", BPE_FILE)
        try:
            return BpeTokenizer(HfTokenizer.from_file(str(path)))
        except Exception as e:  # the library raises a bare Exception for a missing or malformed file
            raise InputError(
                f"cannot load the BPE tokenizer {path}: {e}. Prepare the dataset again with `hvdlm data prepare`."
            ) from None
    raise InputError(f"dataset {directory} names an unknown tokenizer type {kind!r}; prepare it again.")


def load_tokenizer(dataset_dir: str | Path) -> Tokenizer:
    """The tokenizer a dataset was prepared with (the one to train on it and to generate text with)."""
    directory = Path(dataset_dir)
    return make_tokenizer(load_meta(directory)["tokenizer"], directory)
