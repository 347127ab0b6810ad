"""Job preparation: hosts and slots, launcher command lines, and running them. Never imports torch or horovod.

- sources, hostlist: hosts and slots from an allocation (Slurm, PBS, LSF, strings, hostfiles) and Slurm's host lists;
- hosts, hostfile: hosts with slots, rank placement, and hostfiles in each launcher's format;
- commands, shell: launcher command lines as argv lists, and shell safety for what hvdlm writes;
- sbatch: Slurm batch scripts;
- preflight: what `hvdlm launch` checks before it starts anything;
- supervise: running the launcher (signals end in a checkpoint);
- restarts: `--max-restarts`, starting again from the newest checkpoint;
- elastic: `--elastic`, horovodrun's elastic mode;
- doctor: `hvdlm doctor`, whether this environment can train.
"""
