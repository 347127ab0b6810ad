"""train.share_gpu and train.precision = "fp8" on a machine without a GPU: the device each rank takes (pure), the
layouts refused because they would need an NCCL communicator, the route a CUDA tensor's collective takes, and the
FP8 refusals, each where a user meets it (config, `hvdlm launch`, the ranks themselves).

What needs a GPU (two ranks really sharing one, the host staging of CUDA tensors, FP8 matmuls) is in
bench/gpu_check.sh's `share` and `fp8` phases; their drivers run on CPU in tests/test_gpu_phases.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import mpirun, sets, train_argv

from hvdlm.config import load_config
from hvdlm.devices import assign_gpus, check_share_gpu, choose_device, fp8_refusal
from hvdlm.errors import InputError
from hvdlm.launch.commands import LaunchRequest, check_gpus_per_node, plan_launch
from hvdlm.launch.hosts import Host
from hvdlm.parallel.collectives import CPU_MPI, CUDA_HOROVOD, CUDA_HOST, CUDA_MPI, route_for

# --- which device each rank takes ---


def test_two_ranks_on_a_one_gpu_host_both_take_it_when_shared():
    assert assign_gpus(2, 1, share=True) == [0, 0]
    assert [choose_device(r, 2, 1, share=True).name for r in range(2)] == ["cuda:0", "cuda:0"]
    with pytest.raises(InputError, match="share_gpu = true"):  # off: refused, and the message names the switch
        assign_gpus(2, 1)


def test_shared_gpus_are_taken_in_turn_and_one_each_where_there_are_enough():
    assert assign_gpus(4, 1, share=True) == [0, 0, 0, 0]  # PP=2 x TP=2 on one GPU
    assert assign_gpus(4, 2, share=True) == [0, 1, 0, 1]
    assert assign_gpus(2, 2, share=True) == [0, 1]  # enough GPUs: the switch changes nothing
    assert assign_gpus(2, 4, share=True) == assign_gpus(2, 4) == [0, 1]


def test_shared_gpus_from_the_ranks_views():
    same = ("GPU-a",)
    assert assign_gpus(2, 1, views=[same, same], share=True) == [0, 0]
    with pytest.raises(InputError, match="share a GPU"):
        assign_gpus(2, 1, views=[same, same])
    # Narrowed to a GPU each (srun --gpu-bind): ordinal 0 each, shared or not.
    assert assign_gpus(2, 1, views=[("A",), ("B",)], share=True) == [0, 0]
    # Four ranks that all see two GPUs: two on each.
    both = ("A", "B")
    chosen = [both[i] for i in assign_gpus(4, 2, views=[both] * 4, share=True)]
    assert sorted(chosen) == ["A", "A", "B", "B"]
    # A rank that sees no GPU beside ranks that do is still refused: sharing does not cover it.
    with pytest.raises(InputError, match="sees no GPU"):
        assign_gpus(2, 1, views=[("A",), ()], share=True)


def test_no_gpu_is_still_the_cpu_when_shared():
    assert choose_device(1, 2, 0, share=True).name == "cpu"


# --- what sharing refuses ---


@pytest.mark.parametrize(
    "dp, zero, local_sgd, words",
    [
        (2, 0, 0, ["2 data-parallel replicas", "NCCL", "parallel.tp x parallel.pp ranks"]),
        (1, 1, 0, ["train.zero = 1", "train.zero = 0"]),
        (1, 0, 4, ["local SGD", "local_sgd_interval = 0"]),
        (None, 2, 0, ["train.zero = 2"]),
    ],
)
def test_layouts_that_need_nccl_are_refused_naming_the_rule_and_the_fix(dp, zero, local_sgd, words):
    with pytest.raises(InputError) as e:
        check_share_gpu(dp, zero, local_sgd)
    msg = str(e.value)
    assert "NCCL refuses two ranks on one GPU" in msg and "share_gpu = false" in msg
    for word in words:
        assert word in msg, (word, msg)


def test_one_replica_without_zero_may_share():
    check_share_gpu(1)
    check_share_gpu(None)


def test_the_job_file_refuses_zero_with_sharing(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("[train]\nshare_gpu = true\nzero = 1\n")
    with pytest.raises(InputError, match="share_gpu"):
        load_config(job)
    job.write_text("[train]\nshare_gpu = true\n[parallel]\ntp = 2\n[model]\nn_head = 2\n")
    assert load_config(job).train.share_gpu


def test_launch_lets_shared_ranks_onto_one_gpu_and_refuses_replicas():
    program = ["python", "-m", "hvdlm", "train", "job.toml"]
    tp2 = LaunchRequest("mpirun", 2, program, tp=2, train_device="cuda", share_gpu=True)
    assert "-np" in plan_launch(tp2, gpus=1).argv  # 2 ranks, 1 GPU: planned
    with pytest.raises(InputError, match="one rank per GPU"):
        plan_launch(LaunchRequest("mpirun", 2, program, tp=2, train_device="cuda"), gpus=1)
    with pytest.raises(InputError, match="2 data-parallel replicas"):
        four = LaunchRequest(
            "mpirun", 4, program, hosts=[Host("localhost", 4)], tp=2, train_device="cuda", share_gpu=True
        )
        plan_launch(four, gpus=1)
    check_gpus_per_node("cuda", 2, 1, share=True)  # a batch job: 2 tasks on a 1-GPU node
    with pytest.raises(InputError, match="NCCL refuses"):
        check_gpus_per_node("cuda", 2, 1)


def test_sbatch_puts_shared_ranks_on_fewer_gpus_and_refuses_replicas(tmp_path):
    from hvdlm.launch.sbatch import SlurmOverrides, spec_from_config

    job = tmp_path / "job.toml"
    job.write_text('[train]\nshare_gpu = true\ndevice = "cuda"\n[parallel]\ntp = 2\n[model]\nn_head = 2\n')
    cfg = load_config(job)
    one_node = SlurmOverrides(nodes=1, gpus_per_node=1, ntasks_per_node=2, venv="")
    assert spec_from_config(cfg, str(job), one_node).ntasks_per_node == 2  # 2 tasks, 1 GPU: one TP pair on it
    with pytest.raises(InputError, match="2 data-parallel replicas"):
        spec_from_config(cfg, str(job), SlurmOverrides(nodes=2, gpus_per_node=1, ntasks_per_node=2, venv=""))


def test_ranks_refuse_replicas_with_sharing_exit_2_before_writing(job, tmp_path, cache_dir):
    """Started by mpirun directly (no `hvdlm launch` to check first): the ranks find dp = 2 and refuse."""
    run = tmp_path / "run"
    r = mpirun(2, train_argv(job, run, *sets("train.share_gpu=true", "train.device=cpu")), cache=cache_dir)
    assert r.code == 2, r.out[-2000:]
    assert "2 data-parallel replicas" in r.out and "Traceback" not in r.out
    assert not (run / "metrics.jsonl").exists()


# --- how a CUDA tensor's collective travels ---


def test_routes():
    assert route_for(False, False, True) == CPU_MPI
    assert route_for(True, True, True) == CUDA_MPI  # CUDA-aware MPI reads device memory
    assert route_for(True, False, True) == CUDA_HOROVOD  # a process set: NCCL through Horovod
    # No process set (the pipeline's groups; every group of a job sharing a GPU): staged through host memory.
    assert route_for(True, False, False) == CUDA_HOST


# --- FP8 ---


def test_fp8_refusals():
    assert "CPUs have no FP8" in fp8_refusal("cpu", None, True)
    ampere = fp8_refusal("cuda", (8, 0), True)
    assert "compute capability >= 9.0" in ampere and "8.0" in ampere
    assert "torchao" in fp8_refusal("cuda", (9, 0), False)
    assert fp8_refusal("cuda", (9, 0), True) is None
    assert fp8_refusal("cuda", (10, 0), True) is None


def test_fp8_on_this_cpu_exits_2_with_its_reason(hvdlm, job, tmp_path):
    run = tmp_path / "run"
    r = hvdlm("train", job, "--run-dir", run, *sets("train.precision=fp8", "train.device=cpu"))
    assert r.code == 2, r.out[-2000:]
    assert "CPUs have no FP8" in r.out and "Traceback" not in r.out
    assert not (run / "metrics.jsonl").exists()


def test_fp8_is_refused_with_tp_in_the_job_file(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[train]\nprecision = "fp8"\n[parallel]\ntp = 2\n[model]\nn_head = 2\n')
    with pytest.raises(InputError, match="tp = pp = 1"):
        load_config(job)


def test_one_rank_tp_layers_become_torch_linears_with_the_same_parameters():
    """What torchao's float8 conversion needs (it converts nn.Linear): the same model, computing the same."""
    from hvdlm.config import ModelConfig
    from hvdlm.model import GPT
    from hvdlm.training.precision import as_torch_linears

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    before = model(x, x)[1]
    params = {id(p) for p in model.parameters()}
    replaced = as_torch_linears(model)
    assert replaced == 2 * 4 + 1  # per block q/k/v, attention output, MLP in and out; and the head
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == replaced
    assert {id(p) for p in model.parameters()} == params
    assert torch.equal(model(x, x)[1], before)
