"""Training on a blend of datasets ([[data.blend]]) on real ranks: per-dataset validation in metrics.jsonl, the exact
data position across a resume on the same and on another number of ranks, and the refusals before anything starts.

Two tiny byte-level datasets prepared here (the standard library's email package, and hvdlm's own sources), a third
in BPE tokens for the tokenizer refusal; the tiny model of helpers.TINY_JOB. One 2-rank reference run serves every
training check.
"""

from __future__ import annotations

import email
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, sets, train_argv
from survive import comparable, rows, run

from hvdlm.config import load_config
from hvdlm.data.blend import PERIOD, check_blend
from hvdlm.data.prepare import PrepareOptions, prepare
from hvdlm.errors import InputError

pytestmark = pytest.mark.distributed

STEPS = 8
COMMON = (
    f"train.max_steps={STEPS}",
    "train.checkpoint_interval=4",
    "train.eval_interval=4",
    "train.sample_tokens=0",
    "train.tensorboard=false",
)
SHARES = {"web": 45875, "code": 19661}  # 0.7 and 0.3 of each PERIOD (hvdlm.data.blend.apportion)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blend-data")
    quiet = dict(log=lambda message: None)
    prepare([str(Path(email.__file__).parent)], root / "web", PrepareOptions(), globs=["*.py"], **quiet)
    prepare([str(REPO / "hvdlm")], root / "code", PrepareOptions(), globs=["**/*.py"], **quiet)
    bpe = PrepareOptions(tokenizer="bpe", vocab_size=300)
    prepare([str(REPO / "hvdlm" / "data")], root / "bpe", bpe, globs=["*.py"], **quiet)
    prepare([str(REPO / "hvdlm" / "launch")], root / "bpe-other", bpe, globs=["*.py"], **quiet)
    same = PrepareOptions(tokenizer=str(root / "bpe"))  # the first one's tokenizer.json, as the guide says
    prepare([str(REPO / "hvdlm" / "launch")], root / "bpe-same", same, globs=["*.py"], **quiet)
    return {name: root / name for name in ("web", "code", "bpe", "bpe-other", "bpe-same")}


def blend(data: dict[str, Path]) -> str:
    return f"data.blend={data['web']}:0.7,{data['code']}:0.3"


@pytest.fixture(scope="module")
def reference(job, data, tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("blend-ref") / "run"
    r = run(2, train_argv(job, run_dir, *sets(*COMMON, blend(data))), cache_dir)
    assert r.code == 0, r.out[-4000:]
    return run_dir, r.out


def data_state(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{step:07d}.pt", weights_only=True)["data"]


def test_validation_is_reported_per_dataset_and_overall_as_their_weighted_mean(reference):
    run_dir, out = reference
    evaluations = [r for r in rows(run_dir) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 4, 8]
    for r in evaluations:
        web, code = r["val_loss/web"], r["val_loss/code"]
        assert web != code  # two datasets, two losses
        expected = (SHARES["web"] * web + SHARES["code"] * code) / PERIOD
        assert r["val_loss"] == pytest.approx(expected, rel=1e-12)
    assert evaluations[-1]["val_loss/web"] < evaluations[0]["val_loss/web"] - 0.3  # it learned from both
    assert evaluations[-1]["val_loss/code"] < evaluations[0]["val_loss/code"] - 0.3
    line = next(x for x in out.splitlines() if x.startswith("step      8 | val loss"))
    assert f"| web {evaluations[-1]['val_loss/web']:.4f} | code {evaluations[-1]['val_loss/code']:.4f}" in line
    assert "a blend of" in out and "web 70.0%" in out and "code 30.0%" in out
    state = data_state(run_dir, STEPS)
    assert state["samples"] == STEPS * 8 and state["blend"] == ["web", "code"]
    assert state["shares"] == [SHARES["web"], SHARES["code"]]


def resume_from_step_4(reference, tmp_path: Path, cache: Path, job: Path, np: int, *extra: str) -> Path:
    """A copy of the reference run, continued from its step-4 checkpoint on np ranks (the steps after it are
    trained again)."""
    run_dir = shutil.copytree(reference[0], tmp_path / "run")
    checkpoint = run_dir / "checkpoints" / "step-0000004.pt"
    r = run(np, train_argv(job, run_dir, "--resume", checkpoint, *sets(*COMMON, *extra)), cache)
    assert r.code == 0, r.out[-4000:]
    assert "resumed from" in r.out
    return run_dir


def test_a_resume_on_the_same_ranks_is_bit_identical(reference, data, job, tmp_path, cache_dir):
    run_dir = resume_from_step_4(reference, tmp_path, cache_dir, job, 2, blend(data))
    assert comparable(run_dir) == comparable(reference[0])
    assert data_state(run_dir, STEPS) == data_state(reference[0], STEPS)


def test_a_resume_on_other_ranks_takes_exactly_the_next_sequences(reference, data, job, tmp_path, cache_dir):
    """1 rank with batch 8 continues the 2-rank run of batch 4 (the same global batch): the same sequences, so the
    same losses but for the rounding of another reduction order (other data would differ by ~1e-2)."""
    run_dir = resume_from_step_4(reference, tmp_path, cache_dir, job, 1, blend(data), "train.batch_size=8")
    ref, got = rows(reference[0]), rows(run_dir)
    assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in ref]
    for a, b in zip(got, ref):
        for key in ("loss", "val_loss", "val_loss/web", "val_loss/code"):
            assert (key in a) == (key in b), (a["step"], key)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert data_state(run_dir, STEPS) == data_state(reference[0], STEPS)


# --- bad input ----------------------------------------------------------------------------------------------


def test_datasets_share_a_tokenizer_by_its_content_not_its_name(data):
    """A BPE dataset prepared with --tokenizer naming the first one's directory blends with it; one of the same
    size trained on other text does not, though meta.json describes both alike."""
    parts = check_blend(load_config(None, [f"data.blend={data['bpe']}:1,{data['bpe-same']}:1"]).data, 32)
    assert [p.name for p in parts] == ["bpe", "bpe-same"]
    other = load_config(None, [f"data.blend={data['bpe']}:1,{data['bpe-other']}:1"]).data
    with pytest.raises(InputError, match="have tokenizers of the same size whose tokenizer.json differ"):
        check_blend(other, 32)
    short = load_config(None, [blend(data)]).data
    with pytest.raises(InputError, match=r"entry 1 \('web'\): the train split of .* has no shard of 1,000,001"):
        check_blend(short, 1_000_000)


def refusals(data: dict[str, Path], tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Overrides and the message each must end with."""
    missing = tmp_path / "nowhere" / "books"
    return {
        "weight": ([f"data.blend={data['web']}:0.7,{data['code']}:0"], "has weight 0.0: a weight must be a positive"),
        "missing": (
            [f"data.blend={data['web']}:0.7,{missing}:0.3"],
            f"data.blend entry 2 ('books'): dataset '{missing}' does not exist",
        ),
        "tokenizer": (
            [f"data.blend={data['web']}:0.5,{data['bpe']}:0.5"],
            "data.blend mixes tokenizers: 'web' (",
        ),
        "both": (
            [blend(data), f"data.dataset={data['web']}"],
            "and [[data.blend]] both name the training data",
        ),
    }


def assert_refused(r, message: str, run_dir: Path) -> None:
    assert r.code == 2, r.out[-3000:]
    assert message in " ".join(r.out.split()), r.out[-3000:]
    assert "Traceback" not in r.out
    assert not run_dir.exists()  # nothing written


@pytest.mark.parametrize("case", ["weight", "missing", "tokenizer", "both"])
def test_launch_refuses_a_bad_blend_before_it_starts_anything(case, data, job, tmp_path):
    overrides, message = refusals(data, tmp_path)[case]
    run_dir = tmp_path / "run"
    r = run_cli("launch", job, "--np", "2", "--dry-run", "--run-dir", run_dir, *sets(*overrides))
    assert_refused(r, message, run_dir)
    assert "mpirun" not in r.out  # refused before the command line was even printed


def test_a_rank_refuses_a_bad_blend_before_it_writes_anything(data, job, tmp_path, cache_dir):
    """Started without `hvdlm launch` (mpirun, srun), the ranks check the blend themselves (the same checks)."""
    overrides, message = refusals(data, tmp_path)["missing"]
    run_dir = tmp_path / "run"
    r = run_cli("train", job, "--run-dir", run_dir, *sets(*overrides), cache=cache_dir)
    assert_refused(r, message, run_dir)


def test_the_metrics_rows_are_json_with_every_dataset_named(reference):
    """metrics.jsonl stays one JSON object per line; `hvdlm runs` reads the blended run's overall val_loss."""
    run_dir, _ = reference
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    r = run_cli("runs", run_dir.parent)
    assert r.code == 0 and f"{rows(run_dir)[-1]['val_loss']:.4f}" in r.out, r.out
