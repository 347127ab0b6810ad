"""hvdlm: GPT-style language models trained with Horovod and MPI, and the jobs that run them.

Packages and modules, from the top down (each imports only from those below it; tests/test_house.py keeps it so):
- __main__: `python -m hvdlm`, the command line;
- cli: the `hvdlm` commands, thin;
- training: one rank's training program, the Trainer and its phases;
- launch: job preparation (hosts, launcher command lines, batch scripts, doctor, restarts, elastic);
- watch: runs read from the outside (runs, plot, generate);
- optim: the optimizer interface and its kinds (replicated, ZeRO-1/2, local SGD, Muon);
- checkpoint: the checkpoint format, store, resharding, slices and transformers in and out;
- model: the GPT and its pipeline stages;
- data: sources, tokenizers, shards, samplers;
- plan: the planner;
- config: the job file's typed dataclasses;
- parallel: the rank grid, collectives, tensor-parallel layers, pipeline schedules;
- runfiles: what a run directory holds and the exit codes, for everything that reads a run from outside;
- devices: which device a rank trains on (pure; torch-free);
- cache: where prepared built-in corpora are kept;
- errors, fsutil, units: the bad-input error, the one atomic write, counts and sizes as people read them.
"""

__version__ = "0.1.0"
