"""Looking at runs from a plain process, no launcher: loss and throughput charts (plot) and text sampled from a
checkpoint (generate)."""
