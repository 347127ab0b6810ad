"""Acceptance of virtual stages (parallel.virtual_stages, the interleaved 1F1B schedule).

Real ranks under mpirun: PP=2 with 2 virtual stages a rank (4 chunks of one layer; rank 0 holds layers 0 and 2,
rank 1 layers 1 and 3) gives the loss of one rank accumulating the same 4 micro-batches at every step, within
1e-5, and so does PP=2 x DP=2 with ZeRO-2 and full recomputation; its checkpoints merge into the one rank's final
weights and continue at PP=2 without interleaving and on one rank. In-process: every rank's turns of the schedule
played against each other for many (p, v, m) (each message arrives where it is needed; no rank waits for ever)
and timed (exactly the interleaved bubble); the layout-independent initialisation of the chunks; the refusals;
the planner's bubble, messages and activations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import assert_losses_match, losses, mpirun, run_cli, sets, summary, train_argv

from hvdlm.checkpoint.reshard import load_full_state
from hvdlm.config import ModelConfig, load_config
from hvdlm.errors import InputError
from hvdlm.model import GPT
from hvdlm.model.stage import GPTStage
from hvdlm.parallel.interleaved import Interleaving, Tick, forward_only_ticks
from hvdlm.parallel.split import chunk_layers, layers_per_rank
from hvdlm.plan import counts, timing
from hvdlm.plan.candidate import Candidate

STEPS = 8
COMMON = (
    "model.n_layer=4",
    f"train.max_steps={STEPS}",
    "train.watchdog_s=100",
    "train.watchdog_first_s=150",
    "train.checkpoint_interval=4",
    "train.eval_interval=4",
    "train.eval_batches=3",  # not a multiple of the stages: evaluation needs no whole groups
    "train.sample_tokens=0",
    "train.log_interval=1",
    "train.tensorboard=false",
)
V2 = ("parallel.pp=2", "parallel.microbatches=4", "parallel.virtual_stages=2")
LAYOUTS = {  # name: (ranks, overrides); the global batch is 16 sequences in every layout
    "one": (1, ("train.batch_size=4", "train.accumulation_steps=4")),
    "pp2v2": (2, (*V2, "train.batch_size=4")),
    # ZeRO-2 over each stage's DP pair: a bucket may hold both chunks' parameters, whose gradients complete in
    # different turns; full recomputation.
    "pp2v2xdp2": (4, (*V2, "train.batch_size=2", "model.recompute=full", "train.zero=2", "train.zero_bucket_mb=0.1")),
    # Each chunk's blocks cut into TP shards: a chunk's sends carry the activations every TP rank holds whole.
    "pp2v2xtp2": (4, (*V2, "train.batch_size=4", "parallel.tp=2")),
}


def _train(np: int, job: Path, run_dir: Path, cache: Path, *overrides: str, flags: tuple[str, ...] = ()):
    return mpirun(np, train_argv(job, run_dir, *flags, *sets(*COMMON, *overrides)), cache)


@pytest.fixture(scope="module")
def runs(job, tmp_path_factory, cache_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("interleaved-runs")
    for name, (np, overrides) in LAYOUTS.items():
        proc = _train(np, job, base / name, cache_dir, *overrides)
        assert proc.code == 0, f"{name}:\n{proc.out[-4000:]}"
    return {name: base / name for name in LAYOUTS}


def ckpt(run_dir: Path, step: int, name: str = "") -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}{name}.pt"


# --- real ranks -----------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["pp2v2", "pp2v2xdp2", "pp2v2xtp2"])
def test_loss_and_validation_loss_at_every_step_match_one_rank(runs, layout):
    assert_losses_match(runs["one"], runs[layout], STEPS, layout)
    val = [[r["val_loss"] for r in _metrics(runs[name]) if "val_loss" in r] for name in ("one", layout)]
    assert len(val[0]) == 3 and val[0] == pytest.approx(val[1], rel=1e-5)


def _metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_a_rank_holds_its_chunks_and_the_checkpoint_merges_to_one_ranks_weights(runs):
    first = torch.load(ckpt(runs["pp2v2"], STEPS, ".pp0-of-2"), weights_only=True)
    last = torch.load(ckpt(runs["pp2v2"], STEPS, ".pp1-of-2"), weights_only=True)
    assert first["pp"]["blocks"] == [[0], [2]] and last["pp"]["blocks"] == [[1], [3]]
    assert {n.split(".")[1] for n in first["model"] if n.startswith("blocks.")} == {"0", "2"}
    assert torch.equal(first["model"]["tok_emb.weight"], last["model"]["head.weight"])  # the tied copies
    ref = torch.load(ckpt(runs["one"], STEPS), weights_only=True)["model"]
    got = load_full_state(ckpt(runs["pp2v2"], STEPS))["model"]
    assert ref.keys() == got.keys()
    for name in ref:
        assert (ref[name] - got[name]).abs().max().item() <= 1e-5, name
    s = summary(runs["pp2v2xdp2"])
    assert s["replicas_identical"] and (s["pp"], s["dp"]) == (2, 2)


@pytest.mark.distributed
def test_the_planner_counts_the_interleaved_messages_of_every_step(runs):
    """Stage 0 (rank 0, which logs) sends both its chunks' activations and its second chunk's gradients: 3 x m
    messages a step where 1F1B sends m (hvdlm.plan.counts against what the run really sent)."""
    cfg = load_config(runs["pp2v2"] / "config.toml")
    p2p, group = counts.pp_bytes_per_step(cfg.model, 4, 2, 0, 4, cfg.train.precision, virtual=2)
    plain, _ = counts.pp_bytes_per_step(cfg.model, 4, 2, 0, 4, cfg.train.precision)
    rows = [r for r in _metrics(runs["pp2v2"]) if "loss" in r]
    assert len(rows) == STEPS and {r["pp_bytes_per_step"] for r in rows} == {group} and p2p == 3 * plain > 0


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name,np,overrides",
    [
        ("pp2_1f1b", 2, ("parallel.pp=2", "parallel.microbatches=4", "train.batch_size=4")),
        ("one_rank", 1, ("train.batch_size=4", "train.accumulation_steps=4")),
    ],
)
def test_a_v2_checkpoint_continues_without_interleaving(runs, job, tmp_path, cache_dir, name, np, overrides):
    """Chunks mapped back to the global layer numbering: the run goes on as the one-rank run did."""
    run_dir = tmp_path / name
    source = ckpt(runs["pp2v2"], 4, ".pp1-of-2")
    proc = _train(np, job, run_dir, cache_dir, *overrides, flags=("--resume", str(source)))
    assert proc.code == 0, proc.out[-4000:]
    ref, got = losses(runs["one"])[4:], losses(run_dir)
    assert len(got) == STEPS - 4
    for step, (a, b) in enumerate(zip(ref, got), start=5):
        assert abs(a - b) / abs(a) <= 1e-5, f"step {step}: 1 rank {a} vs resumed {name} {b}"


def test_launch_refuses_virtual_stages_it_cannot_run_before_anything_starts(tmp_path):
    job = tmp_path / "v.toml"
    job.write_text("[model]\nn_layer = 6\nn_head = 2\n[parallel]\npp = 2\nmicrobatches = 4\nvirtual_stages = 2\n")
    cases = [
        ([], "does not divide into parallel.pp x parallel.virtual_stages = 2 x 2 = 4 equal chunks"),
        (["parallel.microbatches=3", "model.n_layer=4"], "parallel.microbatches = 3 is not a multiple of"),
        (["parallel.pp=1", "parallel.microbatches=1"], "parallel.pp = 1 has none"),
    ]
    for overrides, message in cases:
        args = ["launch", job, "--np", "2", "--run-dir", tmp_path / "run", *sets(*overrides)]
        r = run_cli(*args, timeout=60, split=True)
        assert r.code == 2, (overrides, r.out, r.err)
        assert message in r.err and "Traceback" not in r.err, (overrides, r.err)
    assert not (tmp_path / "run").exists()


# --- in-process -----------------------------------------------------------------------------------------------


def test_the_config_names_each_problem_and_its_fix():
    for overrides, message in [
        (["model.n_layer=6", "parallel.pp=2", "parallel.microbatches=4"], "Use virtual_stages among [3]"),
        (["parallel.pp=2", "parallel.microbatches=5"], "Use microbatches = 4 or 6"),
        (["parallel.pp=2", "parallel.microbatches=4", "parallel.pp_layers=1,3"], "Leave pp_layers empty"),
        (["parallel.pp=2", "parallel.microbatches=4", "parallel.schedule=gpipe"], 'use schedule = "1f1b"'),
        (["parallel.virtual_stages=0"], "parallel.virtual_stages"),
    ]:
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, ["model.n_layer=4", "parallel.virtual_stages=2", *overrides])
    assert load_config(None, ["parallel.pp=2", "parallel.microbatches=4", "parallel.virtual_stages=2"])


ACT, GRAD = "activation", "gradient"


def _turns(p: int, v: int, m: int) -> list[list[tuple[Tick, tuple | None, tuple | None]]]:
    """Every rank's turns of one training step, with the (chunk, micro-batch) of each forward and backward."""
    out = []
    for r in range(p):
        plan = Interleaving(p, r, v, m)
        out.append(
            [
                (
                    t,
                    None if t.forward is None else (plan.chunk(t.forward), plan.microbatch(t.forward)),
                    None if t.backward is None else (plan.chunk(t.backward, False), plan.microbatch(t.backward)),
                )
                for t in plan.ticks()
            ]
        )
    return out


def _messages(p: int, turns) -> tuple[dict, dict, dict]:
    """(sends, receives, meetings): on each (sender, receiver, tag) the n-th send meets the n-th receive, as MPI
    matches them; sends carry the (model chunk, micro-batch) they come from, and meetings map each (rank, turn) to
    the (rank, turn)s its exchange's messages meet."""
    sends, recvs = {}, {}
    for r, rank_turns in enumerate(turns):
        nxt, prv = (r + 1) % p, (r - 1) % p
        for t, (tick, f, b) in enumerate(rank_turns):
            if tick.send_next:
                sends.setdefault((r, nxt, ACT), []).append((t, (f[0] * p + r, f[1])))
            if tick.send_prev:
                sends.setdefault((r, prv, GRAD), []).append((t, (b[0] * p + r, b[1])))
            if tick.recv_prev:
                recvs.setdefault((prv, r, ACT), []).append(t)
            if tick.recv_next:
                recvs.setdefault((nxt, r, GRAD), []).append(t)
    meets: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for channel, sent in sends.items():
        src, dst, _ = channel
        for (ts, _), tr in zip(sent, recvs.get(channel, [])):
            meets.setdefault((src, ts), []).append((dst, tr))
            meets.setdefault((dst, tr), []).append((src, ts))
    return sends, recvs, meets


def _play(p: int, v: int, turns) -> None:
    """Play the ranks' turns against each other as MPI would. Each received message must be the one its forward
    or backward needs (the output of the model's previous chunk for this micro-batch, or the gradient of the next
    chunk's input), and every rank must get through all its turns when each exchange waits for all of its
    messages (no eager sends)."""
    sends, recvs, meets = _messages(p, turns)
    assert {k: len(x) for k, x in sends.items()} == {k: len(x) for k, x in recvs.items()}
    for r, rank_turns in enumerate(turns):
        queues, taken = {ACT: [], GRAD: []}, {ACT: 0, GRAD: 0}
        for tick, f, b in rank_turns:
            if f is not None and f[0] * p + r > 0:  # the model's first chunk reads tokens
                assert queues[ACT].pop(0) == (f[0] * p + r - 1, f[1])
            if b is not None and b[0] * p + r < p * v - 1:  # the last chunk starts from the loss
                assert queues[GRAD].pop(0) == (b[0] * p + r + 1, b[1])
            for wanted, kind, peer in ((tick.recv_prev, ACT, (r - 1) % p), (tick.recv_next, GRAD, (r + 1) % p)):
                if wanted:
                    queues[kind].append(sends[(peer, r, kind)][taken[kind]][1])
                    taken[kind] += 1
        assert queues == {ACT: [], GRAD: []}
    at = [0] * p
    moved = True
    while moved:
        moved = False
        for r in range(p):
            if at[r] < len(turns[r]) and all(at[q] >= tq for q, tq in meets.get((r, at[r]), [])):
                at[r], moved = at[r] + 1, True
    assert at == [len(x) for x in turns], f"deadlock: ranks stuck at turns {at}"


def _step_time(p: int, turns, forward: float = 1.0, backward: float = 2.0) -> float:
    """The step's length when a chunk's forward takes `forward`, its backward `backward` and messages nothing,
    every exchange ending when the last of its messages' two sides has arrived at its exchange."""
    _, _, meets = _messages(p, turns)
    arrive = [[0.0] * len(x) for x in turns]
    done = [[0.0] * len(x) for x in turns]
    changed = True
    while changed:  # to the fixed point (the turns' dependencies have no cycle: _play shows it)
        changed = False
        for r, rank_turns in enumerate(turns):
            for t, (_, f, b) in enumerate(rank_turns):
                a = (done[r][t - 1] if t else 0.0) + (forward if f else 0.0) + (backward if b else 0.0)
                d = max([a] + [arrive[q][tq] for q, tq in meets.get((r, t), [])])
                changed |= (a, d) != (arrive[r][t], done[r][t])
                arrive[r][t], done[r][t] = a, d
    return max(rank_done[-1] for rank_done in done)


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_every_ranks_turns_meet_and_none_waits_for_ever(p):
    for v in (2, 3, 4):
        for m in range(p, 4 * p + 1, p):
            turns = _turns(p, v, m)
            _play(p, v, turns)
            for rank_turns in turns:  # every chunk's m backwards, in micro-batch order (as accumulation adds up)
                backwards = [b for _, _, b in rank_turns if b is not None]
                assert all([i for c2, i in backwards if c2 == c] == list(range(m)) for c in range(v))
                assert sorted(f for _, f, _ in rank_turns if f) == [(c, i) for c in range(v) for i in range(m)]
        for n in range(1, 2 * p + 2):  # evaluation: forwards only, any number of batches
            turns = [
                [(t, (c, i) if t.forward is not None else None, None) for t, c, i in forward_only_ticks(p, r, 2, n)]
                for r in range(p)
            ]
            _play(p, 2, turns)


def test_the_player_catches_a_turn_out_of_place():
    """The check above can fail: one gradient received a turn late leaves a rank waiting for ever."""
    turns = _turns(2, 2, 4)
    i = next(k for k, (t, _, _) in enumerate(turns[0]) if t.recv_next)
    tick, f, b = turns[0][i]
    turns[0][i] = (dataclasses.replace(tick, recv_next=False), f, b)
    turns[0][i + 1] = (dataclasses.replace(turns[0][i + 1][0], recv_next=True), *turns[0][i + 1][1:])
    with pytest.raises(AssertionError):
        _play(2, 2, turns)


def test_the_chunks_hold_the_whole_gpts_tensors():
    cfg = ModelConfig(n_layer=8, n_head=2, d_model=32, seq_len=16)
    torch.manual_seed(3)
    whole = GPT(cfg).state_dict()
    split = chunk_layers(8, 2, "", 2)
    assert split == [2, 2, 2, 2] and layers_per_rank(split, 2, 2) == [4, 4]
    seen = set()
    for r in range(2):
        torch.manual_seed(3)
        stage = GPTStage(cfg, split, r, virtual=2)
        assert stage.chunks == ([[0, 1], [4, 5]] if r == 0 else [[2, 3], [6, 7]])
        for name, t in stage.state_dict().items():
            assert torch.equal(t, whole["tok_emb.weight" if name == "head.weight" else name]), name
            seen.add(name)
    assert seen == set(whole)


@pytest.mark.parametrize("p,v,m", [(2, 2, 4), (2, 2, 8), (4, 2, 8), (4, 4, 16), (3, 3, 6)])
def test_the_schedule_idles_exactly_the_interleaved_bubble(p, v, m):
    """With free messages, a chunk's backward twice its forward, the schedule's own turns take v m + p - 1 chunk
    slots of 3: the bubble is (p - 1) / (v m + p - 1), the planner's; 1F1B's would be v (m + p - 1) slots."""
    total = _step_time(p, _turns(p, v, m))
    assert total == 3 * (v * m + p - 1)
    assert (total - 3 * v * m) / total == pytest.approx(timing.bubble_fraction(p, m, v))


def test_the_planner_knows_the_interleaved_bubble_and_messages():
    assert timing.bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert timing.bubble_fraction(2, 4, 2) == pytest.approx(1 / 9)
    assert timing.bubble_fraction(8, 64, 4) == pytest.approx(7 / 263)
    cfg = ModelConfig(n_layer=48, n_head=32, d_model=4096, seq_len=2048, vocab_size=51200)
    speeds = timing.Speeds(300e12, 300e9, 25e9, 25e9)
    plain = Candidate(1, 8, 1, 0, "full", 1, 32)
    inter = dataclasses.replace(plain, virtual_stages=3)
    a, b = timing.step_time(cfg, plain, speeds, 1e9), timing.step_time(cfg, inter, speeds, 1e9)
    assert b.bubble == pytest.approx(a.bubble / 3) and b.pp == pytest.approx(3 * a.pp) and b.compute == a.compute
    # Stage 0 holds its warm-up's chunk passes: (2 (p - 1) + (v - 1) p + 1) / v stage micro-batches.
    assert counts.in_flight(8, 0, 32, virtual=3) == pytest.approx((14 + 16 + 1) / 3)
    assert counts.in_flight(2, 0, 2, virtual=2) == pytest.approx(5 / 2)  # m = p: every forward first


def test_hvdlm_plan_scores_the_jobs_virtual_stages(tmp_path):
    """`hvdlm plan` on a job with virtual stages: the staged layout interleaves (its JSON says so), its bubble is a
    third of 1F1B's at v = 3 and its pipeline bytes three times; a layout whose layers do not split stays at v = 1."""
    from test_plan import job_toml, plan_json

    def planned(virtual: int, tp: int, pp: int) -> dict:
        job = tmp_path / f"v{virtual}.toml"
        staged = f"\n[parallel]\npp = 4\nmicrobatches = 4\nvirtual_stages = {virtual}\n"
        job.write_text(job_toml(32, 4096, 48, extra=staged))
        args = ["--nodes", 4, "--gpus-per-node", 8, "--gpu", "a100-80gb", "--tp", tp, "--pp", pp]
        return plan_json(job, *args, "--global-batch", 64, "--micro-batch", 1, "--recompute", "full")

    plain, inter = planned(1, 8, 4), planned(3, 8, 4)
    assert (plain["layout"]["virtual_stages"], inter["layout"]["virtual_stages"]) == (1, 3)
    bubble = (plain["step_time_parts_s"]["bubble"], inter["step_time_parts_s"]["bubble"])
    assert bubble[1] == pytest.approx(bubble[0] / 3, rel=1e-3) and bubble[1] > 0
    assert inter["pipeline_bytes_per_step"] == 3 * plain["pipeline_bytes_per_step"] > 0
    assert planned(3, 1, 32)["layout"]["virtual_stages"] == 1  # 48 layers are not 32 x 3 chunks
