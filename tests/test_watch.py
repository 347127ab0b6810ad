"""Watching a run: MFU arithmetic, RunLogger (metrics.jsonl, TensorBoard, resume), `hvdlm plot`, `hvdlm generate`.

One tiny real run (single process, no launcher) is trained once per module; the CLI commands run in this process
through click's runner (torch and matplotlib load once), and in a subprocess where the real exit code and the
import cost matter.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_imports_nothing_heavy, metrics, run_cli

from hvdlm.cli import main
from hvdlm.training.flops import flops_per_token, gpu_peak_tflops, memory_mb, mfu, peak_tflops
from hvdlm.training.metrics import RunLogger, scalars_of, truncate_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------------
# flops
# ------------------------------------------------------------------------------------------------------------


def test_flops_per_token_is_6n_plus_12ltd():
    assert flops_per_token(100, 2, 8, 4) == 600 + 12 * 2 * 8 * 4  # 1368
    # GPT-2 small shape (nanoGPT's estimate_mfu): N = 124M, L 12, T 1024, d 768 -> 6N + 113M
    assert flops_per_token(124_000_000, 12, 1024, 768) == 744_000_000 + 113_246_208


def test_gpu_peaks_by_name_and_precision():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4  # SXM, dense
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert gpu_peak_tflops("NVIDIA H100 NVL", "fp16") == 835.0
    assert gpu_peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5  # TF32 not allowed: plain FP32
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0
    assert gpu_peak_tflops("NVIDIA A10", "bf16") == 125.0  # not the A100
    assert gpu_peak_tflops("NVIDIA L4", "bf16") == 121.0 and gpu_peak_tflops("NVIDIA L40S", "bf16") == 362.1
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB", "fp16") == 125.0
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB", "bf16") == 15.7  # no bf16 tensor cores: the FP32 rate
    assert gpu_peak_tflops("NVIDIA GeForce RTX 4090", "bf16") == 165.2
    assert gpu_peak_tflops("NVIDIA GeForce GTX 1080", "bf16") is None


def test_peak_tflops_configured_wins_and_cpu_has_none():
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, "bf16", 0.0) is None
    assert peak_tflops(cpu, "fp32", 2.5) == 2.5


def test_mfu():
    # 1000 tokens/s x 1e9 FLOPs = 1 TFLOP/s over 2 devices of 1 TFLOP/s peak each
    assert mfu(1000, 1e9, 1.0, 2) == pytest.approx(0.5)
    assert mfu(1000, 1e9, None, 2) is None
    assert mfu(1000, 1e9, 0.0, 1) is None


def test_memory_mb_on_cpu_is_the_peak_resident_set():
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    got = memory_mb(torch.device("cpu"))
    assert got == pytest.approx(hwm_kib / 1024, rel=0.05)  # Linux ru_maxrss is KiB: the same high-water mark
    assert 10 < got < 1_000_000


# ------------------------------------------------------------------------------------------------------------
# RunLogger
# ------------------------------------------------------------------------------------------------------------


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    return {tag: events for tag, events in scalars.items() if events}  # a purge leaves tags without events


def _train_row(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "tokens": 64 * step, "tokens_per_s": 100.0, "mfu": None}


def test_logger_writes_jsonl_rows_and_tensorboard_scalars(tmp_path):
    log = RunLogger(tmp_path, 10, enabled=True, tensorboard=True)
    log.record({"step": 0, "tokens": 0, "val_loss": 2.0, "val_ppl": math.exp(2.0)})
    for step in (1, 2):
        log.record(_train_row(step, 3.0 - step))
    log.record({"step": 3, "skipped": "non-finite loss"})
    log.close()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all("time" in r for r in rows)
    assert rows[1]["mfu"] is None
    tb = _scalars(tmp_path)
    assert tb["train/loss"] == {1: 2.0, 2: 1.0}
    assert tb["train/tokens_per_s"] == {1: 100.0, 2: 100.0}
    assert tb["val/loss"] == {0: 2.0} and tb["val/ppl"][0] == pytest.approx(math.exp(2.0))
    assert "train/mfu" not in tb  # null: no known peak
    assert tb["train/skipped"] == {3: 1.0}


def test_scalar_tags():
    assert scalars_of({"step": 5, "loss": 1.5, "mfu": 0.3, "time": 1.0}) == {"train/loss": 1.5, "train/mfu": 0.3}
    assert scalars_of({"step": 5, "tokens": 9, "val_loss": 1.0, "val_ppl": 2.7}) == {"val/loss": 1.0, "val/ppl": 2.7}
    assert scalars_of({"step": 5, "loss": float("nan"), "grad_norm": float("inf")}) == {}


def test_disabled_logger_writes_nothing(tmp_path):
    log = RunLogger(tmp_path, 10, enabled=False, tensorboard=True, resume_step=3)
    log.info("hidden")
    log.record(_train_row(1, 1.0))
    log.advance()
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_resume_cuts_metrics_and_tensorboard_back_to_the_resume_step(tmp_path):
    log = RunLogger(tmp_path, 6, enabled=True, tensorboard=True)
    for step in range(1, 6):
        log.record(_train_row(step, 10.0 + step))
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the torn last write of a killed process

    log = RunLogger(tmp_path, 6, enabled=True, tensorboard=True, resume_step=3)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    for step in range(4, 7):
        log.record(_train_row(step, 20.0 + step))
    log.close()
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [
        (1, 11.0),
        (2, 12.0),
        (3, 13.0),
        (4, 24.0),
        (5, 25.0),
        (6, 26.0),
    ]
    assert _scalars(tmp_path)["train/loss"] == {1: 11.0, 2: 12.0, 3: 13.0, 4: 24.0, 5: 25.0, 6: 26.0}


def test_resume_from_step_0_starts_over(tmp_path):
    log = RunLogger(tmp_path, 4, enabled=True, tensorboard=True)
    log.record({"step": 0, "val_loss": 5.0})
    log.record(_train_row(1, 4.0))
    log.close()
    log = RunLogger(tmp_path, 4, enabled=True, tensorboard=True, resume_step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    log.record({"step": 0, "val_loss": 6.0})
    log.close()
    assert _scalars(tmp_path) == {"val/loss": {0: 6.0}}


def test_resume_keeps_lines_it_cannot_read_and_creates_a_missing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 9, "loss": 9.0}\n')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\nnot json\n'
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    RunLogger(fresh, 4, enabled=True, resume_step=5).close()
    assert (fresh / "metrics.jsonl").read_text() == ""


def test_cheap_imports():
    """Job preparation must stay instant: the CLI and metrics load neither torch, tensorboard nor matplotlib."""
    assert_imports_nothing_heavy(
        "import hvdlm.cli, hvdlm.training.metrics, hvdlm.watch.plot, hvdlm.watch.generate, hvdlm.training.flops",
        modules=("torch", "tensorboard", "matplotlib", "horovod"),
    )


# ------------------------------------------------------------------------------------------------------------
# A tiny real run, and the commands on it
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, job, cache_dir) -> Path:
    """A real 8-step run (one process, no launcher) with checkpoints at steps 4 and 8, EMA and TensorBoard."""
    run_dir = tmp_path_factory.mktemp("watch") / "tiny-run"
    r = run_cli("train", job, "--run-dir", run_dir, *RUN_SETTINGS, cache=cache_dir, split=True)
    assert r.code == 0, r.out + r.err
    return run_dir


RUN_SETTINGS = [
    "--set",
    "train.checkpoint_interval=4",
    "--set",
    "train.sample_tokens=0",
    "--set",
    "train.ema_decay=0.9",
    "--set",
    "train.tensorboard=true",
]


def test_a_real_run_logs_tokens_mfu_memory_and_tensorboard(run):
    rows = metrics(run)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["tokens"] for r in train] == [4 * 32 * step for step in range(1, 9)]  # batch 4 x seq_len 32
    assert all(r["mfu"] is None and r["memory_mb"] > 0 for r in train)  # CPU: no known peak
    tb = _scalars(run)
    assert tb["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in train})
    assert sorted(tb["val/loss"]) == [0, 4, 8]


def test_a_resumed_run_rewrites_the_rows_after_its_checkpoint(run, tiny_job, cache_dir, tmp_path):
    """Resume from step 4 of a finished run: rows 5..8 are dropped and trained again, none twice."""
    copy = _copy_run(run, tmp_path / "resumed")
    (copy / "checkpoints" / "step-0000008.pt").unlink()
    before = metrics(copy)
    r = run_cli("train", tiny_job, "--run-dir", copy, "--resume", "auto", *RUN_SETTINGS, cache=cache_dir, split=True)
    assert r.code == 0, r.out + r.err
    after = metrics(copy)
    assert [(r["step"], "loss" in r) for r in after] == [(r["step"], "loss" in r) for r in before]
    assert [r.get("loss") for r in after] == pytest.approx([r.get("loss") for r in before])
    tb = _scalars(copy)
    assert tb["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in after if "loss" in r})


@pytest.fixture
def cli(cache_dir, monkeypatch):
    """`hvdlm ARGS` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setenv("HVDLM_CACHE", str(cache_dir))

    def invoke(*args: str):
        result = CliRunner().invoke(main, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return invoke


def _synthetic_run(path: Path, n: int = 6) -> Path:
    """A run directory as the resilient trainer writes it (rows carry tokens and mfu)."""
    path.mkdir(parents=True)
    rows = [{"step": 0, "tokens": 0, "val_loss": 5.5, "val_ppl": math.exp(5.5)}]
    for step in range(1, n + 1):
        rows.append({**_train_row(step, 5.5 - 0.1 * step), "tokens_per_s": 1000.0 + step, "mfu": 0.01})
    rows.append({"step": n, "tokens": 64 * n, "val_loss": 5.0, "val_ppl": math.exp(5.0)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path  # a chart with axes and lines, not a stub


def test_plot_compares_two_runs(cli, run, tmp_path):
    other = _synthetic_run(tmp_path / "other")
    code, out, err = cli("plot", run, other)
    assert code == 0, out + err
    written = [Path(line) for line in out.split()]
    assert [p.name for p in written] == ["loss.png", "loss_tokens.png", "throughput.png"]
    assert all(p.parent == run / "plots" for p in written)
    for p in written:
        _check_png(p)
    code, out, err = cli("plot", other, "-o", tmp_path / "charts")
    assert code == 0, out + err
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == ["loss.png", "loss_tokens.png", "throughput.png"]


def test_plot_skips_a_torn_last_line(cli, tmp_path):
    run = _synthetic_run(tmp_path / "live")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    code, out, err = cli("plot", run)
    assert code == 0, out + err


@pytest.mark.parametrize("problem", ["no metrics", "no training rows", "bad line"])
def test_plot_refuses_bad_input_and_writes_nothing(cli, tmp_path, problem):
    good = _synthetic_run(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    if problem == "no training rows":
        (bad / "metrics.jsonl").write_text('{"step": 0, "val_loss": 5.0}\n')
        message = "has no training rows"
    elif problem == "bad line":
        (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n{"step": 3, "loss": 1.0}\n')
        message = "line 2, is not a metrics row"
    else:
        message = "has no metrics.jsonl"
    code, out, err = cli("plot", good, bad, "-o", tmp_path / "charts")
    assert code == 2
    assert err.startswith("Error: ") and message in err and str(bad) in err
    assert not (tmp_path / "charts").exists() and not (good / "plots").exists()


def test_generate_in_a_plain_process(cache_dir, run):
    """No launcher, no MPI: the real command, its stdout the text alone, starting with the prompt."""
    prompt = ("--prompt", "def main(", "--max-tokens", "40", "--seed", "3")
    r = run_cli("generate", run, *prompt, cache=cache_dir, timeout=120, split=True)
    assert r.code == 0, r.out + r.err
    assert r.out.startswith("def main(") and len(r.out) > len("def main(") + 10
    assert "step-0000008.pt" in r.err  # the newest checkpoint


def test_generate_same_seed_same_text(cli, run):
    texts = [cli("generate", run, "--prompt", "import ", "--max-tokens", "30", "--seed", s)[1] for s in (1, 1, 2)]
    assert texts[0].startswith("import ")
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_generate_from_an_older_checkpoint_and_a_long_prompt(cli, run):
    code, out, err = cli(
        "generate",
        run,
        "--prompt",
        "x" * 100,
        "--max-tokens",
        "5",
        "--checkpoint",
        run / "checkpoints" / "step-0000004.pt",
    )
    assert code == 0, out + err
    assert out.startswith("x" * 100)
    assert "longer than the model's context of 32" in err and "step 4" in err


def test_generate_passes_over_a_damaged_newest_checkpoint(cli, run, tmp_path):
    copy = _copy_run(run, tmp_path / "damaged")
    newest = copy / "checkpoints" / "step-0000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    code, out, err = cli("generate", copy, "--prompt", "x", "--max-tokens", "3")
    assert code == 0, out + err
    assert "WARNING: skipping checkpoint step 8" in err and "step-0000004.pt" in err
    (copy / "checkpoints" / "step-0000004.pt").write_bytes(b"junk")
    code, out, err = cli("generate", copy, "--prompt", "x")
    assert code == 2 and "none of the checkpoints" in err


def _copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run to edit: its checkpoint manifests dropped, so an edited checkpoint reads as one written
    before checksums (a manifest would refuse it, hvdlm.checkpoint.manifest)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "plots", ignore_errors=True)
    for manifest in (dest / "checkpoints").glob("*.manifest.json"):
        manifest.unlink()
    return dest


def test_generate_from_a_tp_sharded_checkpoint_matches_the_unsharded_one(cli, run, tmp_path):
    """Shard the run's checkpoint as a TP=2 job saves it; generation merges it back and samples the same text."""
    from hvdlm.checkpoint.format import save_checkpoint, sharding_of
    from hvdlm.checkpoint.reshard import load_full_state, load_model
    from hvdlm.checkpoint.store import checkpoint_path
    from hvdlm.config import ModelConfig
    from hvdlm.model import GPT
    from hvdlm.parallel.topology import Group

    full = load_full_state(run / "checkpoints" / "step-0000008.pt")
    sharded = tmp_path / "tp2"
    for rank in range(2):
        model = GPT(ModelConfig(**full["config"]["model"]), Group(size=2, rank=rank))
        load_model(model, full, "test", rank, 2)
        state = {
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "step": 8,
            "config": full["config"],
            "tp": {"rank": rank, "size": 2, "sharding": sharding_of(model), "param_names": []},
        }
        save_checkpoint(checkpoint_path(sharded, 8, rank, 2), state)
    args = ("--prompt", "class ", "--max-tokens", "30", "--seed", "5")
    code, out, err = cli("generate", sharded, *args)
    assert code == 0, out + err
    assert "step-0000008.tp0-of-2.pt" in err
    assert out == cli("generate", run, *args)[1]
    assert cli("generate", sharded, *args, "--ema")[1] == out  # the EMA shards merge like the model's


def test_generate_with_ema_weights(cli, run, tmp_path):
    args = ("--prompt", "for ", "--max-tokens", "40")
    code, out, err = cli("generate", run, *args, "--ema")
    assert code == 0, out + err
    assert out.startswith("for ") and "ema weights of step 8" in err
    assert out != cli("generate", run, *args)[1]  # the average of the weights is another model

    from hvdlm.checkpoint.format import load_checkpoint, save_checkpoint

    copy = _copy_run(run, tmp_path / "no-ema")
    path = copy / "checkpoints" / "step-0000008.pt"
    state = load_checkpoint(path)
    del state["ema"]
    save_checkpoint(path, state)
    code, out, err = cli("generate", copy, *args, "--ema")
    assert code == 2 and "holds no EMA weights" in err and out == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "x", "--max-tokens", "0"], "--max-tokens 0"),
        (["--prompt", "x", "--temperature", "0"], "--temperature 0.0: it must be > 0"),
        (["--prompt", "x", "--top-k", "0"], "--top-k 0"),
        (["--prompt", "x", "--checkpoint", "nowhere/step-0000001.pt"], "no checkpoint at"),
    ],
)
def test_generate_refuses_bad_input(cli, run, args, message):
    code, out, err = cli("generate", run, *args)
    assert code == 2 and err.startswith("Error: ") and message in err, err
    assert out == ""


def test_generate_refuses_a_run_without_checkpoints_and_a_missing_dataset(cli, run, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    code, _, err = cli("generate", empty, "--prompt", "x")
    assert code == 2 and "holds no complete checkpoint" in err
    code, _, err = cli("generate", tmp_path / "missing", "--prompt", "x")
    assert code == 2 and "does not exist" in err
    (tmp_path / "a-file").write_text("not a run")
    code, _, err = cli("generate", tmp_path / "a-file", "--prompt", "x")
    assert code == 2 and "is a file, not a directory" in err and "--checkpoint" in err

    from hvdlm.checkpoint.format import load_checkpoint, save_checkpoint

    copy = _copy_run(run, tmp_path / "moved-data")
    path = copy / "checkpoints" / "step-0000008.pt"
    state = load_checkpoint(path)
    state["config"]["data"]["dataset"] = str(tmp_path / "gone")
    save_checkpoint(path, state)
    code, _, err = cli("generate", copy, "--prompt", "x")
    assert code == 2 and "is not there" in err and "hvdlm data prepare" in err
