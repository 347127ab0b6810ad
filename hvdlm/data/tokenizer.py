"""Tokenizers: byte-level (vocab 256, nothing to train), byte-level BPE trained with Hugging Face `tokenizers`, and
a pretrained one: the `tokenizer.json` of a directory written by `transformers` (`hvdlm data prepare --tokenizer DIR`,
for fine-tuning the model saved beside it), used as it is.

The tokenizer is saved with the dataset it encoded (`tokenizer.json` for BPE and pretrained ones, a line of
meta.json for bytes), and
`load_tokenizer(dataset_dir)` gives back the very same one, so the trainer and `hvdlm generate` read and write the
token ids the shards hold. Both are byte-level, so every UTF-8 text round-trips: decode(encode(text)) == text.

The API is the same for both:
    tok = load_tokenizer("data/mydataset")
    ids = tok.encode("def f():")          # list[int]
    text = tok.decode(ids)                # str
    tok.vocab_size, tok.eot_id            # eot_id is None for bytes
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# The BPE vocabulary range lives in the (import-light) config, which checks job files with it too.
from hvdlm.config import MAX_BPE_VOCAB, MIN_BPE_VOCAB
from hvdlm.data.meta import load_meta
from hvdlm.errors import InputError

EOT = "<|endoftext|>"  # GPT-2's end-of-document token, appended after every document by the BPE tokenizer
BPE_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # transformers' settings beside tokenizer.json: the eos_token


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

    def __init__(self, hf_tokenizer, eot: str = EOT):
        # The text "<|endoftext|>" inside a document is plain text: only prepare appends the end-of-document id,
        # so the EOT ids in a shard are exactly its document boundaries. tokenizer.json does not keep this flag,
        # so it is set here, for a trained tokenizer and a loaded one alike.
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        self.eot = eot
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eot_id = hf_tokenizer.token_to_id(eot)
        self.separator = np.array([self.eot_id], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: a pretrained tokenizer's post-processor (a BOS, say) would add ids that are
        # no text; the documents' boundaries are the separator's to mark. (hvdlm's own BPE has no post-processor.)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        # Rust threads encode the batch on all cores; the "fast" variant skips offsets we do not need.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict:
        return {"type": "bpe", "vocab_size": self.vocab_size, "eot_id": self.eot_id, "eot": EOT, "file": BPE_FILE}

    def save(self, directory: Path) -> None:
        # Through Python's open, not the library's save: a full disk is then an OSError that prepare can report.
        (directory / BPE_FILE).write_text(self._tok.to_str(pretty=True))

    def to_json(self) -> str:
        """tokenizer.json's text (what `hvdlm export` writes for transformers)."""
        return self._tok.to_str()


class PretrainedTokenizer(BpeTokenizer):
    """The tokenizer.json of a transformers directory (any model `tokenizers` reads), with its eos_token as the
    end-of-document token; encoded and decoded as hvdlm's BPE is, so "<|endoftext|>" in a text is plain text."""

    kind = "pretrained"

    def __init__(self, hf_tokenizer, eot: str, source: str):
        super().__init__(hf_tokenizer, eot)
        self.source = source  # the directory it came from, for the record in meta.json

    def describe(self) -> dict:
        return {**super().describe(), "type": "pretrained", "eot": self.eot, "source": self.source}


Tokenizer = ByteTokenizer | BpeTokenizer | PretrainedTokenizer


# The longest pre-token BPE training and encoding see, in bytes (ByteLevel maps each byte to one character, so the
# split counts bytes). GPT-2's rule makes a run of letters, digits or punctuation one pre-token, and training merges
# within each distinct pre-token at a cost that grows faster than its length: one 200 KB line without spaces took
# 15 s, a 5 MB one minutes. Natural words are far shorter, so only such runs are cut (as production tokenizer
# pipelines cap their pre-tokens), and their pieces repeat, so they are counted once.
MAX_PRETOKEN_BYTES = 128


def check_bpe_vocab(vocab_size: int) -> None:
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise InputError(
            f"BPE vocabulary size {vocab_size:,} is out of range: it needs at least {MIN_BPE_VOCAB} (256 bytes, the "
            f"end-of-document token, and one merge) and at most {MAX_BPE_VOCAB:,}. Pass --vocab-size 4096, say, or "
            "use --tokenizer byte."
        )


def train_bpe(
    texts: Iterable[str], vocab_size: int, length: int | None = None, show_progress: bool = False
) -> BpeTokenizer:
    """Learn merges on the texts until the vocabulary (bytes + end-of-document + merges) has vocab_size tokens.
    `show_progress`: the trainer's own progress bars (counting, merging) on standard error."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HfTokenizer

    check_bpe_vocab(vocab_size)
    tok = HfTokenizer(models.BPE())
    # add_prefix_space=False: the text is encoded as it is, so decoding gives back exactly the input. Then every
    # pre-token is cut into pieces of at most MAX_PRETOKEN_BYTES (see there); a merge never crosses a cut.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            pre_tokenizers.Split(Regex(f".{{1,{MAX_PRETOKEN_BYTES}}}"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those the corpus lacks
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return BpeTokenizer(tok)


def make_tokenizer(description: dict, directory: Path) -> Tokenizer:
    """The tokenizer meta.json describes, loaded from its dataset directory."""
    kind = description.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "pretrained"):
        hf = _read_tokenizer_json(directory / description.get("file", BPE_FILE), "Prepare the dataset again.")
        if kind == "bpe":
            return BpeTokenizer(hf)
        return PretrainedTokenizer(hf, description.get("eot", EOT), description.get("source", ""))
    raise InputError(f"dataset {directory} names an unknown tokenizer type {kind!r}; prepare it again.")


def _read_tokenizer_json(path: Path, fix: str):
    from tokenizers import Tokenizer as HfTokenizer

    try:
        return HfTokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for a missing or malformed file
        raise InputError(f"cannot load the tokenizer {path}: {e}. {fix}") from None


def byte_tokenizer_json() -> str:
    """hvdlm's byte tokens (id = the byte's value, 0..255) as a `tokenizers` BPE without merges: GPT-2's byte-level
    pre-tokenizer writes each byte as a character of its 256-letter alphabet, and the vocabulary maps that letter
    back to the byte. No special tokens: hvdlm's byte tokens have none ("<|endoftext|>" is 13 bytes of text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split (no merges to keep inside words) and no prefix space: the text is taken byte by byte as it is.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode (openai/gpt-2 encoder.py), as a list indexed by the byte: printable bytes stand for
    themselves, the others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def load_pretrained_tokenizer(directory: str | Path) -> PretrainedTokenizer | ByteTokenizer:
    """The tokenizer of a transformers directory (`save_pretrained`): tokenizer.json, with tokenizer_config.json's
    eos_token (else "<|endoftext|>") as the end-of-document token; hvdlm's byte tokens where it is their form
    (byte_tokenizer_json: a byte-level export of an hvdlm run), which separate documents without such a token."""
    directory = Path(directory)
    fix = f"Name a directory holding a {BPE_FILE} (as transformers' save_pretrained writes it)."
    if not (directory / BPE_FILE).is_file():
        raise InputError(f"'{directory}' holds no {BPE_FILE}, so hvdlm cannot read its tokenizer. {fix}")
    hf = _read_tokenizer_json(directory / BPE_FILE, fix)
    if hf.get_vocab(with_added_tokens=True) == {char: byte for byte, char in enumerate(_byte_alphabet())}:
        return ByteTokenizer()  # 256 tokens, each a byte, nothing else: the same ids as hvdlm's byte tokenizer
    eot = _eos_token(directory) or EOT
    if hf.token_to_id(eot) is None:
        raise InputError(
            f"the tokenizer in '{directory}' has no end-of-document token: neither an eos_token in "
            f"{HF_TOKENIZER_CONFIG} nor {EOT} in its vocabulary. hvdlm separates documents with it; set eos_token."
        )
    return PretrainedTokenizer(hf, eot, str(directory.resolve()))


def _eos_token(directory: Path) -> str | None:
    try:
        eos = json.loads((directory / HF_TOKENIZER_CONFIG).read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None  # no (readable) settings: the GPT-2 default
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


def load_tokenizer(dataset_dir: str | Path) -> Tokenizer:
    """The tokenizer a dataset was prepared with (the one to train on it and to generate text with)."""
    directory = Path(dataset_dir)
    return make_tokenizer(load_meta(directory)["tokenizer"], directory)
