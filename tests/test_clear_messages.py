"""Messages that name the right problem, settings that are not silently ignored, and counts that read well:
`hvdlm plot` of a missing directory, the dataset advice a user can follow, --vocab-size with the byte tokenizer,
data.tokenizer beside a dataset of other tokens, and units.format_count."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hvdlm.config import DataConfig
from hvdlm.data.corpus import ensure_dataset
from hvdlm.data.meta import load_meta, tokenizer_setting_note
from hvdlm.data.prepare import PrepareOptions, prepare
from hvdlm.errors import InputError
from hvdlm.units import format_count


def _texts(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"notes{i}.txt").write_text(f"note number {i}: some words to learn from, again and again.\n" * 40)
    return folder


def test_plot_of_a_missing_directory_says_it_does_not_exist(hvdlm, tmp_path):
    r = hvdlm("plot", str(tmp_path / "no-such-run"))
    assert r.code == 2 and "Traceback" not in r.out
    assert f"run directory '{tmp_path / 'no-such-run'}' does not exist" in r.out and "metrics.jsonl" not in r.out
    (tmp_path / "afile").write_text("x")
    r = hvdlm("plot", str(tmp_path / "afile"))
    assert r.code == 2 and "is a file, not a run directory" in r.out


def _advised_command(message: str) -> list[str]:
    """The `hvdlm data prepare ...` command an error message advises, as argv."""
    command = re.search(r"`(hvdlm data prepare [^`]*)`", message)
    assert command, message
    return shlex.split(command[1])


@pytest.mark.parametrize("how", ["ensure_dataset", "load_meta"])
def test_the_dataset_advice_for_a_text_folder_is_a_command_prepare_accepts(hvdlm, tmp_path, how):
    """data.dataset naming the user's own text folder: the advice prepares it into a new directory beside it."""
    folder = _texts(tmp_path / "my texts")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(InputError) as e:
        ensure_dataset(DataConfig(dataset=str(folder))) if how == "ensure_dataset" else load_meta(folder)
    argv = _advised_command(str(e.value))
    assert argv[:3] == ["hvdlm", "data", "prepare"] and "--out" in argv
    target = Path(argv[argv.index("--out") + 1])
    assert target == tmp_path / "my texts-dataset" and f'data.dataset = "{target}"' in str(e.value)
    r = hvdlm(*argv[1:])  # exactly what the message says to run
    assert r.code == 0, r.out
    assert load_meta(target)["splits"]["train"]["documents"] > 0
    assert sorted(p.name for p in folder.iterdir()) == before  # the user's folder is untouched


def test_the_dataset_advice_for_a_missing_directory_names_it_as_the_output(tmp_path):
    with pytest.raises(InputError) as e:
        ensure_dataset(DataConfig(dataset=str(tmp_path / "new-ds")))
    assert _advised_command(str(e.value))[-2:] == ["--out", str(tmp_path / "new-ds")]


def test_vocab_size_with_the_byte_tokenizer_is_refused_only_when_given(hvdlm, tmp_path):
    src = _texts(tmp_path / "src", 2)
    r = hvdlm("data", "prepare", str(src), "--out", str(tmp_path / "ds"), "--vocab-size", "1000")
    assert r.code == 2 and "Traceback" not in r.out
    assert "--vocab-size 1000 applies to the BPE tokenizer only" in r.out and "--tokenizer bpe" in r.out
    assert not (tmp_path / "ds").exists()
    r = hvdlm("data", "prepare", str(src), "--out", str(tmp_path / "ds"), "--tokenizer", "byte")
    assert r.code == 0, r.out  # the default --vocab-size is not in the way


def test_a_note_when_data_tokenizer_differs_from_the_datasets(tmp_path):
    src = _texts(tmp_path / "src", 8)
    out = tmp_path / "bpe-ds"
    prepare([str(src)], out, PrepareOptions(tokenizer="bpe", vocab_size=300), log=lambda m: None)
    meta = load_meta(out)
    note = tokenizer_setting_note(DataConfig(dataset=str(out), tokenizer="byte"), meta)
    assert note.startswith("note: ") and "bpe" in note and f"'{out}'" in note and 'data.tokenizer = "byte"' in note
    assert tokenizer_setting_note(DataConfig(dataset=str(out), tokenizer="bpe"), meta) is None
    assert tokenizer_setting_note(DataConfig(tokenizer="byte"), meta) is None  # the built-in corpus: it applies


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0"),
        (7, "7"),
        (1234, "1,234"),
        (9999, "9,999"),
        (10_000, "10.0K"),
        (56_789, "56.8K"),
        (999_960, "1.0M"),
        (1_234_567, "1.2M"),
        (123_456_789, "123M"),
        (3_400_000_000, "3.4B"),
        (608.87, "609"),
    ],
)
def test_format_count(n, text):
    assert format_count(n) == text
