"""One record, three sinks: what `MetricsLogger.log` prints, appends to metrics.jsonl and writes to
TensorBoard agree (TensorBoard read back with its own event reader)."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from latentlm_mcore.runtime.metrics import MetricsLogger


def test_one_record_reaches_console_jsonl_and_tensorboard(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), total_iterations=10, tensorboard=True,
                           summary=lambda split, m: f"loss {m['loss']:.3f}")
    logger.log(5, {"loss": 0.25, "lm_loss": 1.5, "mfu": None})
    logger.log(5, {"loss": 0.5, "psnr": 20.0}, split="eval")
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("iter 5/10 (50.0%) | loss 0.250 | ETA ") and lines[1] == "[eval] iter 5 | loss 0.500"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"iteration": 5, "split": "train", "loss": 0.25, "lm_loss": 1.5, "mfu": None},
                       {"iteration": 5, "split": "eval", "loss": 0.5, "psnr": 20.0}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/loss", "eval/psnr", "train/lm_loss", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/lm_loss")] == [(5, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/psnr")] == [(5, 20.0)]


def test_resume_drops_records_past_the_resumed_iteration_and_keys_are_single_words(tmp_path):
    first = MetricsLogger(str(tmp_path), total_iterations=10, tensorboard=False)
    for it in (2, 4, 6):
        first.log(it, {"loss": float(it)})
    resumed = MetricsLogger(str(tmp_path), total_iterations=10, start_iteration=4, tensorboard=False)
    assert [r["iteration"] for r in resumed.records()] == [2, 4]
    with pytest.raises(ValueError, match="single words.*'lm loss'"):
        resumed.log(5, {"lm loss": 1.0})
    with pytest.raises(ValueError, match="train/loss"):
        resumed.log(5, {"train/loss": 1.0})
    resumed.log(6, {"loss": 1.0})
    assert resumed.plot(("loss",)).endswith("loss_curve.png") and (tmp_path / "loss_curve.png").stat().st_size > 0
