import json
from collections import Counter

import pytest

from vlmkit.data.mixture import MixtureSampler


def test_proportions_match_weights():
    m = MixtureSampler({"a": 50, "b": 30, "c": 10}, {"a": 3.0, "b": 1.0, "c": 0.0}, seed=1)
    counts = Counter(m.next()[0] for _ in range(8000))
    assert set(counts) == {"a", "b"}
    assert counts["a"] / 8000 == pytest.approx(0.75, abs=0.02)
    assert len(m) == 80  # the zero-weight source is not part of the mixture


def test_every_item_once_per_epoch():
    m = MixtureSampler({"a": 7, "b": 5}, {"a": 1.0, "b": 1.0}, seed=3)
    seen = {"a": [], "b": []}
    while len(seen["a"]) < 21 or len(seen["b"]) < 15:
        s, i = m.next()
        seen[s].append(i)
    for name, size in (("a", 7), ("b", 5)):
        epochs = [seen[name][k * size:(k + 1) * size] for k in range(3)]
        assert all(sorted(e) == list(range(size)) for e in epochs)
        assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled per epoch


def test_resume_gives_identical_continuation():
    a = MixtureSampler({"x": 9, "y": 4}, {"x": 0.6, "y": 0.4}, seed=7)
    for _ in range(23):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next() for _ in range(40)]
    b = MixtureSampler({"x": 9, "y": 4}, {"x": 0.6, "y": 0.4}, seed=7)
    b.load_state_dict(state)
    assert [b.next() for _ in range(40)] == expected


def test_source_is_a_function_of_seed_and_draw():
    a = MixtureSampler({"x": 9, "y": 4}, {"x": 0.5, "y": 0.5}, seed=7)
    b = MixtureSampler({"x": 100, "y": 3}, {"x": 0.5, "y": 0.5}, seed=7)
    c = MixtureSampler({"x": 9, "y": 4}, {"x": 0.5, "y": 0.5}, seed=8)
    sa = [a.next()[0] for _ in range(50)]
    assert sa == [b.next()[0] for _ in range(50)] == [a.source_at(k) for k in range(50)]
    assert sa != [c.next()[0] for _ in range(50)]


def test_bad_configs_and_mismatched_state():
    with pytest.raises(ValueError, match="unknown"):
        MixtureSampler({"x": 3}, {"x": 1.0, "z": 1.0}, seed=0)
    with pytest.raises(ValueError, match="no samples"):
        MixtureSampler({"x": 0}, {"x": 1.0}, seed=0)
    state = MixtureSampler({"x": 3}, {"x": 1.0}, seed=0).state_dict()
    with pytest.raises(ValueError, match="size"):
        MixtureSampler({"x": 4}, {"x": 1.0}, seed=0).load_state_dict(state)
