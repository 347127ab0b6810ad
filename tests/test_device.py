"""Which device each rank takes (hvdlm.devices.choose_device): pure, so every node shape is tested on CPU."""

import pytest

from hvdlm.devices import CUBLAS_DETERMINISTIC, choose_device
from hvdlm.errors import InputError
from hvdlm.training.device import pick_device


def names(local_size: int, visible: int, views=None) -> list[str]:
    return [choose_device(r, local_size, visible, views=views).name for r in range(local_size)]


def test_no_gpu_is_the_cpu():
    assert names(2, 0) == ["cpu", "cpu"]
    assert choose_device(0, 1, 0).index is None


def test_every_rank_sees_the_nodes_gpus_one_each_by_local_rank():
    assert names(4, 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert names(2, 8) == ["cuda:0", "cuda:1"]  # more GPUs than ranks: the first ones


def test_more_ranks_than_gpus_is_refused_naming_the_fix():
    with pytest.raises(InputError) as e:
        choose_device(1, 2, 1)  # `make demo` (2 ranks) on a 1-GPU workstation
    msg = str(e.value)
    assert "2 ranks" in msg and "1 GPU" in msg and "share a GPU" in msg
    assert "--np" in msg and "CUDA_VISIBLE_DEVICES" in msg


def test_ranks_narrowed_to_their_own_gpu_each_take_ordinal_0():
    # srun --gpu-bind=single:1: every rank sees one device, a different one: "invalid device ordinal" before.
    assert names(4, 1, views=[("A",), ("B",), ("C",), ("D",)]) == ["cuda:0"] * 4


def test_same_view_for_all_ranks_is_cuda_local_rank():
    view = ("A", "B", "C", "D")
    assert names(4, 4, views=[view] * 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_ranks_narrowed_to_groups_of_gpus_get_distinct_ones():
    views = [("A", "B"), ("A", "B"), ("C", "D"), ("C", "D")]  # e.g. per-socket binding
    chosen = [views[r][choose_device(r, 4, 2, views=views).index] for r in range(4)]
    assert sorted(chosen) == ["A", "B", "C", "D"]


def test_a_matching_is_found_where_first_come_first_served_would_fail():
    views = [("A", "B"), ("A",)]  # rank 0 must leave A to rank 1
    chosen = [views[r][choose_device(r, 2, len(views[r]), views=views).index] for r in range(2)]
    assert chosen == ["B", "A"]


def test_views_that_share_one_gpu_are_refused_on_every_rank():
    views = [("A",), ("A",)]  # CUDA_VISIBLE_DEVICES=0 for both ranks
    for r in range(2):
        with pytest.raises(InputError, match="share a GPU"):
            choose_device(r, 2, 1, views=views)


def test_a_rank_without_a_gpu_beside_ranks_with_one_is_refused():
    with pytest.raises(InputError, match="sees no GPU"):
        choose_device(0, 2, 1, views=[("A",), ()])


def test_gpu_job_on_a_cpu_only_machine_is_refused():
    with pytest.raises(InputError, match="asks for GPUs"):
        choose_device(0, 1, 0, gpus_required=True)
    assert choose_device(0, 1, 1, gpus_required=True).name == "cuda:0"


def test_deterministic_fixes_the_cublas_workspace():
    c = choose_device(0, 1, 1, deterministic=True)
    assert c.deterministic and c.env == CUBLAS_DETERMINISTIC
    assert choose_device(0, 1, 1).env == {}


def test_bad_local_rank_is_a_bug_not_input():
    with pytest.raises(ValueError):
        choose_device(2, 2, 2)


def test_pick_device_on_this_cpu_machine(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    assert pick_device(0, 1).type == "cpu"
    with pytest.raises(InputError):
        pick_device(0, 1, gpus_required=True)
