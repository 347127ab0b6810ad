"""`hvdlm data prepare` on Parquet and zstd inputs, written here with pyarrow and zstandard: the same documents as
the same records in JSON Lines, unusable files skipped and counted or refused with --strict, and neither library
imported where no such file is read."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from helpers import assert_imports_nothing_heavy

from hvdlm.data import open_dataset
from hvdlm.data.sources import SkipReport, fingerprint_inputs, read_documents, resolve_sources

# Enough documents that both splits get some (5 % validation), short enough to keep each prepare under a second.
TEXTS = [f"Document {i}: {'ünïcode ✓ ' * (i % 3)}the quick brown fox, line {i}.\n" for i in range(60)]


def texts_of(out) -> list[str]:
    ds = open_dataset(out)
    return sorted(ds.tokenizer.decode(ids) for split in (ds.train, ds.val) for ids in split.documents())


def jsonl_bytes(texts) -> bytes:
    return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_parquet(path, columns: dict, row_group_size: int = 8) -> None:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def prepare_ok(hvdlm, *args) -> str:
    r = hvdlm("data", "prepare", *map(str, args))
    assert r.code == 0 and "Traceback" not in r.out, r.out
    return r.out


@pytest.fixture
def reference(hvdlm, tmp_path) -> list[str]:
    """The documents of TEXTS prepared from JSON Lines: what every other format must give."""
    (tmp_path / "ref.jsonl").write_bytes(jsonl_bytes(TEXTS))
    prepare_ok(hvdlm, tmp_path / "ref.jsonl", "--out", tmp_path / "ref")
    texts = texts_of(tmp_path / "ref")
    assert texts == sorted(TEXTS)
    return texts


def test_a_parquet_directory_prepares_the_documents_its_json_lines_would(hvdlm, tmp_path, reference):
    src = tmp_path / "hub" / "data"
    src.mkdir(parents=True)
    half = len(TEXTS) // 2
    for i, part in enumerate((TEXTS[:half], TEXTS[half:])):
        write_parquet(src / f"train-0000{i}-of-00002.parquet", {"id": list(range(len(part))), "text": part})
        assert pq.ParquetFile(src / f"train-0000{i}-of-00002.parquet").num_row_groups == 4  # several per file
    out = prepare_ok(hvdlm, tmp_path / "hub", "--out", tmp_path / "ds")
    assert f"documents  {len(TEXTS)} " in out and "skipped    none" in out, out
    assert texts_of(tmp_path / "ds") == reference
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["sources"] == [str(tmp_path / "hub")] and meta["input_files"] == 2


@pytest.mark.parametrize("name", ["web.jsonl.zst", "web.ndjson.zst"])
def test_zstd_json_lines_prepare_the_documents_their_plain_form_would(hvdlm, tmp_path, reference, name):
    data = jsonl_bytes(TEXTS)
    # Two frames, as concatenated dumps (and pzstd) write them: both are read.
    compress = zstandard.ZstdCompressor().compress
    (tmp_path / name).write_bytes(compress(data[:1000]) + compress(data[1000:]))
    prepare_ok(hvdlm, tmp_path / name, "--out", tmp_path / "ds")
    assert texts_of(tmp_path / "ds") == reference


def test_zstd_text_files_are_documents_as_their_plain_form(hvdlm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(TEXTS[:4]):
        (src / f"{i}.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    prepare_ok(hvdlm, src, "--out", tmp_path / "ds")
    assert texts_of(tmp_path / "ds") == sorted(TEXTS[:4])


def test_text_field_picks_the_parquet_column(hvdlm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "a.parquet", {"text": ["not this"] * 4, "content": TEXTS[:4]}, row_group_size=2)
    prepare_ok(hvdlm, src, "--text-field", "content", "--out", tmp_path / "ds")
    assert texts_of(tmp_path / "ds") == sorted(TEXTS[:4])


def unusable(tmp_path):
    """A directory of good inputs and one of each unusable Parquet or zstd kind; the reasons they are counted as."""
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "good.parquet", {"text": TEXTS[:10]})
    write_parquet(src / "nulls.parquet", {"text": ["kept, beside a null", None, "   "]})
    write_parquet(src / "other.parquet", {"body": TEXTS[10:12]})
    write_parquet(src / "numbers.parquet", {"text": [1, 2, 3]})
    (src / "fake.parquet").write_bytes(b"PAR1 not really a Parquet file\n")
    whole = zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS[20:40]))
    (src / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    (src / "plain.jsonl.zst").write_bytes(jsonl_bytes(TEXTS[40:42]))  # not compressed at all
    (src / "good.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS[50:55])))
    reasons = {
        "Parquet files without the text column": "other.parquet (no column 'text')",
        "Parquet files whose text column is not strings": "numbers.parquet ('text' is int64)",
        "unreadable Parquet": "fake.parquet",
        "Parquet rows without text (null)": "nulls.parquet:2",
        "unreadable zstd": "cut.jsonl.zst",  # the whole file is one block: no line comes out before the cut
    }
    return src, reasons, sorted([*TEXTS[:10], "kept, beside a null", *TEXTS[50:55]])


def test_unusable_parquet_and_zstd_are_skipped_and_counted(hvdlm, tmp_path):
    src, reasons, kept = unusable(tmp_path)
    out = prepare_ok(hvdlm, src, "--out", tmp_path / "ds")
    for reason in reasons:
        assert f"1 {reason}" in out or reason == "unreadable zstd", out
    assert "2 unreadable zstd" in out, out
    assert texts_of(tmp_path / "ds") == kept
    skipped = json.loads((tmp_path / "ds" / "meta.json").read_text())["skipped"]
    assert skipped == {**{reason: 1 for reason in reasons}, "unreadable zstd": 2, "empty documents": 1}
    report = SkipReport()  # the names behind the counts, which a --strict error and an empty corpus's error show
    assert sorted(d.text for _, d in read_documents(resolve_sources([str(src)]), "text", False, report)) == kept
    for reason, example in reasons.items():
        assert f"src/{example}" in report.examples[reason], report.examples


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("other.parquet", "Parquet files without the text column"),
        ("numbers.parquet", "Parquet files whose text column is not strings"),
        ("fake.parquet", "unreadable Parquet"),
        ("nulls.parquet", "Parquet rows without text (null)"),
        ("cut.jsonl.zst", "unreadable zstd"),
        ("plain.jsonl.zst", "unreadable zstd"),
    ],
)
def test_strict_refuses_each_unusable_file_by_name_and_writes_nothing(hvdlm, tmp_path, bad, reason):
    src, _, _ = unusable(tmp_path)
    for path in src.iterdir():
        if path.name not in (bad, "good.parquet", "good.jsonl.zst"):
            path.unlink()
    r = hvdlm("data", "prepare", str(src), "--out", str(tmp_path / "ds"), "--strict")
    assert r.code == 2 and r.out.startswith(f"Error: input 'src/{bad}") and f"{reason} (--strict)" in r.out, r.out
    assert "Traceback" not in r.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dataset, no temporary directory


def test_a_damaged_parquet_file_keeps_the_rows_before_the_damage(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"text": TEXTS[:40]}, row_group_size=10)
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    third = meta.row_group(2).column(0)
    start = third.dictionary_page_offset or third.data_page_offset
    data[start : start + 40] = b"\xff" * 40  # the third row group's first page header
    (tmp_path / "a.parquet").write_bytes(bytes(data))
    skipped = SkipReport()
    docs = [d.text for _, d in read_documents(resolve_sources([str(tmp_path / "a.parquet")]), "text", False, skipped)]
    assert docs == TEXTS[:20]
    assert dict(skipped.counts) == {"unreadable Parquet": 1} and skipped.examples["unreadable Parquet"] == [
        "a.parquet (after row 20)"
    ]


def test_new_formats_are_in_the_fingerprint_and_old_ones_unchanged(tmp_path):
    """A .parquet or .zst file was skipped as binary before it could be read: a dataset prepared then must be
    prepared again now, while datasets of text and JSON Lines keep their fingerprint (and stay up to date)."""
    for name in ("a.txt", "b.jsonl.gz", "c.parquet", "d.jsonl.zst", "e.txt.zst"):
        (tmp_path / name).write_bytes(b"x")
    lines = dict(zip(("a", "b", "c", "d", "e"), fingerprint_inputs(resolve_sources([str(tmp_path)]))))
    for key in ("a", "b"):
        assert lines[key].count("|") == 2, lines[key]  # path|size|mtime, as before
    assert lines["c"].endswith("|parquet") and lines["d"].endswith("|jsonl+zstd") and lines["e"].endswith("|text+zstd")


def test_changing_a_parquet_input_prepares_again(hvdlm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_parquet(src / "a.parquet", {"text": TEXTS[:10]})
    prepare_ok(hvdlm, src, "--out", tmp_path / "ds")
    assert "up to date" in prepare_ok(hvdlm, src, "--out", tmp_path / "ds")
    write_parquet(src / "a.parquet", {"text": TEXTS[10:30]})
    prepare_ok(hvdlm, src, "--out", tmp_path / "ds")
    assert texts_of(tmp_path / "ds") == sorted(TEXTS[10:30])


def test_pyarrow_and_zstandard_are_imported_only_to_read_their_files(tmp_path):
    new = ("pyarrow", "zstandard")
    assert_imports_nothing_heavy("import hvdlm.data.sources", modules=new)
    assert_imports_nothing_heavy(["data", "prepare", "--help"], modules=(*new, "torch", "numpy"))
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "b.txt").write_text("two\n")
    assert_imports_nothing_heavy(["data", "prepare", tmp_path, "--out", tmp_path / "ds"], modules=(*new, "torch"))
    # Each reader imports its own library, and only that one (read in this process: one worker, no pool).
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "three"}\n'))
    argv = ["hvdlm", "data", "prepare", str(tmp_path), "--out", str(tmp_path / "ds2"), "--workers", "1"]
    prepare = (
        f"from hvdlm.cli import main\nsys.argv = {argv!r}\ntry: main()\nexcept SystemExit as e: assert not e.code\n"
    )
    assert_imports_nothing_heavy(prepare + "assert 'zstandard' in sys.modules", modules=("pyarrow",))
