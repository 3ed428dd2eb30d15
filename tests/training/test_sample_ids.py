"""--log-sample-ids: <save>/sample_ids.jsonl names the global sequences and document pieces of every step;
checked against the loader's own global stream (a PackedLoader at DP=1 reading the same dataset)."""
import pytest

from latentlm_mcore.training.sample_ids import committed_steps
from tests.conftest import REPO, run_torchrun

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")


def test_the_log_names_the_sequences_of_each_step_as_the_loader_lays_them_out(tiny_dataset, tmp_path):
    from latentlm_mcore.config import get_preset
    from latentlm_mcore.data.loader.mixture import MixtureConfig, StreamMixture
    from latentlm_mcore.data.loader.packed import LoaderConfig, PackedLoader

    save, steps, batch = tmp_path / "run", 3, 4
    run_torchrun(REPO / "pretrain" / "pretrain_latentlm.py", 2, [
        "--preset", "tiny", "--data", str(tiny_dataset), "--save", str(save), "--train.train-steps", steps,
        "--train.warmup-steps", 1, "--train.global-batch-size", batch, "--train.micro-batch-size", 1,
        "--parallel.tensor-parallel", 1, "--log-interval", 1, "--save-interval", 2, "--num-workers", 0,
        "--tensorboard", "false", "--log-sample-ids", "true"], tmp_path)
    committed, replaced = committed_steps(save)
    assert sorted(committed) == [1, 2, 3] and replaced == []
    assert [r["checkpoint"] for r in committed.values()] == [False, True, True]
    got = [q for r in committed.values() for q in r["sequences"]]
    assert [q["index"] for q in got] == list(range(steps * batch))
    assert [q["dp_rank"] for q in got] == [0, 1] * (steps * batch // 2)  # DP=2, micro-batch 1

    loader = PackedLoader(StreamMixture(MixtureConfig(dataset_root=str(tiny_dataset), seed=get_preset("tiny").train.seed)),
                          LoaderConfig(seq_length=get_preset("tiny").model.seq_length, micro_batch_size=1))
    loader.take_consumed()
    it = iter(loader)
    for _ in range(steps * batch):
        next(it)
    assert [dict(q, dp_rank=0) for q in got] == loader.take_consumed()
