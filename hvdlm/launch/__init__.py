"""Job preparation: hosts and slots, launcher command lines, and running them. Never imports torch or horovod.

- job: `hvdlm launch` from its command line: the checks, the launcher's command, running it (restarts, elastic);
- commands: launcher argv (mpirun, MPICH, horovodrun, srun) and the ranks' environment; preflight: the checks
  before anything starts; supervise: the launcher run to its end, stop signals passed on;
- restarts: --max-restarts; elastic: --elastic's command line and host discovery script;
- hosts, hostlist, sources, hostfile: hosts and slots from allocations and hostfiles, and writing hostfiles;
- sbatch: Slurm batch scripts; doctor: is this environment able to train; shell: quoting for both.
"""
