import math

import pytest
import torch

from latentlm_mcore.runtime.schedule import set_lr, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    f = lambda step: warmup_cosine(step, warmup_steps=10, total_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_set_lr_keeps_each_groups_scale():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr_scale": 0.25}, {"params": [b]}], lr=1.0)
    set_lr([opt], 0.4)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.4)]
