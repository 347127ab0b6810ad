"""Looking at runs from a plain process, no launcher.

- runs: `hvdlm runs`, the run directories and their state;
- plot: `hvdlm plot`, loss and throughput charts;
- generate: `hvdlm generate`, text sampled from a checkpoint.
"""
