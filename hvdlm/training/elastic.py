"""Horovod elastic for data-parallel jobs (tp = 1): `hvdlm launch --elastic --min-np A --max-np B` runs
horovodrun with Gloo and a host discovery script (hvdlm.launch.elastic); each worker's steps run under
`hvd.elastic.run`.

Every train.commit_interval steps the state is committed in memory: model, optimizer, step and the data sampler's
position. When a worker dies the others' collectives fail (HorovodInternalError); Horovod restores the last
commit, rebuilds its ring from the workers left (the failed host is blacklisted by horovodrun), and calls
`on_reset` below, which rebuilds what depends on the number of workers: the topology, the samplers (the same
global order, the same position: hvdlm.data.sampler), the stop vote, rank 0's log (which cuts metrics.jsonl back
to the commit, so every step is logged once) and status.json (naming the process that is rank 0 now). Then rank
0's state is broadcast and the steps go on. The global batch is batch_size x workers: it shrinks with the workers
(accumulation is not raised here).

Limits (refused by the launcher or below): tensor parallelism (Horovod process sets under elastic are unsupported,
horovod issues #3501, #4021), the EMA and local SGD (their state is not in the commit). Horovod can deadlock when
fewer than --min-np workers remain (#3494): keep --min-np at what the job can lose. Workers that join later
are not supported: a new worker's setup talks to every rank (the run directory, the checkpoint), which the
running workers, inside their steps, would not answer.
"""

from __future__ import annotations

from collections.abc import Callable

from hvdlm.launch.elastic import refuse_unsupported


def run_steps(trainer, watchdog, run_step: Callable) -> None:
    """The steps from trainer.first_step to the end under hvd.elastic.run."""
    import horovod.torch as hvd

    from hvdlm.parallel.topology import init_topology
    from hvdlm.training.metrics import RunLogger

    t = trainer.t
    refuse_unsupported(trainer.cfg)
    # Horovod: what a commit saves and a reset restores and broadcasts from rank 0.
    state = hvd.elastic.TorchState(
        model=trainer.model,
        optimizer=trainer.optimizer.checkpoint_view(),  # what a checkpoint holds of it: the torch optimizer
        step=trainer.first_step,
        data=trainer.train_batches.state_dict(),
    )

    def on_reset() -> None:
        trainer.resize(init_topology(1))  # Horovod is initialised again by now: the workers left
        trainer.logger.close()
        # Rank 0 (perhaps another process than before) cuts metrics.jsonl back to the commit and logs on.
        trainer.logger = RunLogger(trainer.run_dir, t.max_steps, hvd.rank() == 0, t.tensorboard, state.step)
        watchdog.attach(trainer.run_dir, hvd.rank(), hvd.size(), state.step)
        trainer.status.start(trainer.run_dir, hvd.rank() == 0, state.step)  # rank 0 may be another process now
        trainer.logger.info(f"elastic: {hvd.size()} worker(s) now; going on from the commit of step {state.step}")

    state.register_reset_callbacks([on_reset])

    @hvd.elastic.run
    def steps(state) -> None:
        trainer.train_batches.load_state_dict(state.data)
        for step in range(state.step, t.max_steps):
            run_step(trainer, watchdog, step)
            state.step = step + 1
            if state.step % t.commit_interval == 0:
                state.data = trainer.train_batches.state_dict()
                state.commit()

    steps(state)
