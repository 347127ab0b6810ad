"""Preemption: SIGUSR1 or SIGTERM asks the run to stop; the ranks agree on a step, checkpoint it and exit with
REQUEUE_EXIT_CODE, which the batch script that `hvdlm sbatch` writes turns into `scontrol requeue`.

Slurm sends SIGUSR1 before the time limit when the script asks for it (`#SBATCH --signal=USR1@120`), and SIGTERM
at the limit or on `scancel`. A signal may reach some ranks and not others, or reach them at different steps:
each rank sends its flag with every step (an allreduce of one number, in flight during the step), and all stop
after the first step at which any rank had one.
"""

from __future__ import annotations

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". The requeued job resumes
# with `--resume auto`.
REQUEUE_EXIT_CODE = 75
