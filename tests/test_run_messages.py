"""What a run says at its edges: the end-of-run sample's prompt, a start from another run's weights, and a
`--resume auto` of a run that is already complete. One short run serves every test."""

from __future__ import annotations

import pytest
from helpers import sets, train_once


@pytest.fixture(scope="module")
def finished(tmp_path_factory, job, cache_dir):
    """A finished 8-step run, trained once for the module (with the default prompt: a new document)."""
    r = train_once(job, tmp_path_factory.mktemp("finished") / "run", cache=cache_dir)
    return r.run_dir, r.out


def test_the_default_sample_starts_a_new_document(finished):
    _, out = finished
    sample = out.split("sample:\n", 1)[1].split("\ncheckpoint: ", 1)[0]
    assert sample and not sample.startswith("def ")  # the old fixed prompt suited Python sources only


def test_resume_auto_of_a_complete_run_says_so_and_changes_nothing(hvdlm, job, finished):
    run_dir, _ = finished
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    r = hvdlm("train", str(job), "--run-dir", str(run_dir), "--resume", "auto")
    assert r.code == 0, r.out[-3000:]
    assert f"the run in {run_dir} is complete: its checkpoint is at step 8 of train.max_steps = 8" in r.out
    assert "validation loss:" not in r.out and "sample:" not in r.out  # no second summary
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_init_from_says_where_the_weights_came_from_and_a_prompt_is_continued(hvdlm, job, finished, tmp_path):
    run_dir, _ = finished
    prompt = sets("train.max_steps=2", 'train.sample_prompt="import "')
    r = hvdlm("train", str(job), "--run-dir", str(tmp_path / "ft"), "--init-from", str(run_dir), *prompt)
    assert r.code == 0, r.out[-3000:]
    assert f"initialised from {run_dir}/checkpoints/step-0000008.pt (its weights at step 8)" in r.out
    assert "sample:\nimport " in r.out
