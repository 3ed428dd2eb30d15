"""Which samples each optimizer step consumed (`--log-sample-ids`): `<save>/sample_ids.jsonl`.

The global batch of step i is the sequences [(i-1)·B, i·B) of the loader's global stream under any layout
(`data/loader/packed.py`), and every rank lays out every sequence, so the logging rank (global rank 0)
writes all of them: one record per step with, per sequence, its global index, the DP rank that trained it
and its document pieces [global document index, streaming sample id, start, end).

The file is appended to across restarts, never rewritten: a run that dies after its last checkpoint has
logged steps that the resumed run redoes. Each record names the iteration its process resumed from
(`resumed_from`) and whether the step ended in a checkpoint; `committed_steps` keeps, per iteration, the
record of the last process that ran it (a redone step replaces the steps lost with the dead process).
"""
from __future__ import annotations

import json
import os

FILE_NAME = "sample_ids.jsonl"


class SampleIdLog:
    """Appends one record per step to `<save>/sample_ids.jsonl` (the logging rank only)."""

    def __init__(self, save: str, resumed_from: int, dp_size: int):
        os.makedirs(save, exist_ok=True)
        self.path, self.resumed_from, self.dp_size = os.path.join(save, FILE_NAME), resumed_from, dp_size

    def write(self, iteration: int, sequences: list[dict], losses: dict, checkpoint: bool) -> None:
        record = {"iteration": iteration, "resumed_from": self.resumed_from, "dp_size": self.dp_size,
                  "checkpoint": checkpoint, **losses, "sequences": sequences}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_records(save: str) -> list[dict]:
    with open(os.path.join(save, FILE_NAME)) as f:
        return [json.loads(line) for line in f if line.strip()]


def committed_steps(save: str) -> tuple[dict, list[dict]]:
    """({iteration: record} of the process that ran each step last, the records those replaced: steps
    redone after a restart from an earlier checkpoint)."""
    kept, replaced = {}, []
    for record in read_records(save):
        if record["iteration"] in kept:
            replaced.append(kept[record["iteration"]])
        kept[record["iteration"]] = record
    return dict(sorted(kept.items())), replaced
