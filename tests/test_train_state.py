import json
import random

import numpy as np
import torch

from helpers_train import ToyVLM
from vlmkit.train.state import load_training_state, save_training_state


def _setup(seed):
    model = ToyVLM(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _steps(model, opt, sched, n):
    for _ in range(n):
        ids = torch.randint(0, 10, (3, 6))  # the data comes from the RNG too
        out = model(ids, torch.ones_like(ids), torch.randn(3, 4), labels=ids)
        (out.loss_sum / out.n_targets).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_adamw_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model, opt, sched = _setup(0)
    _steps(model, opt, sched, 3)
    progress = {"global_step": 3, "stage_index": 0}
    save_training_state(tmp_path / "ts", opt, sched, progress, mixture={"draws": 9}, model=model)
    py_next, np_next = random.random(), np.random.rand()
    _steps(model, opt, sched, 3)
    expected = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(123)  # scramble everything the state must restore
    random.seed(5)
    np.random.seed(5)
    model2, opt2, sched2 = _setup(seed=99)
    info = load_training_state(tmp_path / "ts", model2, opt2, sched2)
    assert info == {"progress": progress, "mixture": {"draws": 9}}
    assert (random.random(), np.random.rand()) == (py_next, np_next)
    _steps(model2, opt2, sched2, 3)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_files_are_json_and_safetensors_only(tmp_path):
    model, opt, sched = _setup(0)
    _steps(model, opt, sched, 1)
    d = save_training_state(tmp_path / "ts", opt, sched, {"global_step": 1})
    assert sorted(p.name for p in d.iterdir()) == ["optimizer.json", "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((d / "state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 1
