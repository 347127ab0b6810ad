"""Job preparation: hosts and slots, launcher command lines, and running them. Never imports torch or horovod.

- job: `hvdlm launch` from its command line: the checks, the launcher's command, running it (restarts, elastic);
- sources, hostlist: hosts and slots from an allocation (Slurm, PBS, LSF, strings, hostfiles) and Slurm's host lists;
- hosts, hostfile: hosts with slots, rank placement, and hostfiles in each launcher's format;
- commands, shell: launcher command lines as argv lists, and shell safety for what hvdlm writes;
- shared_memory: whether ranks on this machine may read each other's memory (Open MPI's single copy);
- sbatch: Slurm batch scripts;
- prepare_job: `hvdlm sbatch --prepare`, a batch script that prepares a dataset over the allocation;
- preflight: what `hvdlm launch` checks before it starts anything;
- supervise: running the launcher to its end, stop signals passed on (a checkpoint, not a lost run);
- restarts: `--max-restarts`, starting again from the newest checkpoint;
- elastic: `--elastic`, horovodrun's elastic mode and its host discovery script;
- doctor: `hvdlm doctor`, whether this environment can train.
"""
