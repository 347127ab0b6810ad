"""One rank's training: the Trainer and its phases (trainer), where a run starts (resume), the optimizer and LR
schedule (optim), precision, the EMA of the weights (ema), local SGD, the stop vote on preemption (preemption),
the run's log (metrics), FLOPs / MFU (flops), ZeRO-1's sharded optimizer (zero) and the per-rank memory
account (memory_account).

Nothing is imported here: `hvdlm.training.preemption` is read by the CLI, which must not load torch."""
