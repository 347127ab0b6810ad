"""Prepared datasets: round trips through both tokenizers, the shard format, the split, atomic, idempotent prepare."""

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import hvdlm.data.prepare as prepare_module
from hvdlm.data import load_tokenizer, open_dataset
from hvdlm.data.assemble import ShardSink
from hvdlm.data.prepare import PrepareOptions, is_validation, prepare
from hvdlm.data.shards import ShardWriter, token_dtype
from hvdlm.data.sources import SkipReport, read_documents, resolve_sources, stdlib_files, stdlib_root
from hvdlm.data.tokenizer import EOT, MAX_BPE_VOCAB, check_bpe_vocab
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
    real_add = ShardSink.add_unit

    def crash_midway(self, work, index):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the shards
        real_add(self, work, index)

    monkeypatch.setattr(ShardSink, "add_unit", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], out, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Beside it only the encoded units (for a rerun to reuse), in a hidden directory that is no dataset.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[1:] == ["ds", "src"] and left[0].startswith(".ds.tmp-work-"), left
    assert not (tmp_path / left[0] / "meta.json").exists()
    monkeypatch.undo()
    assert not prepare([str(src)], out, log=lambda m: None).up_to_date
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


def test_prepare_never_replaces_a_directory_it_did_not_write(small_corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and holds no dataset"):
        prepare([str(small_corpus)], out, log=lambda m: None)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_damaged_dataset_is_a_clear_error_and_prepare_repairs_it(small_corpus, tmp_path):
    out = tmp_path / "ds"
    prepare([str(small_corpus)], out, log=lambda m: None)
    shard = out / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InputError, match="damaged or not an hvdlm dataset: shard train-00000.bin should hold"):
        open_dataset(out)
    with pytest.raises(InputError, match="not a prepared dataset"):
        open_dataset(tmp_path / "nowhere")
    # Unchanged inputs, but the dataset is no longer what they give: prepare writes it again.
    assert not prepare([str(small_corpus)], out, log=lambda m: None).up_to_date
    assert sorted(dataset_texts(open_dataset(out))) == sorted(source_texts([str(small_corpus)]).values())


@pytest.fixture
def src(tmp_path) -> Path:
    """A source folder, tmp_path/src, of two documents: a.txt ("hello") and b.txt ("world")."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    (src / "b.txt").write_text("world\n")
    return src


FOREIGN_METAS = ['{"project": "mine"}', "[1]", '"x"', '{"format_version": 1}', "not json", ""]


@pytest.mark.parametrize("meta", FOREIGN_METAS)
def test_a_meta_json_not_written_by_prepare_is_not_a_dataset_and_nothing_is_deleted(src, tmp_path, meta):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "meta.json").write_text(meta)
    (out / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="is not empty and holds no dataset"):
        prepare([str(src)], out, log=lambda m: None)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"meta.json": meta, "notes.txt": "precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "src"]


def test_a_dataset_holding_files_prepare_did_not_write_is_never_replaced(src, tmp_path):
    out = tmp_path / "ds"
    prepare([str(src)], out, log=lambda m: None)
    (out / "notes.txt").write_text("precious")
    (out / "plots").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert prepare([str(src)], out, log=lambda m: None).up_to_date  # nothing to do: nothing touched
    (src / "a.txt").write_text("changed\n")
    with pytest.raises(InputError, match="holds a dataset and files prepare did not write .notes.txt, plots."):
        prepare([str(src)], out, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before and (out / "plots").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]  # the finished new copy was dropped
    # The same check at the swap itself, for files that arrive while a prepare runs.
    staged = tmp_path / "staged"
    prepare([str(src)], staged, log=lambda m: None)
    with pytest.raises(InputError, match="files prepare did not write"):
        prepare_module._publish(staged, out, "another fingerprint")
    assert (out / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: "x", "meta.json is not a readable JSON object"),
        (lambda m: [1], "meta.json is not a readable JSON object"),
        (lambda m: {"format_version": 1}, "meta.json lacks inputs_fingerprint, content_hash, splits, tokenizer, dtype"),
        (lambda m: {k: v for k, v in m.items() if k != "dtype"}, "meta.json lacks dtype"),
        (lambda m: {**m, "dtype": "float64"}, "dtype is 'float64'"),
        (lambda m: {**m, "tokenizer": "bpe"}, "the tokenizer entry has no type"),
        (lambda m: {**m, "splits": {"train": m["splits"]["train"]}}, "splits.val.shards is missing"),
        (
            lambda m: {
                **m,
                "splits": {
                    **m["splits"],
                    "val": {
                        **m["splits"]["val"],
                        "shards": [{**m["splits"]["val"]["shards"][0], "file": "../../etc/passwd"}],
                    },
                },
            },
            "a shard entry of splits.val names file '../../etc/passwd'",
        ),
    ],
)
def test_a_damaged_or_foreign_meta_json_is_one_clear_error(src, tmp_path, edit, problem):
    out = tmp_path / "ds"
    prepare([str(src)], out, log=lambda m: None)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(edit(meta)))
    message = f"dataset at {out} is damaged or not an hvdlm dataset: {problem}"
    for read in (open_dataset, load_tokenizer):
        with pytest.raises(InputError) as e:
            read(out)
        assert str(e.value).startswith(message) and "prepare it again with `hvdlm data prepare" in str(e.value)


def test_another_format_version_says_so(src, tmp_path):
    out = tmp_path / "ds"
    prepare([str(src)], out, log=lambda m: None)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(InputError, match="has format version 2, this hvdlm reads version 1"):
        open_dataset(out)
    assert not prepare([str(src)], out, log=lambda m: None).up_to_date  # replaced, not refused
    assert open_dataset(out).meta["format_version"] == 1


@pytest.mark.parametrize(
    "out, message",
    [
        ("afile/ds", "'{tmp}/afile' is a file, not a directory"),
        ("afile", "output '{tmp}/afile' is a file"),
        ("/proc/ds", "cannot create the dataset directory '/proc/ds'"),
    ],
)
def test_an_output_that_cannot_be_created_is_a_clear_error(src, tmp_path, out, message):
    (tmp_path / "afile").write_text("mine")
    out = out if out.startswith("/") else str(tmp_path / out)
    with pytest.raises(InputError, match=message.format(tmp=tmp_path).replace("(", "\\(")):
        prepare([str(src)], out, log=lambda m: None)
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "src"]


@pytest.mark.parametrize(
    "pattern, what",
    [
        ("", "is empty"),
        ("  ", "is empty"),
        ("/etc/*", "is an absolute path"),
        ("../*", "climbs out"),
        ("sub/../../*", "climbs out"),
        ("**a", "is not a valid pattern"),
    ],
)
def test_globs_stay_inside_their_directory(src, tmp_path, pattern, what):
    (tmp_path / "outside.txt").write_text("not part of the source\n")
    with pytest.raises(InputError, match=f"--glob '{pattern.replace('*', '[*]')}' {what}"):
        resolve_sources([str(src)], [pattern])
    assert [f.name for f in resolve_sources([str(src)], ["*.txt"])] == ["src/a.txt", "src/b.txt"]


def test_the_bpe_vocabulary_is_capped_and_a_smaller_trained_one_is_reported(src, tmp_path):
    check_bpe_vocab(MAX_BPE_VOCAB)
    check_bpe_vocab(70_000)  # above 65,536: uint32 shards, still allowed
    for too_big in (MAX_BPE_VOCAB + 1, 2**32):
        with pytest.raises(InputError, match="at most 1,048,576"):
            PrepareOptions(tokenizer="bpe", vocab_size=too_big).check()
    out = tmp_path / "ds"
    report = prepare([str(src)], out, PrepareOptions(tokenizer="bpe", vocab_size=70_000), log=lambda m: None)
    trained = open_dataset(out).vocab_size
    assert trained < 300 and report.dtype == "uint16"  # two words hold few pairs to merge
    warning = f"the BPE vocabulary has {trained:,} tokens, fewer than the 70,000 asked for"
    assert warning in report.summary()
    assert (
        warning
        in prepare(
            [str(tmp_path / "src")], out, PrepareOptions(tokenizer="bpe", vocab_size=70_000), log=lambda m: None
        ).summary()
    )


def test_uint32_shards_read_back(src, tmp_path, monkeypatch):
    # A vocabulary over 65,536 needs a large corpus to train: force the wide format on a small one instead.
    monkeypatch.setattr(prepare_module, "token_dtype", lambda vocab: np.dtype("<u4"))
    out = tmp_path / "ds"
    prepare([str(src)], out, log=lambda m: None)
    ds = open_dataset(out)
    assert ds.meta["dtype"] == "uint32" and ds.train.shards[0].dtype == np.uint32
    assert sorted(dataset_texts(ds)) == ["hello\n", "world\n"]


def test_the_end_of_document_text_inside_a_document_is_plain_text(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = [f"document {i}: some text to merge, some text to merge.\n" for i in range(7)]
    texts[2] = f"a literal {EOT} in the middle\n"
    texts[5] = f"{EOT}{EOT} at the start and the end {EOT}"
    for i, text in enumerate(texts):
        (src / f"{i}.txt").write_text(text)
    out = tmp_path / "ds"
    report = prepare([str(src)], out, PrepareOptions(tokenizer="bpe", vocab_size=300), log=lambda m: None)
    ds = open_dataset(out)
    eot = ds.tokenizer.eot_id
    n_eot = sum(int((shard == eot).sum()) for split in (ds.train, ds.val) for shard in split.shards)
    assert n_eot == sum(report.documents.values()) == 7  # only the boundaries prepare appended
    assert sorted(dataset_texts(ds)) == sorted(texts)
    # The tokenizer the trainer and `hvdlm generate` load treats the text alike (the flag is not in tokenizer.json).
    tok = load_tokenizer(out)
    ids = tok.encode(texts[5])
    assert eot not in ids and tok.decode(ids) == texts[5]
    assert tok.decode([*tok.encode("end"), eot]) == f"end{EOT}"


def test_strict_does_not_accept_a_dataset_that_skipped_inputs(src, tmp_path):
    (src / "blob.bin").write_bytes(b"\x00\x01" * 50)
    (src / "empty.txt").write_text("")
    out = tmp_path / "ds"
    prepare([str(src)], out, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError, match="'src/blob.bin' was rejected: binary"):
        prepare([str(src)], out, PrepareOptions(strict=True), log=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Without the binary file, only an empty document is skipped, and strict mode skips those too: up to date.
    (src / "blob.bin").unlink()
    prepare([str(src)], out, log=lambda m: None)
    assert prepare([str(src)], out, PrepareOptions(strict=True), log=lambda m: None).up_to_date


def test_datasets_and_temporary_directories_inside_a_source_are_not_read(src, tmp_path):
    prepare([str(src)], src / "inner", log=lambda m: None)
    (src / ".other.tmp-x1y2").mkdir()  # left by a prepare that was killed
    (src / ".other.tmp-x1y2" / "train-00000.bin").write_bytes(b"\x00\x01")
    for globs in (None, ["**/*"]):  # a --glob makes hidden files count too
        assert [f.name for f in resolve_sources([str(src)], globs)] == ["src/a.txt", "src/b.txt"]
    report = prepare([str(src)], tmp_path / "outer", log=lambda m: None)
    assert sum(report.documents.values()) == 2 and report.skipped == {}


def test_a_fifo_source_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InputError, match="'.*pipe' is not a regular file or a directory"):
        resolve_sources([str(tmp_path / "pipe")])


def test_a_byte_order_mark_on_the_first_json_lines_line_is_accepted(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')
    skipped = SkipReport()
    docs = [d.text for _, d in read_documents(resolve_sources([str(tmp_path)]), "text", False, skipped)]
    assert docs == ["first", "second"] and skipped.total == 0


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
