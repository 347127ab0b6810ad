"""Checkpoints: the file format (format), the files of a run directory (store), merging and cutting TP shards
(reshard), and the policy of a training run: when to save, what to keep, where to start (manager)."""
