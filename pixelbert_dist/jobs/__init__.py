"""Job submission (Slurm through submitit, or this machine): an application layer above
``train``. ``options`` checks the scheduler options, ``plan`` turns the pre-training
arguments and sweeps into jobs, ``snapshot`` freezes the code a job runs, ``task`` is
what every Slurm task runs, ``submission`` puts it together."""
from pixelbert_dist.jobs.options import SubmitConfig, SubmitError
from pixelbert_dist.jobs.submission import submit

__all__ = ["SubmitConfig", "SubmitError", "submit"]
