"""`hvdlm data prepare` spread over worker processes and MPI ranks: real files (Parquet written with pyarrow, zstd
with zstandard, JSON Lines, text), real processes and real ranks.

The dataset is the same bytes for --workers 1, --workers 2 and `mpirun -np 2` (byte and BPE tokenizers); a
preparation killed mid-way leaves nothing that looks finished, and its rerun reuses the units it finished and
gives the same bytes; bad input is one clear error, exit 2, nothing left behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import shutil
import signal
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from golden_files import assert_golden
from helpers import REPO, cli_env, demo_sbatch_spec, hvdlm_argv, mpirun, mpirun_argv, run_cli, run_process

from hvdlm.data import open_dataset
from hvdlm.data import progress as progress_module
from hvdlm.data.progress import Progress
from hvdlm.data.sources import SkipReport, read_documents, resolve_sources
from hvdlm.data.units import plan_units
from hvdlm.errors import InputError
from hvdlm.launch.prepare_job import render_prepare

UNIT_MB = "0.004"  # 4 KB work units: the small files below are cut into many, as 64 MB units cut real corpora
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)) + f" (document {i}, ünïcode ✓)"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One directory of every kind of input, a few hundred KB in all."""
    root = tmp_path_factory.mktemp("corpus") / "corpus"
    root.mkdir()
    rows = [text(i, 20 + i % 30) for i in range(240)]
    rows[17] = None  # a row without text: skipped and counted, whichever unit holds it
    pq.write_table(pa.table({"id": list(range(240)), "text": rows}), root / "web.parquet", row_group_size=20)
    records = "".join(json.dumps({"text": text(i, 40)}) + "\n" for i in range(80)).encode()
    (root / "code.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(records))
    lines = [json.dumps({"text": text(i, 10 + i % 50)}) for i in range(600)]
    lines[300] = '{"title": "no text field"}'
    (root / "books.jsonl").write_text("\n".join(lines) + "\n")
    (root / "notes.txt").write_text("\n\n".join(text(i, 60) for i in range(5)))
    return root


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file of a dataset directory, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def prepare_argv(corpus: Path, out: Path, tokenizer: str, *more: str) -> list[str]:
    bpe = ["--vocab-size", "400"] if tokenizer == "bpe" else []
    return hvdlm_argv(
        "data", "prepare", corpus, "--out", out, "--tokenizer", tokenizer, *bpe, "--unit-mb", UNIT_MB, *more
    )


@pytest.fixture(scope="module", params=["byte", "bpe"])
def three_ways(request, corpus, tmp_path_factory) -> dict:
    """The corpus prepared with --workers 1, --workers 2 and on 2 MPI ranks; each run's output and dataset."""
    tokenizer, out = request.param, tmp_path_factory.mktemp(f"ways-{request.param}")
    runs = {
        "workers1": run_process(prepare_argv(corpus, out / "workers1", tokenizer, "--workers", "1"), cli_env()),
        "workers2": run_process(prepare_argv(corpus, out / "workers2", tokenizer, "--workers", "2"), cli_env()),
        "mpirun2": mpirun(2, prepare_argv(corpus, out / "mpirun2", tokenizer, "--workers", "1")),
    }
    for name, r in runs.items():
        assert r.code == 0 and "Traceback" not in r.out, f"{name}:\n{r.out}"
    return {"tokenizer": tokenizer, "out": out, "runs": runs}


def test_the_inputs_are_cut_into_many_units(corpus, tmp_path):
    units = plan_units(resolve_sources([str(corpus)]), unit_bytes=4000)
    by_file = {}
    for unit in units:
        for piece in unit.pieces:
            by_file.setdefault(piece.file.name, []).append(piece)
    assert len(by_file["corpus/books.jsonl"]) > 5 and len(by_file["corpus/web.parquet"]) > 2
    assert len(by_file["corpus/code.jsonl.zst"]) == 1  # a zstd stream cannot be entered in the middle
    # The pieces of a file follow each other: each starts where the one before stopped.
    books = by_file["corpus/books.jsonl"]
    assert [p.start for p in books[1:]] == [p.stop for p in books[:-1]] and books[-1].stop == -1
    # Small whole files share a unit: 40 files of 100 bytes are one unit, not 40.
    for i in range(40):
        (tmp_path / f"{i:02d}.txt").write_text(f"small file {i}".ljust(100, "."))
    (unit,) = plan_units(resolve_sources([str(tmp_path)]), unit_bytes=4000)
    assert len(unit.pieces) == 40 and unit.size == 4000


def test_workers_and_ranks_write_the_same_bytes(three_ways, corpus):
    out, runs = three_ways["out"], three_ways["runs"]
    hashes = {name: digest(out / name) for name in runs}
    assert hashes["workers1"] == hashes["workers2"] == hashes["mpirun2"], hashes
    names = set(hashes["workers1"])
    assert {"meta.json", "train-00000.bin", "val-00000.bin"} <= names
    assert ("tokenizer.json" in names) == (three_ways["tokenizer"] == "bpe")
    assert "2 rank(s) x 1 worker(s)" in runs["mpirun2"].out and "1 rank(s) x 2 worker(s)" in runs["workers2"].out
    # The same bytes, and the right ones: every usable document of the inputs, once.
    expected = sorted(d.text for _, d in read_documents(resolve_sources([str(corpus)]), "text", False, SkipReport()))
    ds = open_dataset(out / "mpirun2")
    assert sorted(ds.tokenizer.decode(ids) for split in (ds.train, ds.val) for ids in split.documents()) == expected
    meta = ds.meta
    assert meta["skipped"] == {"Parquet rows without text (null)": 1, "JSON Lines records without the text field": 1}
    assert meta["splits"]["val"]["documents"] > 0 and meta["splits"]["train"]["documents"] > 0
    # Nothing is left beside the datasets: the units' work directories are gone.
    assert sorted(p.name for p in out.iterdir()) == ["mpirun2", "workers1", "workers2"]


def test_a_killed_preparation_looks_unfinished_and_its_rerun_reuses_the_finished_units(corpus, tmp_path):
    out = tmp_path / "ds"
    argv = prepare_argv(corpus, out, "bpe", "--workers", "1")
    proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished: list[Path] = []
    deadline = time.monotonic() + 120
    while not finished and proc.poll() is None and time.monotonic() < deadline:
        finished = list(tmp_path.glob(".ds.tmp-work-*/u*.json"))
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # really killed: no handler runs, no clean-up
    assert proc.wait() == -signal.SIGKILL, "the preparation ended before it could be killed"
    # Nothing that looks finished: no dataset, no meta.json anywhere, only the hidden work directory.
    assert not out.exists() and not list(tmp_path.rglob("meta.json"))
    with pytest.raises(InputError, match="not a prepared dataset"):
        open_dataset(out)
    (work,) = tmp_path.glob(".ds.tmp-work-*")
    done = sorted(work.glob("u*.json"))
    assert done and (work / "tokenizer.json").is_file()
    # A damaged unit (cut short, as a full disk leaves it) is encoded again, not trusted.
    damaged = done[0].with_name(done[0].name.replace(".json", ".train.bin"))
    damaged.write_bytes(damaged.read_bytes()[:-2])
    stale = tmp_path / ".ds.tmp-work-0123456789abcdef"  # left by an interrupted preparation of other inputs
    stale.mkdir()
    (stale / "u000000.json").write_text("{}")
    # Staging copies of the dataset: one of a process killed during its assembly (gone), one of a live preparer
    # (this test's own pid) and one of another host, which a rerun cannot judge.
    host, dead = socket.gethostname(), _a_finished_pid()
    staged = {
        name: tmp_path / f".ds.tmp-stage-{name}-abc123"
        for name in (f"{host}-{dead}", f"{host}-{os.getpid()}", "elsewhere.example-123")
    }
    for path in staged.values():
        path.mkdir()
        (path / "shard.bin").write_bytes(b"0" * 64)
    rerun = run_process(argv, cli_env())
    assert rerun.code == 0, rerun.out
    assert "reusing the BPE tokenizer" in rerun.out
    if len(done) > 1:
        assert f"resuming: {len(done) - 1} unit(s)" in rerun.out, rerun.out
    # The same bytes as a preparation that was never interrupted.
    reference = run_process(prepare_argv(corpus, tmp_path / "reference", "bpe", "--workers", "2"), cli_env())
    assert reference.code == 0, reference.out
    assert digest(out) == digest(tmp_path / "reference")
    assert not staged[f"{host}-{dead}"].exists(), "the killed assembly's staging copy was not removed"
    assert staged[f"{host}-{os.getpid()}"].is_dir() and staged["elsewhere.example-123"].is_dir()
    for path in staged.values():
        shutil.rmtree(path, ignore_errors=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "reference"]


def test_workers_zero_is_refused(corpus, tmp_path):
    r = run_process(prepare_argv(corpus, tmp_path / "ds", "byte", "--workers", "0"), cli_env())
    assert r.code == 2 and r.out.startswith("Error: --workers must be 1 or more") and "Traceback" not in r.out, r.out
    assert list(tmp_path.iterdir()) == []


def test_ranks_that_see_different_inputs_are_refused(corpus, tmp_path):
    """Two ranks of one MPI job (mpirun's MPMD form), the second naming one more source."""
    (tmp_path / "extra.txt").write_text("a file only rank 1 lists\n" * 40)
    first = prepare_argv(corpus, tmp_path / "ds", "byte", "--workers", "1")
    second = prepare_argv(corpus, tmp_path / "ds", "byte", "--workers", "1") + [str(tmp_path / "extra.txt")]
    argv, env = mpirun_argv(1, first)
    argv += [":", "-np", "1", *second]
    r = run_process(argv, cli_env(base=env), timeout=120)
    assert r.code == 2 and "Traceback" not in r.out, r.out
    assert "the ranks of this preparation see different inputs: rank(s) 1" in r.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.txt"]


def test_strict_bad_input_stops_every_worker_and_names_the_first_bad_file(corpus, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c", "d"):
        (src / f"{name}.jsonl").write_text("".join(json.dumps({"text": text(i, 30)}) + "\n" for i in range(50)))
    with open(src / "b.jsonl", "a") as f:
        f.write("not json\n")
    (src / "d.jsonl").write_text("{broken\n")
    r = run_process(
        hvdlm_argv(
            "data", "prepare", src, "--out", tmp_path / "ds", "--strict", "--workers", "2", "--unit-mb", "0.002"
        ),
        cli_env(),
    )
    assert r.code == 2 and "Traceback" not in r.out, r.out
    assert r.out.startswith("Error: input 'src/b.jsonl:51' was rejected"), r.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dataset, no work directory


def test_a_terminal_shows_a_bar(corpus, tmp_path):
    main, child = pty.openpty()
    # A terminal of 24 rows and 100 columns (a fresh pty has 0 x 0, where tqdm hides its bars as off-screen).
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    argv = prepare_argv(corpus, tmp_path / "ds", "byte", "--workers", "2")
    proc = subprocess.run(argv, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=child, timeout=120, text=True)
    os.close(child)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal's other side is closed: everything was read
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert proc.returncode == 0, proc.stdout
    bar = shown.decode(errors="replace")
    assert "encode" in bar and "100%" in bar and "B/s" in bar and "units" in bar, bar


def test_a_log_gets_plain_lines(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    lines: list[str] = []
    progress = Progress(3_000_000, 3, bar=False, log=lines.append)
    for _ in range(3):
        progress.advance(1_000_000)
    progress.close()
    assert len(lines) == 4 and "\r" not in "".join(lines)
    assert lines[0].startswith("  encode: 1/3 units, 1.0MB of 3.0MB (33%), ") and "B/s, about" in lines[0]
    assert lines[-1].startswith("  encode: 3/3 units, 3.0MB of 3.0MB (100%)") and lines[-1].endswith("about 0 s left")


# ------------------------------------------------------------------------------------------------------------
# hvdlm sbatch --prepare
# ------------------------------------------------------------------------------------------------------------

PREPARE_ARGS = ["/shared/corpus", "--out", "/shared/data/web", "--tokenizer", "bpe", "--vocab-size", "32000"]


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sbatch_prepare_scripts(launcher):
    spec = demo_sbatch_spec(
        job_name="demo-prepare",
        nodes=4,
        ntasks_per_node=1,
        cpus_per_task=32,
        launcher=launcher,
        venv="/shared/venv",
        modules=["openmpi/4.1.5"],
        command="hvdlm sbatch jobs/demo.toml --prepare '...' --nodes 4 --ntasks-per-node 1 --cpus-per-task 32",
        script="prepare.sbatch",
    )
    script = render_prepare(spec, PREPARE_ARGS)
    assert_golden(f"sbatch-prepare-{launcher}.sh", script)
    assert "--signal" not in script and '--workers "${SLURM_CPUS_PER_TASK}"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # --workers given in ARGS is kept as it is.
    assert "--workers 8" in render_prepare(spec, [*PREPARE_ARGS, "--workers", "8"])
    with pytest.raises(InputError):
        render_prepare(spec, ["/shared/corpus;rm -rf /", "--out", "x"])


def test_sbatch_prepare_from_the_command_line(tmp_path):
    job = tmp_path / "web.toml"
    job.write_text('[data]\ndataset = "/shared/data/web"\n[slurm]\nnodes = 2\ncpus_per_task = 16\n')
    args = ["sbatch", job, "--prepare", "/shared/corpus --tokenizer bpe", "--ntasks-per-node", "1"]
    args += ["--venv", "/shared/venv"]
    r = run_cli(*args, timeout=60, split=True)
    assert r.code == 0, r.err
    assert_golden("sbatch-prepare-cli.sh", r.out.replace(str(tmp_path), "$TMP"))
    for bad, why in [
        (["--prepare", "/shared/corpus --workers 0"], "--workers must be 1 or more"),
        (["--prepare", "/shared/corpus --no-such-option"], "would refuse these arguments"),
        (["--prepare", "/shared/corpus", "--launcher", "horovodrun"], "a preparation runs under srun or mpirun"),
    ]:
        r = run_cli("sbatch", job, *bad, timeout=60, split=True)
        assert r.code == 2 and why in r.err and "Traceback" not in r.err, r.err
    job.write_text("[slurm]\nnodes = 1\n")
    r = run_cli("sbatch", job, "--prepare", "/shared/corpus", timeout=60, split=True)
    assert r.code == 2 and "names no --out" in r.err, r.err


def _a_finished_pid() -> int:
    """The pid of a process that has ended (and been reaped): no process has it now, unless reused since."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
