import json
import os

import pytest
import torch

from latentlm_mcore.runtime.files import atomic_torch_save, atomic_write, write_json_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_content_and_no_debris(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"step": 1})
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(path) as f:
            f.write('{"step": 2, "half')
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]
    with pytest.raises(AttributeError):  # torch cannot pickle a lambda: the old file survives that too
        atomic_torch_save({"f": lambda: None}, tmp_path / "state.json")
    assert json.loads(path.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["state.json"]


def test_a_completed_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "latest"
    write_text_atomic(path, "iter_0000001\n")
    write_text_atomic(path, "iter_0000002\n")
    assert path.read_text() == "iter_0000002\n"
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "w.pt")
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], torch.arange(3))
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_write(path, "a"):
            pass
