import pytest
import torch
from _model_helpers import left_pad, make_model, prompt_ids, tiny_model_config

from vlmkit.infer.generate import sample_next


@pytest.fixture(scope="module")
def setup():
    # a larger init range gives peaked, varied logits (a 0.02 init repeats one token forever)
    model, tok = make_model(seed=0, cfg=tiny_model_config(initializer_range=0.2))
    rows = [prompt_ids(model, [1, 2, 3], 1), prompt_ids(model, [4, 5], 1), prompt_ids(model, [7, 8, 9, 10, 11], 0)]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ids, mask = left_pad(rows)
    return model, rows, images, ids, mask


def test_cached_equals_uncached_and_single_rows(setup):
    model, rows, images, ids, mask = setup
    cached = model.generate(ids, mask, images, max_new_tokens=12)
    uncached = model.generate(ids, mask, images, max_new_tokens=12, use_cache=False)
    assert cached == uncached
    assert all(len(r) == 12 for r in cached)
    assert len({tuple(r) for r in cached}) == 3 and len(set(cached[0])) > 3  # not degenerate
    images_of = [images[0:1], images[1:2], None]
    for r, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), images_of[r], max_new_tokens=12)
        assert alone[0] == cached[r], r


def test_stop_tokens_end_rows_independently(setup):
    model, rows, images, ids, mask = setup
    full = model.generate(ids, mask, images, max_new_tokens=10)
    stop = full[0][3]  # row 0 stops at its 4th token
    assert stop not in full[0][:3]
    got = model.generate(ids, mask, images, max_new_tokens=10, stop_token_ids=[stop])
    for r in range(3):
        expect = full[r][: full[r].index(stop)] if stop in full[r] else full[r]
        assert got[r] == expect, r
    assert got[0] == full[0][:3]
    assert any(len(g) == 10 for g in got)  # another row carried on after row 0 stopped


def test_all_rows_stopped_ends_early(setup):
    model, rows, images, ids, mask = setup
    full = model.generate(ids, mask, images, max_new_tokens=1)
    got = model.generate(ids, mask, images, max_new_tokens=50, stop_token_ids=[f[0] for f in full])
    assert got == [[], [], []]


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(setup):
    model, rows, images, ids, mask = setup

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(ids, mask, images, max_new_tokens=8, temperature=1.0, generator=g, **kw)

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    greedy = model.generate(ids, mask, images, max_new_tokens=8)
    assert sample(3, top_p=1e-6) == greedy
    assert first != greedy


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {0, 1}
    frac0 = (draws == 0).float().mean().item()
    assert abs(frac0 - 0.5 / 0.8) < 0.05  # renormalised within the nucleus
    assert torch.equal(sample_next(logits[:3]), torch.zeros(3, dtype=torch.long))


def test_right_padding_is_rejected(setup):
    model, *_ = setup
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, torch.tensor([[1, 1, 0]]))
