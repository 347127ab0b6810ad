"""Checkpoints: the file format (format), the files of a run directory (store), merging and cutting TP shards
(reshard), ZeRO-1's optimizer-state slice files (slices), a run's checkpoint as `hvdlm generate` and `hvdlm export`
load it, with its model configuration and tokenizer (run), and the policy of a training run: when to save, what to
keep, where to start (manager)."""
