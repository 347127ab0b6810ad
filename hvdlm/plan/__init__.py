"""hvdlm plan: how many GPUs, which layout, how much memory and how long, before a job is submitted."""
