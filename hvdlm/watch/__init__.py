"""Looking at runs from a plain process, no launcher: the runs under a directory and their state (runs), loss and
throughput charts (plot) and text sampled from a checkpoint (generate)."""
