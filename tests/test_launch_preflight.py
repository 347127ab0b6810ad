"""`hvdlm launch` refuses, before it starts anything (and so with --dry-run too), what every rank would refuse
seconds later: exit 2, one paragraph, no launcher started."""

from __future__ import annotations

import pytest
from helpers import assert_imports_nothing_heavy

from hvdlm.launch.commands import local_gpus


def _refused(r, expected: str) -> None:
    assert r.code == 2, r.out[-3000:]
    assert expected in r.out, r.out[-3000:]
    assert "Traceback" not in r.out and "mpirun" not in r.out  # the command was never built, let alone run


def test_a_run_directory_that_holds_a_run(hvdlm, tiny_job, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--run-dir", str(tmp_path / "run"))
    _refused(r, "already holds a run (metrics.jsonl). Continue it with --resume auto")


@pytest.mark.skipif(local_gpus() > 0, reason="this machine has GPUs, where fp16 is allowed")
@pytest.mark.parametrize("key", ["precision", "grad_compression"])
def test_fp16_on_a_machine_without_gpus(hvdlm, tiny_job, tmp_path, key):
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--run-dir", str(tmp_path / "r"), "--set", f"train.{key}=fp16")
    _refused(r, f'train.{key} = "fp16" needs GPUs, but the ranks run on CPUs')


def test_fp16_with_the_cpu_named_as_the_device(hvdlm, tiny_job, tmp_path):
    sets = ["--set", "train.precision=fp16", "--set", "train.device=cpu"]
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--hosts", "node1:2", "--run-dir", str(tmp_path / "r"), *sets)
    _refused(r, '(train.device = "cpu")')


def test_a_dataset_that_is_missing_or_a_file(hvdlm, tiny_job, tmp_path):
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--set", f"data.dataset={tmp_path / 'nowhere'}")
    _refused(r, f"data.dataset '{tmp_path / 'nowhere'}' does not exist")
    (tmp_path / "file").write_text("text")
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--set", f"data.dataset={tmp_path / 'file'}")
    _refused(r, "is a file, not a directory")


def test_a_seq_len_longer_than_the_data(hvdlm, tiny_job, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"doc{i}.txt").write_text(f"document {i} " * 20)
    prepared = hvdlm("data", "prepare", str(texts), "--out", str(tmp_path / "data"))
    assert prepared.code == 0, prepared.out
    sets = ["--set", f"data.dataset={tmp_path / 'data'}", "--set", "model.seq_len=4096"]
    r = hvdlm("launch", str(tiny_job), "--dry-run", *sets)
    _refused(r, "has no shard of 4,097 tokens (model.seq_len + 1")


def test_resuming_a_run_of_another_model_shape(hvdlm, tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("[model]\nn_layer = 3\nd_model = 32\n")
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--run-dir", str(run_dir), "--resume", "auto")
    _refused(r, "trains another model than this job: n_layer is 3 there, 2 here")


def test_init_from_weights_that_are_not_there(hvdlm, tiny_job, tmp_path):
    """--init-from is read by every rank under mpirun; the launcher checks the names first (not the contents)."""
    launch = ("launch", str(tiny_job), "--dry-run", "--run-dir", str(tmp_path / "new"))
    r = hvdlm(*launch, "--init-from", str(tmp_path / "nowhere"))
    _refused(r, f"--init-from '{tmp_path / 'nowhere'}' (train.init_from) does not exist. Name an hvdlm run directory")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    r = hvdlm(*launch, "--init-from", str(run))
    _refused(r, f"'{run}' holds no complete checkpoint")
    (run / "checkpoints" / "step-0000004.tp0-of-2.pt").write_bytes(b"")  # its other shard is missing
    r = hvdlm(*launch, "--init-from", str(run / "checkpoints" / "step-0000004.pt"))
    _refused(r, "is incomplete: 1 of its 2 shards are")
    r = hvdlm(*launch, "--resume", str(run / "checkpoints" / "step-0000004.tp0-of-2.pt"))  # the same for --resume
    _refused(r, "is incomplete: 1 of its 2 shards are")
    (run / "checkpoints" / "step-0000004.pt").write_bytes(b"")
    (run / "config.toml").write_text("[model]\nn_layer = 3\n")
    r = hvdlm(*launch, "--init-from", str(run))
    _refused(r, f"--init-from '{run}' holds another model than this job: n_layer is 3 there, 2 here")
    # The tiny job's model: keys a config.toml leaves out take their defaults, as the ranks read it.
    (run / "config.toml").write_text("[model]\nn_layer = 2\nn_head = 2\nd_model = 32\nseq_len = 32\n")
    assert hvdlm(*launch, "--init-from", str(run)).code == 0
    assert_imports_nothing_heavy([*launch, "--init-from", str(run)])


def test_resuming_a_llama_compares_the_model_as_the_ranks_resolve_it(hvdlm, tiny_job, tmp_path):
    """n_kv_head = 0 means n_head, and a llama's seq_len shapes no tensor (RoPE has no position table): the run's
    config.toml and the job are compared resolved (hvdlm.config.model_shape), as the ranks compare a checkpoint."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = {"arch": '"llama"', "n_layer": 2, "n_head": 2, "d_model": 32, "bias": "false", "tie_embeddings": "true"}
    table = "".join(f"{k} = {v}\n" for k, v in model.items())
    resume = ("launch", str(tiny_job), "--dry-run", "--run-dir", str(run_dir), "--resume", "auto")
    for theirs, ours in [("n_kv_head = 2\nseq_len = 32\n", "0"), ("n_kv_head = 0\nseq_len = 64\n", "2")]:
        (run_dir / "config.toml").write_text(f"[model]\n{table}{theirs}")
        r = hvdlm(*resume, "--set", "model.arch=llama", "--set", f"model.n_kv_head={ours}")
        assert r.code == 0, r.out[-3000:]
    (run_dir / "config.toml").write_text(f"[model]\n{table}n_kv_head = 1\nseq_len = 32\n")
    r = hvdlm(*resume, "--set", "model.arch=llama")
    _refused(r, "trains another model than this job: n_kv_head is 1 there, 2 here")
