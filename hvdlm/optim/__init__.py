"""Optimizers behind one interface: what the trainer holds, asks and checkpoints.

- interface: TrainingOptimizer, the methods every kind implements;
- build: the kind a config asks for;
- replicated: the whole state on every replica (Horovod's DistributedOptimizer, or plain for one replica), and the
  initial broadcast;
- zero, zero2, zero3: ZeRO-1 (optimizer state sharded over the DP group), ZeRO-2 (gradients too) and ZeRO-3 (weights
  too, gathered module by module);
- local_sgd: replicas that step alone and average every few steps;
- torch_optimizers: the torch update rules (AdamW, SGD) over decay / no-decay groups;
- muon: Muon for the blocks' matrices, with AdamW for the rest;
- clipping: the global gradient norm over TP shards and pipeline stages;
- schedule: the learning rate's warmup and decay.

Nothing is imported here: the modules load torch and Horovod.
"""
