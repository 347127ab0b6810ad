"""The llama job files: each is accepted by `hvdlm config`, `hvdlm plan` and `hvdlm sbatch` (the real CLI), the
cluster-sized ones hold the layout `hvdlm plan` ranks first, and the plan counts their parameters exactly."""

from __future__ import annotations

import json

import pytest
import tomllib
from helpers import REPO, run_cli

JOBS = {  # job file: (the plan's cluster flags, its parameters)
    "llama-demo": (["--gpu", "h100", "--nodes", "1", "--gpus-per-node", "2"], 853_120),  # jobs/demo.toml: 842,496
    "llama-1b": (["--gpu", "h100", "--nodes", "1", "--gpus-per-node", "8"], 1_235_814_400),  # Llama 3.2 1B
    "llama3-8b": (["--gpu", "h100", "--nodes", "4", "--gpus-per-node", "8"], 8_030_261_248),  # Llama 3 8B
}


@pytest.mark.parametrize("name", list(JOBS))
def test_the_job_is_accepted_and_planned(name, tmp_path):
    job = REPO / "jobs" / f"{name}.toml"
    config = run_cli("config", job, timeout=60)
    assert config.code == 0, config.out
    resolved = tomllib.loads(config.out)
    assert resolved["model"]["arch"] == "llama" and resolved["model"]["bias"] is False
    flags, parameters = JOBS[name]
    plan = run_cli("plan", job, *flags, "--json", timeout=60, split=True)  # notes go to stderr
    assert plan.code == 0, plan.out
    best = json.loads(plan.out)
    assert best["parameters"] == parameters and best["fits"]
    script = run_cli("sbatch", job, "-o", tmp_path / "job.sh", timeout=60)
    assert script.code == 0, script.out
    assert f"hvdlm train {job}" in (tmp_path / "job.sh").read_text()


@pytest.mark.parametrize("name", ["llama-1b", "llama3-8b"])
def test_the_cluster_jobs_hold_the_layout_the_plan_ranks_first(name):
    job = REPO / "jobs" / f"{name}.toml"
    cfg = tomllib.loads(job.read_text())
    best = json.loads(run_cli("plan", job, *JOBS[name][0], "--json", timeout=60, split=True).out)["layout"]
    p, t = cfg["parallel"], cfg["train"]
    micro = p.get("microbatches", 1) * t.get("accumulation_steps", 1)
    got = (p["tp"], p["pp"], t["zero"], cfg["model"]["recompute"], t["batch_size"], micro)
    assert got == tuple(best[k] for k in ("tp", "pp", "zero", "recompute", "micro_batch", "microbatches"))
