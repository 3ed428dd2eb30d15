import pytest

from latentlm_mcore.runtime.ranks import rank_and_world_from_env, tasks_on_this_node


@pytest.mark.parametrize("spec,node,want", [("8(x16)", 15, 8), ("2(x3),1", 3, 1), ("2(x3),1", 0, 2), ("4", 0, 4)])
def test_tasks_per_node_expansion(spec, node, want):
    assert tasks_on_this_node(spec, node) == want


def test_slurm_variables_become_torchrun_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # recorded, so the values set below are undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    assert rank_and_world_from_env() == (5, 8, 1)
    import os
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == \
        ("5", "8", "1", "4")


def test_default_rendezvous_keeps_what_the_launcher_set(monkeypatch):
    import os

    from latentlm_mcore.runtime.ranks import default_rendezvous

    monkeypatch.setenv("MASTER_ADDR", "node7")
    monkeypatch.setenv("MASTER_PORT", "")
    monkeypatch.delenv("MASTER_PORT")
    default_rendezvous()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("node7", "29500")


def test_become_world_of_one_forgets_the_launcher(monkeypatch):
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "3"}.items():
        monkeypatch.setenv(k, v)
    from latentlm_mcore.runtime.ranks import become_world_of_one

    become_world_of_one()
    assert rank_and_world_from_env() == (0, 1, 0)
