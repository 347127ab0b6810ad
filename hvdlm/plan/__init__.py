"""The planner's model: how much memory a layout needs per GPU and how long its steps take, before any job runs.

Pure arithmetic, standard library only (the `hvdlm plan` command answers on a login node): `gpus` (the GPU table),
`layout` (the tp x pp x dp grid and the choices of one layout), `memory` (model states by accounting and ZeRO
stage, activations by recomputation and pipeline schedule), `timing` (FLOPs, TP and DP communication, the
pipeline bubble), `layouts` (one layout's estimate; every layout, ranked, with the reasons for the dropped ones),
`report` (text and JSON) and `jobfile` (the job file with a chosen layout). The formulas and their sources are in
the README, section "Planning a job".
"""
