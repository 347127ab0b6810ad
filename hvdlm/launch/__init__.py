"""Job preparation: hosts and slots, launcher command lines, and running them. Never imports torch or horovod."""
