"""hvdlm: GPT-style language models trained with Horovod and MPI, and the jobs that run them."""

__version__ = "0.1.0"
