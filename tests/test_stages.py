import math

import pytest
import torch

from helpers_train import ToyVLM
from vlmkit.config import ConfigError, StageConfig
from vlmkit.train.stages import build_optimizer, lr_at, param_groups, select_trainable


def test_select_by_part_and_glob_freezes_the_rest():
    model = ToyVLM()
    sel = select_trainable(model, ["connector", "llm.head.*"])
    assert [n for n, _ in sel["connector"]] == ["connector.0.weight", "connector.0.bias", "connector.2.weight", "connector.2.bias"]
    assert [n for n, _ in sel["llm.head.*"]] == ["llm.head.weight", "llm.head.bias"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for e in sel.values() for n, _ in e}
    assert not model.vision.weight.requires_grad and not model.llm["embed"].weight.requires_grad


def test_overlap_goes_to_first_entry_and_reselection_unfreezes():
    model = ToyVLM()
    select_trainable(model, ["vision"])
    sel = select_trainable(model, ["llm.head.*", "llm"])
    assert [n for n, _ in sel["llm.head.*"]] == ["llm.head.weight", "llm.head.bias"]
    assert "llm.head.weight" not in [n for n, _ in sel["llm"]]
    assert "llm.embed.weight" in [n for n, _ in sel["llm"]]
    assert not model.vision.weight.requires_grad


def test_entry_matching_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="llm.layers.*"):
        select_trainable(ToyVLM(), ["connector", "llm.layers.*"])


def test_param_groups_decay_only_matrices_and_per_entry_lr():
    model = ToyVLM()
    sel = select_trainable(model, ["connector", "llm"])
    groups = param_groups(sel, {"connector": 1e-3, "llm": 1e-4}, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"connector", "connector/no_decay", "llm", "llm/no_decay"}
    assert by_name["connector"]["lr"] == 1e-3 and by_name["llm/no_decay"]["lr"] == 1e-4
    assert all(p.ndim >= 2 for p in by_name["llm"]["params"]) and by_name["llm"]["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in by_name["llm/no_decay"]["params"]) and by_name["llm/no_decay"]["weight_decay"] == 0.0
    assert model.llm["embed"].weight in by_name["llm"]["params"]  # embeddings decay (ndim 2)
    with pytest.raises(ConfigError, match="llm"):
        param_groups(sel, {"connector": 1e-3}, 0.0)


def test_weight_decay_per_entry():
    sel = select_trainable(ToyVLM(), ["connector", "llm"])
    groups = {g["name"]: g for g in param_groups(sel, 1e-3, weight_decay={"llm": 0.05})}
    assert groups["llm"]["weight_decay"] == 0.05 and groups["connector"]["weight_decay"] == 0.0
    assert groups["llm/no_decay"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="not in trainable"):
        StageConfig(name="s", data={"a": 1.0}, trainable=["llm"], lr=1e-3, steps=1, weight_decay={"vision": 0.1})


def test_lr_schedule_warmup_cosine_constant():
    assert lr_at(0, 10, 2, "cosine", 0.1) == pytest.approx(0.5)
    assert lr_at(1, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(2, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(9, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    mid = lr_at(2 + 7 / 2, 10, 2, "cosine", 0.0)
    assert mid == pytest.approx(0.5)
    values = [lr_at(s, 10, 2, "cosine", 0.1) for s in range(2, 10)]
    assert values == sorted(values, reverse=True)
    assert lr_at(7, 10, 0, "constant", 0.1) == 1.0
    assert lr_at(0, 1, 0, "cosine", 0.1) == 1.0  # a one-step stage runs at full rate


def test_build_optimizer_applies_schedule_per_group():
    model = ToyVLM()
    stage = StageConfig(name="s", data={"a": 1.0}, trainable=["connector", "llm"], lr={"connector": 1e-2, "llm": 1e-3},
                        steps=4, warmup_steps=2, min_lr_ratio=0.0)
    opt, sched, _ = build_optimizer(model, stage, total_steps=4)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups if g["name"] == "connector"] == [pytest.approx(5e-3)]
    opt.step(); sched.step()
    assert {g["name"]: g["lr"] for g in opt.param_groups}["llm"] == pytest.approx(1e-3)
    opt.step(); sched.step(); opt.step(); sched.step()
    assert {g["name"]: g["lr"] for g in opt.param_groups}["llm"] == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(lr_at(2, 4, 2, "cosine", 0.0), 1.0)


def test_build_optimizer_is_fused_on_cpu_and_steps_as_the_for_loop_does():
    """PyTorch defaults to its slow per-tensor AdamW on CPU; the stage optimizer asks for the fused
    kernel, which must take the same steps (the same state keys, so checkpoints and resume hold)."""
    stage = StageConfig(name="s", data={"a": 1.0}, trainable=["connector", "llm"], lr=1e-2, steps=3,
                        weight_decay=0.1)  # fmt: skip
    torch.manual_seed(0)
    fused_model = ToyVLM()
    plain_model = ToyVLM()
    plain_model.load_state_dict(fused_model.state_dict())
    fused_opt, _, _ = build_optimizer(fused_model, stage, total_steps=3)
    assert fused_opt.defaults["fused"] is True
    groups = [{k: v for k, v in g.items()} for g in build_optimizer(plain_model, stage, total_steps=3)[0].param_groups]
    for g in groups:
        g["fused"], g["foreach"] = False, False
    plain_opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        for model, opt in ((fused_model, fused_opt), (plain_model, plain_opt)):
            opt.zero_grad()
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            model.connector(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b)
    assert set(fused_opt.state_dict()["state"][0]) == set(plain_opt.state_dict()["state"][0])


def test_fused_adamw_is_not_asked_for_where_pytorch_has_no_fused_kernel():
    from vlmkit.train.stages import fused_adamw_supported

    assert fused_adamw_supported([{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    assert not fused_adamw_supported([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}])
    assert not fused_adamw_supported([{"params": []}])
