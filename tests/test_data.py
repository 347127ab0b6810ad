"""Prepared datasets: round trips through both tokenizers, the shard format, the split, atomic, idempotent prepare."""

import gzip
import json
import shutil

import numpy as np
import pytest

from hvdlm.data import load_tokenizer, open_dataset
import hvdlm.data.prepare as prepare_module
from hvdlm.data.prepare import PrepareOptions, is_validation, prepare
from hvdlm.data.shards import ShardWriter, token_dtype
from hvdlm.data.sources import SkipReport, read_documents, resolve_sources, stdlib_files, stdlib_root
from hvdlm.errors import InputError


def source_texts(sources, globs=None) -> dict[str, str]:
    """The documents as the sources hold them, read independently of the dataset."""
    return {d.name: d.text for _, d in read_documents(resolve_sources(sources, globs), "text", False, SkipReport())}


def dataset_texts(ds) -> list[str]:
    return [ds.tokenizer.decode(ids) for split in (ds.train, ds.val) for ids in split.documents()]


@pytest.fixture(scope="module")
def stdlib_byte(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib-byte"
    prepare([], out, PrepareOptions(tokenizer="byte"), log=lambda m: None)
    return open_dataset(out)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """About 0.5 MB of real source text in 60 files: enough to train a small BPE in about a second."""
    root = tmp_path_factory.mktemp("small")
    files = [p for p in stdlib_files() if 2_000 < p.stat().st_size < 20_000][:60]
    for p in files:
        target = root / p.relative_to(stdlib_root())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
    return root


def test_byte_round_trip_reproduces_every_stdlib_document(stdlib_byte):
    texts = source_texts(["stdlib"])
    decoded = dataset_texts(stdlib_byte)
    assert len(decoded) == len(texts) > 1000
    assert sorted(decoded) == sorted(texts.values())
    meta = stdlib_byte.meta
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 256
    assert meta["bytes"] == sum(len(t.encode()) for t in texts.values())
    # Every document is followed by the blank-line separator: bytes + 2 per document.
    assert len(stdlib_byte.train) + len(stdlib_byte.val) == meta["bytes"] + 2 * len(texts)


def test_bpe_round_trip_and_the_saved_tokenizer(small_corpus, tmp_path):
    out = tmp_path / "bpe"
    report = prepare([str(small_corpus)], out, PrepareOptions(tokenizer="bpe", vocab_size=300), log=lambda m: None)
    ds = open_dataset(out)
    texts = source_texts([str(small_corpus)])
    assert sorted(dataset_texts(ds)) == sorted(texts.values())
    assert ds.vocab_size == 300 and report.tokens["train"] < report.bytes  # merges compress
    # Each document ends with the end-of-document token, and no document contains it.
    eot = ds.tokenizer.eot_id
    shard = ds.train.shards[0]
    assert int((shard == eot).sum()) == report.documents["train"] == len(list(ds.train.documents()))
    assert shard[-1] == eot
    # The small API the trainer and `hvdlm generate` use gives back the very tokenizer the shards were made with.
    tok = load_tokenizer(out)
    text = "def f(x):\n    return x  # ünïcode ✓\n"
    assert tok.decode(tok.encode(text)) == text
    first = next(iter(ds.train.documents()))
    assert tok.encode(tok.decode(first)) == first.tolist()


def test_split_is_by_document_and_stable():
    names = [f"pkg/mod{i}.py" for i in range(2000)]
    first = [is_validation(n, 0.05) for n in names]
    assert first == [is_validation(n, 0.05) for n in names]
    assert 50 < sum(first) < 150


def test_split_puts_each_document_wholly_in_one_split(stdlib_byte):
    val_docs = {stdlib_byte.tokenizer.decode(ids) for ids in stdlib_byte.val.documents()}
    texts = source_texts(["stdlib"])
    expected_val = {t for name, t in texts.items() if is_validation(name, 0.05)}
    assert val_docs == expected_val
    assert 0.01 < len(stdlib_byte.val) / len(stdlib_byte.train) < 0.15


def test_shards_are_plain_memmappable_arrays_of_whole_documents(small_corpus, tmp_path):
    out = tmp_path / "sharded"
    prepare([str(small_corpus)], out, PrepareOptions(shard_tokens=100_000), log=lambda m: None)
    meta = json.loads((out / "meta.json").read_text())
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 2
    for entry in shards:
        tokens = np.memmap(out / entry["file"], dtype=np.uint16, mode="r")  # nothing but raw token ids
        assert len(tokens) == entry["tokens"]
        docs = np.load(out / entry["docs"])
        assert len(docs) == entry["documents"] and docs[0, 0] == 0 and docs[-1, 1] == len(tokens) - 2
    assert sum(e["tokens"] for e in shards) == meta["splits"]["train"]["tokens"]
    assert meta["content_hash"].startswith("sha256:") and meta["format_version"] == 1
    assert sorted(dataset_texts(open_dataset(out))) == sorted(source_texts([str(small_corpus)]).values())


def test_token_width_follows_the_vocabulary(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    writer = ShardWriter(tmp_path, "train", token_dtype(100_000))
    writer.add(np.array([0, 70_000, 99_999]), np.array([1]))
    (entry,) = writer.close()
    assert np.memmap(tmp_path / entry["file"], dtype=np.uint32, mode="r").tolist() == [0, 70_000, 99_999, 1]


def test_prepare_again_on_unchanged_inputs_does_nothing(small_corpus, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_corpus, src)
    out = tmp_path / "ds"
    first = prepare([str(src)], out, log=lambda m: None)
    assert not first.up_to_date
    stamp = (out / "meta.json").stat().st_mtime_ns
    again = prepare([str(src)], out, log=lambda m: None)
    assert again.up_to_date and (out / "meta.json").stat().st_mtime_ns == stamp
    assert "nothing to do" in again.summary()
    # A changed input or option is a new dataset, published in place of the old one.
    next(src.rglob("*.py")).write_text("x = 1\n" * 10)
    changed = prepare([str(src)], out, log=lambda m: None)
    assert not changed.up_to_date
    other = prepare([str(src)], out, PrepareOptions(val_fraction=0.2), log=lambda m: None)
    assert not other.up_to_date and other.documents["val"] > changed.documents["val"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directories left


def test_a_failed_prepare_leaves_no_half_dataset_and_keeps_the_old_one(small_corpus, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(small_corpus, src)
    out = tmp_path / "ds"
    prepare([str(src)], out, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    next(src.rglob("*.py")).write_text("changed = True\n")

    calls = 0
    real_add = ShardWriter.add

    def crash_midway(self, tokens, separator):
        nonlocal calls
        calls += 1
        if calls == 20:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the shards
        real_add(self, tokens, separator)

    monkeypatch.setattr(ShardWriter, "add", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], out, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


def test_prepare_never_replaces_a_directory_it_did_not_write(small_corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and holds no dataset"):
        prepare([str(small_corpus)], out, log=lambda m: None)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_damaged_dataset_is_a_clear_error(small_corpus, tmp_path):
    out = tmp_path / "ds"
    prepare([str(small_corpus)], out, log=lambda m: None)
    shard = out / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InputError, match="damaged: shard train-00000.bin"):
        open_dataset(out)
    with pytest.raises(InputError, match="not a prepared dataset"):
        open_dataset(tmp_path / "nowhere")


def test_publishing_onto_the_same_dataset_keeps_the_copy_already_there(small_corpus, tmp_path):
    """The losing side of two concurrent preparers: its finished copy is dropped, the published one untouched."""
    first, second = tmp_path / "first", tmp_path / "second"
    prepare([str(small_corpus)], first, log=lambda m: None)
    prepare([str(small_corpus)], second, log=lambda m: None)
    published = (first / "meta.json").read_text()
    prepare_module._publish(second, first, json.loads(published)["inputs_fingerprint"])
    assert not second.exists() and (first / "meta.json").read_text() == published


def test_an_output_inside_a_source_directory_is_never_read_as_input(tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"note {i}\n")
    first = prepare([str(src)], src / "dataset", log=lambda m: None)
    assert first.documents["train"] + first.documents["val"] == 3
    assert prepare([str(src)], src / "dataset", log=lambda m: None).up_to_date


def test_json_lines_stream_keeps_records_before_a_cut_and_line_separators_inside_strings(tmp_path):
    records = [{"text": f"record {i}\u2028with a line separator inside"} for i in range(200)]
    data = gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "whole.jsonl").write_text(json.dumps(records[0], ensure_ascii=False) + "\n")
    skipped = SkipReport()
    docs = [d for _, d in read_documents(resolve_sources([str(tmp_path)]), "text", False, skipped)]
    assert skipped.counts == {"unreadable gzip": 1}
    assert 1 < len(docs) < 201 and all(d.text in {r["text"] for r in records} for d in docs)
    with pytest.raises(InputError, match="cut.jsonl.gz .after line \\d+.' was rejected: unreadable gzip"):
        list(read_documents(resolve_sources([str(tmp_path)]), "text", True, SkipReport()))
