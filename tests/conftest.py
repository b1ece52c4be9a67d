"""Session fixtures: one tiny shapes world and one tiny trained run, shared by the end-to-end tests."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)

TINY_WORLD = dict(n_train=24, n_test=6, seed=3, size=64)


def tiny_recipe_dict(steps: int = 3) -> dict:
    """shapes-tiny's structure (three stages, different trainable parts) at test size."""
    stage = dict(batch_size=4, steps=steps, warmup_steps=1, max_seq_len=256, log_every=1)
    return {
        "name": "tiny-test",
        "seed": 0,
        "model": {
            "vision": {"name": "tiny-cnn", "image_size": 64},
            "connector": {"type": "mlp2x_gelu"},
            "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2, "hidden_size": 64,
                                                         "intermediate_size": 128}},
            "tokenizer": "tiny",
            "tokenizer_vocab_size": 400,
        },
        "data": {
            "text": {"path": "train.json", "tasks": ["text"]},
            "captions": {"path": "train.json", "tasks": ["caption"]},
            "instruct": {"path": "train.json", "tasks": ["vqa", "pope", "grounding"]},
        },
        "stages": [
            {"name": "lm_warmup", "data": {"text": 1.0}, "trainable": ["llm"], "lr": {"llm": 3e-3}, **stage},
            {"name": "align", "data": {"captions": 1.0}, "trainable": ["vision", "connector"],
             "lr": {"vision": 2e-3, "connector": 2e-3}, **stage},
            {"name": "instruct", "data": {"instruct": 0.8, "text": 0.2}, "trainable": ["vision", "connector", "llm"],
             "lr": 1e-3, "grad_accum": 2, **stage},
        ],
        "eval": {"batch_size": 8, "max_new_tokens": 12},
    }


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from vlmkit.data.worlds.shapes import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, **TINY_WORLD)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_world, tmp_path_factory):
    """A trained tiny run directory (all three stages)."""
    from vlmkit.config import recipe_from_dict
    from vlmkit.train.run import train

    out = tmp_path_factory.mktemp("run")
    final = train(recipe_from_dict(tiny_recipe_dict()), data_dir=tiny_world, out_dir=out)
    return out, final


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread. On a shared 2-core machine two OpenMP threads wait on
    each other's barriers and a step can take 10-100x longer; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
