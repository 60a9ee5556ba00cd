"""Which process this is, from the launcher's variables: torchrun / accelerate (RANK, WORLD_SIZE, LOCAL_RANK)
and Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), torchrun's winning where both are set."""
import pytest

from shared.core import ranks
from shared.core.errors import ConfigError

SRUN = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}


def test_no_launcher_is_one_process():
    assert ranks.current({}) == ranks.Rank(0, 1, 0)


def test_torchrun_variables():
    assert ranks.current({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == ranks.Rank(3, 4, 1)


@pytest.mark.parametrize("procid, localid", [(0, 0), (5, 1), (7, 3)])
def test_srun_tasks_map_to_rank_world_and_local_rank(procid, localid):
    env = {**SRUN, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid)}
    got = ranks.current(env)
    assert got == ranks.Rank(procid, 8, localid) and got.main == (procid == 0)


def test_torchrun_inside_an_sbatch_job_wins_over_slurm():
    env = {**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}
    assert ranks.current(env) == ranks.Rank(2, 4, 2)


def test_the_sbatch_script_itself_is_one_process():
    """The batch script has SLURM_NTASKS and SLURM_PROCID=0 too, but no srun step: it must not wait for 7 more."""
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert ranks.current(env) == ranks.Rank(0, 1, 0)


def test_inconsistent_or_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="SLURM_PROCID=8 SLURM_NTASKS=8"):
        ranks.current({**SRUN, "SLURM_PROCID": "8"})
    with pytest.raises(ConfigError, match="SLURM_LOCALID='x'"):
        ranks.current({**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "x"})
