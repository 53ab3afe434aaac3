"""The launcher's world (`nemo_tiedlora.nemo.cluster`) against Lightning's own choice and the launchers' variables.

Each case sets exactly the variables a launcher gives a process (srun: SLURM_*, torchrun: its rendezvous variables)
in a clean environment. The reference for which cluster environment applies is a real Lightning Trainer built in
the same environment (the one NeMo's trainer builder uses); ranks and addresses are the launcher's variables.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

SRUN_2x2_RANK3 = {  # srun -N2 --ntasks-per-node=2, the second task on the second node (job 4711)
    "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_JOB_ID": "4711", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "gpu-node[17-18]",
    "SLURM_JOB_NODELIST": "gpu-node[17-18]",
}
TORCHRUN_2x2_RANK2 = {  # torchrun --nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d, first rank of node 2
    "TORCHELASTIC_RUN_ID": "none", "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
}
LAUNCH_VARIABLES = ("SLURM_", "TORCHELASTIC_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_",
                    "MASTER_", "NODE_RANK", "OMPI_", "PMI_", "LSB_", "JSM_")


@pytest.fixture
def launched(monkeypatch):
    """Start from an environment no launcher touched; returns a setter for one launcher's variables. Afterwards the
    whole environment is as before the test (monkeypatch's own undo runs after this restores it)."""
    import os

    from nemo_tiedlora.nemo import cluster

    for name in list(os.environ):
        if name.startswith(LAUNCH_VARIABLES):
            monkeypatch.delenv(name)
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)  # Lightning's "srun exists but unused" hint
    cluster.forget()

    def set_variables(variables: dict) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    before = dict(os.environ)
    yield set_variables
    cluster.forget()
    # what the code under test wrote itself (Lightning's SLURM environment sets MASTER_ADDR/MASTER_PORT, the run
    # folder rule NEMO_EXPM_VERSION) must not reach later tests' child processes: back to the environment as it was
    os.environ.clear()
    os.environ.update(before)


def _trainer_environment(devices: int, num_nodes: int):
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.strategy.cluster_environment


@pytest.mark.parametrize("variables,devices,num_nodes", [
    ({}, 1, 1), (SRUN_2x2_RANK3, 2, 2), (TORCHRUN_2x2_RANK2, 2, 2),
    ({**SRUN_2x2_RANK3, **TORCHRUN_2x2_RANK2}, 2, 2),  # torchrun inside a SLURM allocation: torchrun's world
], ids=["none", "srun", "torchrun", "torchrun_in_slurm"])
def test_environment_is_the_one_lightning_chooses(launched, variables, devices, num_nodes):
    """Without a recorded trainer, the environment chosen from the process's variables is the same kind the
    Trainer chooses in that environment (torchrun before SLURM, then LSF, MPI, else Lightning's own)."""
    from nemo_tiedlora.nemo import cluster

    launched(variables)
    assert type(cluster.environment()) is type(_trainer_environment(devices, num_nodes))


def test_srun_world_comes_from_slurm_variables(launched):
    """Under srun: rank, local rank, node rank, size and node count are SLURM's; the rendezvous is the first host of
    the job's node list and a port from the job id (Lightning's rule), never 127.0.0.1:29500."""
    from nemo_tiedlora.nemo import cluster

    launched(SRUN_2x2_RANK3)
    world = cluster.world()
    assert (world.launcher, world.world_size, world.global_rank, world.local_rank, world.node_rank,
            world.num_nodes, world.external) == ("SLURM", 4, 3, 1, 1, 2, True)
    address, port = cluster.environment().main_address, cluster.environment().main_port
    assert (address, port) == ("gpu-node17", 15000 + 4711)


def test_torchrun_across_nodes_world(launched):
    """Under a two-node torchrun: the world is torchrun's and the rendezvous is its MASTER_ADDR:MASTER_PORT."""
    from nemo_tiedlora.nemo import cluster

    launched(TORCHRUN_2x2_RANK2)
    world = cluster.world()
    assert (world.launcher, world.world_size, world.global_rank, world.local_rank, world.node_rank,
            world.num_nodes) == ("torchrun", 4, 2, 0, 1, 2)
    assert world.rendezvous() == ("10.0.0.1", 29400)


def test_loopback_rendezvous_refused_on_a_second_node(launched):
    """A rank on node 2 whose rendezvous address is loopback would dial itself: refused with one line naming
    MASTER_ADDR and the fix; the same address on node 1 (where the store runs) is accepted."""
    from nemo_tiedlora.core.errors import TiedLoraConfigError
    from nemo_tiedlora.nemo import cluster

    launched({**TORCHRUN_2x2_RANK2, "MASTER_ADDR": "127.0.0.1"})
    with pytest.raises(TiedLoraConfigError, match=r"loopback address on node 1: set MASTER_ADDR to the first node"):
        cluster.world().rendezvous()
    launched({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"})
    assert cluster.world().rendezvous() == ("127.0.0.1", 29400)


@pytest.mark.parametrize("variables,trainer,message", [
    (SRUN_2x2_RANK3, {"num_nodes": 1, "devices": 2},
     r"SLURM started 4 tasks on 2 node\(s\) .* but the trainer asks for trainer.num_nodes=1 x trainer.devices=2 = 2 "
     r"processes: run srun -N1 --ntasks-per-node=2, or set trainer.num_nodes=2 trainer.devices=2$"),
    (SRUN_2x2_RANK3, {"num_nodes": 2, "devices": 8}, r"set trainer.num_nodes=2 trainer.devices=2$"),
    ({**SRUN_2x2_RANK3, "SLURM_NTASKS": "3", "SLURM_NTASKS_PER_NODE": "2,1", "SLURM_TASKS_PER_NODE": "2,1"},
     {"num_nodes": 2, "devices": 2},
     r"tasks per node 2,1\).*--ntasks-per-node=2 \(every node the same number of tasks\)$"),
    (TORCHRUN_2x2_RANK2, {"num_nodes": 1, "devices": 2},
     r"torchrun started 4 processes \(2 on this node\) but the trainer asks for trainer.num_nodes=1"),
], ids=["srun_nodes", "srun_devices", "srun_uneven", "torchrun_nodes"])
def test_launcher_mismatch_is_one_line(launched, variables, trainer, message):
    """srun's / torchrun's process counts that differ from trainer.num_nodes x trainer.devices are refused with one
    line naming both and the fix (before any process group: the check reads only variables)."""
    from nemo_tiedlora.core.errors import TiedLoraConfigError
    from nemo_tiedlora.nemo.cluster import check_launch

    launched(variables)
    with pytest.raises(TiedLoraConfigError, match=message) as error:
        check_launch(trainer)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("variables", [SRUN_2x2_RANK3, TORCHRUN_2x2_RANK2, {}], ids=["srun", "torchrun", "none"])
def test_matching_launch_accepted(launched, variables):
    """The launch the README shows (2 nodes x 2 processes with trainer.num_nodes=2 trainer.devices=2) passes; so
    does a single process that nothing launched."""
    from nemo_tiedlora.nemo.cluster import check_launch

    launched(variables)
    check_launch({"num_nodes": 2, "devices": 2} if variables else {"num_nodes": 1, "devices": 1})


def test_interactive_slurm_shell_is_not_a_launch(launched):
    """Inside `srun --pty bash` (job name bash) the SLURM variables describe the shell, not the training job:
    Lightning does not take SLURM as the launcher there, and neither does the check."""
    from nemo_tiedlora.nemo import cluster

    launched({**SRUN_2x2_RANK3, "SLURM_JOB_NAME": "bash"})
    cluster.check_launch({"num_nodes": 1, "devices": 1})
    assert cluster.world().launcher == "none"


@pytest.mark.parametrize("variables,manager,expected", [
    (SRUN_2x2_RANK3, {"resume_if_exists": False}, "slurm-4711"),
    ({**SRUN_2x2_RANK3, "SLURM_STEP_ID": "0"}, {"resume_if_exists": False}, "slurm-4711.0"),
    ({**TORCHRUN_2x2_RANK2, "TORCHELASTIC_RUN_ID": "ft-42"}, {"resume_if_exists": False}, "torchrun-ft-42"),
    (TORCHRUN_2x2_RANK2, {"resume_if_exists": False}, None),  # torchrun's default --rdzv_id: nothing shared
    (SRUN_2x2_RANK3, {"resume_if_exists": True}, None),  # NeMo makes no version folder
    (SRUN_2x2_RANK3, {"resume_if_exists": False, "version": "mine"}, None),
], ids=["srun", "srun_step", "torchrun_rdzv_id", "torchrun_default_id", "resume", "explicit_version"])
def test_every_rank_gets_the_same_run_folder(launched, monkeypatch, variables, manager, expected):
    """Without resume_if_exists NeMo names the run folder on rank 0 only (the time): a launched job's ranks get one
    name from what they share (SLURM's job/step id, torchrun's --rdzv_id), and nothing is set where NeMo already
    agrees (resume_if_exists, an explicit version)."""
    import os

    from nemo_tiedlora.nemo.cluster import VERSION_ENV, share_run_folder

    monkeypatch.delenv(VERSION_ENV, raising=False)
    launched(variables)
    share_run_folder(manager)
    assert os.environ.get(VERSION_ENV) == expected


def test_the_entry_scripts_trainer_is_used_while_it_lives(launched):
    """After `remember(trainer)` the world is the trainer's own cluster environment (the object Lightning chose, node
    count from the trainer); once that trainer is gone, the choice is made afresh from the process's variables."""
    import gc

    from nemo_tiedlora.nemo import cluster

    launched(SRUN_2x2_RANK3)
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    cluster.remember(trainer)
    assert cluster.environment() is trainer.strategy.cluster_environment
    assert cluster.world().num_nodes == 2
    launched({"SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1"})  # variables change; the trainer's world does not
    assert cluster.world().num_nodes == 2
    del trainer
    gc.collect()
    assert cluster.environment() is not None and cluster.world().num_nodes == 1
