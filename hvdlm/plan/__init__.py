"""hvdlm plan: how many GPUs, which layout, how much memory and how long, before a job is submitted.

Pure arithmetic, standard library only (no torch, no numpy), and nothing from hvdlm.training:

- gpus: the GPU table;
- candidate: one layout the planner scores (the tp x pp x dp grid and the choices that shape a step);
- counts: what one rank holds and sends, counted exactly (bench/plan_check.py checks them against real runs);
- memory: model states by accounting and ZeRO stage, activations by recomputation and pipeline schedule;
- timing: FLOPs, TP and DP communication, the pipeline bubble;
- layouts: one layout's estimate; every layout ranked, with the reasons for the dropped ones;
- report: the answer as text and JSON;
- jobfile: the job file with a chosen layout;
- request: one `hvdlm plan` command line's question and its answer (the command only parses and prints).

Formulas and sources: docs/guides/planner.md.
"""
