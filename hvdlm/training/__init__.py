"""One rank's training: the Trainer and its phases, and what a step needs beyond the model and the optimizer.

Nothing is imported here: `hvdlm.training.preemption` is read by the CLI, which must not load torch.

- trainer: the Trainer, its set-up and its phases;
- resume: where a run starts;
- device: which device a rank trains on, and batches onto it;
- precision: autocast and the fp16 gradient scaler;
- pipeline: a pipeline stage's part of each step;
- verdict: whether a step is skipped;
- spike: the loss-spike rule (train.spike_rollback) and its test hook;
- rollback: going back to the checkpoint before a loss spike, past its data;
- ema: the moving average of the weights;
- memory, memory_account: whether the model fits, and what a rank holds;
- flops: FLOPs and MFU;
- metrics: the run's log (metrics.jsonl, TensorBoard, the progress bar);
- profiling: torch.profiler over chosen steps;
- preemption: the stop vote on a signal;
- watchdog: ending a job that makes no progress;
- outcome: how the run ended, in status.json (rank 0's, and the watchdog's);
- elastic: Horovod elastic's steps and resets.
"""
