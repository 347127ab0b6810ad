"""hvdlm plan: how many GPUs, which layout, how much memory and how long, before a job is submitted.

- gpus: the GPU table;
- counts: what one rank holds and sends, counted from the configuration;
- memory: memory per GPU;
- timing: step time;
- layout: one candidate layout;
- layouts: each layout's estimate, and every layout ranked;
- jobfile: the job file with a chosen layout;
- report: the answer as text or JSON.
"""
