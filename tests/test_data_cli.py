"""`hvdlm data prepare` as a user meets it: mixed and corrupt inputs, clear errors, and training on its output."""

import gzip
import json
import re

import pytest
import torch
from helpers import REPO, assert_imports_nothing_heavy

from hvdlm.data import open_dataset

GOOD = {
    "a.txt": "The first document.\nIt has two lines.\n",
    "b.md": "# Second\n\nMarkdown, ünïcode ✓.\n",
}


def texts_of(out) -> list[str]:
    ds = open_dataset(out)
    return sorted(ds.tokenizer.decode(ids) for split in (ds.train, ds.val) for ids in split.documents())


@pytest.fixture
def messy(tmp_path):
    """A directory of good text and every kind of bad input the pipeline must survive."""
    root = tmp_path / "messy"
    (root / "sub").mkdir(parents=True)
    for name, text in GOOD.items():
        (root / name).write_text(text)
    (root / "sub" / "c.txt.gz").write_bytes(gzip.compress("Third, from gzip.\n".encode()))
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "cut.txt.gz").write_bytes(gzip.compress(b"a long text " * 1000)[:60])
    records = [
        {"text": "Fourth, a JSON Lines record."},
        {"title": "no text field"},
        {"text": 42},
        "not an object",
        {"text": "Fifth, after the bad ones."},
    ]
    lines = [json.dumps(r) for r in records] + ["{broken json"]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "more.jsonl.gz").write_bytes(gzip.compress(b'{"text": "Sixth, gzip JSON Lines."}\n'))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: not read without a --glob naming it
    return root


def test_bad_inputs_are_skipped_and_counted_and_the_rest_is_kept(hvdlm, messy, tmp_path):
    out = tmp_path / "ds"
    r = hvdlm("data", "prepare", str(messy), "--out", str(out))
    assert r.code == 0, r.out
    assert "Traceback" not in r.out
    for counted in (
        "1 binary",
        "1 not UTF-8",
        "1 unreadable gzip",
        "2 JSON Lines records without the text field",
        "2 JSON Lines records that are not JSON objects",
    ):
        assert counted in r.out, r.out
    assert "documents  6 " in r.out and "bytes per token" in r.out and "tokens/s" in r.out
    expected = sorted(
        [
            *GOOD.values(),
            "Third, from gzip.\n",
            "Fourth, a JSON Lines record.",
            "Fifth, after the bad ones.",
            "Sixth, gzip JSON Lines.",
        ]
    )
    assert texts_of(out) == expected
    assert json.loads((out / "meta.json").read_text())["skipped"]["not UTF-8"] == 1


def test_strict_rejects_bad_input_before_writing_anything(hvdlm, messy, tmp_path):
    out = tmp_path / "ds"
    r = hvdlm("data", "prepare", str(messy), "--out", str(out), "--strict")
    assert r.code == 2, r.out
    assert r.out.startswith("Error: input '") and "(--strict)" in r.out and "Traceback" not in r.out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["messy"]


def test_strict_on_unchanged_inputs_rejects_what_the_dataset_skipped(hvdlm, messy, tmp_path):
    out = tmp_path / "ds"
    assert hvdlm("data", "prepare", str(messy), "--out", str(out)).code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = hvdlm("data", "prepare", str(messy), "--out", str(out), "--strict")
    assert r.code == 2 and "(--strict)" in r.out and "up to date" not in r.out and "Traceback" not in r.out, r.out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "messy"]


def test_globs_and_text_field_choose_what_is_read(hvdlm, messy, tmp_path):
    (messy / "other.jsonl").write_text('{"body": "from the body field"}\n{"body": "and another"}\n')
    out = tmp_path / "ds"
    r = hvdlm("data", "prepare", str(messy), "--glob", "*.jsonl", "--text-field", "body", "--out", str(out))
    assert r.code == 0, r.out
    assert texts_of(out) == ["and another", "from the body field"]
    assert "4 JSON Lines records without the text field" in r.out  # docs.jsonl has no "body" anywhere


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty_dir", "the sources hold no usable documents (0 input files)"),
        ("binary_only", "no usable documents (1 input files). Skipped: 1 binary"),
        ("one_doc", "a single document"),
        ("missing", "does not exist"),
    ],
)
def test_unusable_corpora_are_one_clear_error(hvdlm, tmp_path, setup, message):
    src = tmp_path / "src"
    if setup != "missing":
        src.mkdir()
    if setup == "binary_only":
        (src / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    if setup == "one_doc":
        (src / "only.txt").write_text("just one\n")
    r = hvdlm("data", "prepare", str(src), "--out", str(tmp_path / "ds"))
    assert r.code == 2, r.out
    assert r.out.startswith("Error: ") and message in r.out and "Traceback" not in r.out
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokenizer", "bpe", "--vocab-size", "100"], "Error: BPE vocabulary size 100 is out of range"),
        (["--tokenizer", "bpe", "--vocab-size", "4294967296"], "and at most 1,048,576"),  # once a Rust abort
        (["--val-fraction", "1.5"], "between 0 and 1"),
        (["--glob", ""], "--glob '' is empty"),
        (["--glob", "/etc/*"], "--glob '/etc/*' is an absolute path"),
        (["--glob", "../*"], "--glob '../*' climbs out of the source directory"),
        (["--out", "{tmp}/afile/ds"], "cannot create the dataset directory '{tmp}/afile/ds': '{tmp}/afile' is a file"),
        (["--out", "/proc/ds"], "cannot create the dataset directory '/proc/ds'"),
    ],
)
def test_bad_options_and_paths_are_clear_errors(hvdlm, messy, tmp_path, args, message):
    (tmp_path / "afile").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    r = hvdlm("data", "prepare", str(messy), "--out", str(tmp_path / "ds"), *args)
    assert r.code == 2 and r.out.startswith("Error: ") and message.format(tmp=tmp_path) in r.out, r.out
    assert "Traceback" not in r.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "messy"]  # no dataset, no temporary directory


@pytest.mark.parametrize("meta", ['{"project": "mine"}', "[1]"])
def test_a_directory_with_a_meta_json_of_its_own_is_left_alone(hvdlm, messy, tmp_path, meta):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "meta.json").write_text(meta)
    (out / "notes.txt").write_text("precious")
    r = hvdlm("data", "prepare", str(messy), "--out", str(out))
    assert r.code == 2 and "is not empty and holds no dataset" in r.out and "Traceback" not in r.out, r.out
    assert {p.name: p.read_text() for p in out.iterdir()} == {"meta.json": meta, "notes.txt": "precious"}


def test_data_prepare_does_not_import_torch_or_horovod(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "b.txt").write_text("two\n")
    assert_imports_nothing_heavy(["data", "prepare", tmp_path, "--out", tmp_path / "ds"], modules=("torch", "horovod"))


def test_training_on_a_prepared_bpe_dataset(hvdlm, tiny_job, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(sorted((REPO / "hvdlm").rglob("*.py"))):
        (src / f"{i:03d}-{p.name}").write_text(p.read_text())
    data = tmp_path / "bpe"
    r = hvdlm("data", "prepare", str(src), "--tokenizer", "bpe", "--vocab-size", "400", "--out", str(data))
    assert r.code == 0, r.out
    assert "tokenizer  bpe (vocab 400)" in r.out
    again = hvdlm("data", "prepare", str(src), "--tokenizer", "bpe", "--vocab-size", "400", "--out", str(data))
    assert again.code == 0 and "up to date" in again.out

    run = tmp_path / "run"
    r = hvdlm("train", str(tiny_job), "--run-dir", str(run), "--set", f"data.dataset={data}")
    assert r.code == 0, r.out
    # The sample's text depends on the corpus (this repository's sources), so only that there is one is checked.
    assert "bpe tokens" in r.out and str(data) in r.out and r.out.split("sample:\n", 1)[1].strip()
    assert "vocab_size = 400" in (run / "config.toml").read_text()  # the model took the tokenizer's vocabulary
    state = torch.load(run / "checkpoints" / "step-0000008.pt", weights_only=True)
    assert state["model"]["tok_emb.weight"].shape[0] == 400
    assert state["data"]["epoch"] == 0 and state["data"]["position"] == 8 * 4  # 8 steps of batch 4, one rank

    missing = hvdlm("train", str(tiny_job), "--run-dir", str(tmp_path / "run2"), "--set", f"data.dataset={tmp_path}/no")
    assert missing.code == 2 and "is not a prepared dataset" in missing.out and "Traceback" not in missing.out
    for meta in ('"x"', '{"format_version": 1}'):
        (tmp_path / "foreign").mkdir(exist_ok=True)
        (tmp_path / "foreign" / "meta.json").write_text(meta)
        r = hvdlm(
            "train",
            str(tiny_job),
            "--run-dir",
            str(tmp_path / "run4"),
            "--set",
            f"data.dataset={tmp_path}/foreign",
            "--set",
            "train.max_steps=1",
        )
        assert r.code == 2 and "Traceback" not in r.out, r.out
        assert f"dataset at {tmp_path}/foreign is damaged or not an hvdlm dataset: meta.json " in r.out, r.out
    padded = hvdlm(
        "train",
        str(tiny_job),
        "--run-dir",
        str(tmp_path / "run3"),
        "--set",
        f"data.dataset={data}",
        "--set",
        "model.vocab_size=448",
        "--set",
        "train.max_steps=1",
    )
    assert padded.code == 0 and "vocab_size = 448" in (tmp_path / "run3" / "config.toml").read_text(), padded.out


def test_bpe_training_on_a_line_without_spaces_cuts_it_and_finishes(hvdlm, tmp_path):
    """A 5 MB run of one character is one GPT-2 pre-token, on which BPE training took minutes (a 200 KB one 15 s):
    the trained tokenizer cuts pre-tokens at MAX_PRETOKEN_BYTES, training takes seconds, and text round-trips."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "long.txt").write_text("x" * (5 << 20) + "\n")
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: the cat sat on the mat, and then it ran away.\n")
    r = hvdlm(
        "data", "prepare", corpus, "--out", tmp_path / "ds", "--tokenizer", "bpe", "--vocab-size", "300", timeout=120
    )
    assert r.code == 0, r.out
    from hvdlm.data.tokenizer import MAX_PRETOKEN_BYTES

    tokenizer = open_dataset(tmp_path / "ds").tokenizer
    pieces = tokenizer._tok.pre_tokenizer.pre_tokenize_str("y" * 1000 + " the cat")
    assert max(len(piece) for piece, _ in pieces) == MAX_PRETOKEN_BYTES
    text = "z" * 700 + " Document 3: the cat sat.\n\nünïcode ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_reading_training_text_reports_its_progress():
    from hvdlm.data.prepare import _reporting_progress

    said: list[str] = []
    texts = ["a" * 2000, "b" * 3000]
    assert list(_reporting_progress(iter(texts), said.append, every_s=0.0)) == texts
    assert said == ["  ... 2,000 characters of training text read", "  ... 5,000 characters of training text read"]


PARAGRAPH = "A paragraph of a book, {i}: it runs on for a while,\nover two lines.\n"


@pytest.mark.parametrize(
    "text, cut_at",
    [
        ("\n\n".join(PARAGRAPH.format(i=i) * (1 + i % 3) for i in range(120)), "at a blank line"),
        ("".join(f"a log line without blank lines between them, number {i}\n" for i in range(400)), "at a line end"),
        ("".join(f"word{i} " for i in range(2000)), "at a fixed length"),  # no line end anywhere
    ],
    ids=["paragraphs", "lines", "one-line"],
)
def test_one_text_file_is_a_corpus_cut_into_documents(hvdlm, tmp_path, text, cut_at):
    """A corpus of one text file (a book, a log) is cut into documents, as the train / validation split needs, at
    blank lines, else at line ends, else at fixed lengths, and the report says so. The documents are the file's
    text in order, the cut blank lines and line ends (white space) left out between them."""
    (tmp_path / "book.txt").write_text(text)
    out = tmp_path / "ds"
    r = hvdlm("data", "prepare", str(tmp_path / "book.txt"), "--out", str(out))
    assert r.code == 0, r.out
    m = re.search(r"cut +the corpus is one text file: book.txt was cut into (\d+) documents \(([^)]*)\)", r.out)
    assert m and int(m[1]) >= 2 and cut_at in m[2], r.out
    ds = open_dataset(out)
    assert len(list(ds.train.documents())) >= 1 and len(list(ds.val.documents())) >= 1
    docs = sorted(texts_of(out), key=text.index)
    assert len(docs) == int(m[1])
    at = 0
    for doc in docs:
        start = text.index(doc, at)
        assert not text[at:start].strip(), f"text between documents left out: {text[at:start]!r}"
        at = start + len(doc)
    assert not text[at:].strip()
