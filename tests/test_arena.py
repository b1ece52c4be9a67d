"""vlmkit.eval.arena: online Elo, Bradley-Terry MLE, bootstrap intervals, the arena subcommand."""

import argparse
import json
import math

import numpy as np
import pytest

from vlmkit.eval.arena import (
    ArenaError,
    add_arena_parser,
    bootstrap_ratings,
    bradley_terry,
    elo_ratings,
    leaderboard,
    read_battles,
)


def battle(a, b, winner):
    return {"model_a": a, "model_b": b, "winner": winner}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def synthetic(n_models=5, n_battles=2000, seed=1, spread=0.5, tie_rate=0.1):
    """Battles drawn from a BT model whose strength rises with the model index."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_battles):
        a, b = rng.choice(n_models, 2, replace=False)
        p = 1.0 / (1.0 + math.exp(-spread * (a - b)))
        u = rng.random()
        w = "tie" if u < tie_rate else ("model_a" if u < tie_rate + (1 - tie_rate) * p else "model_b")
        out.append(battle(f"m{a}", f"m{b}", w))
    return out


# ---- Elo ------------------------------------------------------------------------------------

def test_elo_one_win_then_a_tie_by_hand():
    r = elo_ratings([battle("A", "B", "model_a")], k=4)
    assert r == pytest.approx({"A": 1002.0, "B": 998.0})
    # tie at 1002 vs 998: E_A = 1 / (1 + 10^(-4/400)) = 0.5057562...; A = 1002 + 4 (0.5 - E_A)
    e_a = 1.0 / (1.0 + 10 ** (-0.01))
    assert e_a == pytest.approx(0.50575620, abs=1e-8)
    r = elo_ratings([battle("A", "B", "model_a"), battle("A", "B", "tie")], k=4)
    assert r["A"] == pytest.approx(1002.0 + 4 * (0.5 - e_a), abs=1e-9)
    assert r["A"] == pytest.approx(1001.976975, abs=1e-6)
    assert r["B"] == pytest.approx(998.023025, abs=1e-6)
    assert r["A"] + r["B"] == pytest.approx(2000.0)  # Elo is zero-sum


def test_elo_order_sides_k_and_bothbad():
    # model_b winning from the b side is the mirror image; "tie (bothbad)" is a tie
    r = elo_ratings([battle("B", "A", "model_b")], k=32)
    assert r == pytest.approx({"A": 1016.0, "B": 984.0})
    assert elo_ratings([battle("A", "B", "tie (bothbad)")]) == pytest.approx({"A": 1000.0, "B": 1000.0})
    # online: order matters
    seq = [battle("A", "B", "model_a"), battle("A", "B", "model_b")]
    assert elo_ratings(seq)["A"] != pytest.approx(elo_ratings(seq[::-1])["A"], abs=1e-6)


# ---- Bradley-Terry --------------------------------------------------------------------------

THREE_OF_FOUR = [battle("A", "B", "model_a")] * 3 + [battle("A", "B", "model_b")]


def test_bt_three_wins_of_four_is_400_log10_3():
    exact = 400 * math.log10(3)  # 190.8485...
    r = bradley_terry(THREE_OF_FOUR, prior=0.0)  # a finite MLE exists: fit it exactly
    assert r["A"] - r["B"] == pytest.approx(exact, abs=1e-6)
    assert (r["A"] + r["B"]) / 2 == pytest.approx(1000.0)  # mean anchor
    r = bradley_terry(THREE_OF_FOUR)  # default tiny prior: shrinks the gap by ~0.013 points
    assert r["A"] - r["B"] == pytest.approx(exact, abs=0.05)
    assert r["A"] - r["B"] < exact


def test_bt_sides_do_not_matter_and_anchor():
    mirrored = [battle("B", "A", "model_b")] * 3 + [battle("B", "A", "model_a")]
    assert bradley_terry(mirrored) == pytest.approx(bradley_terry(THREE_OF_FOUR))
    r = bradley_terry(THREE_OF_FOUR, anchor="B", prior=0.0)
    assert r["B"] == pytest.approx(1000.0)
    assert r["A"] == pytest.approx(1000.0 + 400 * math.log10(3), abs=1e-6)
    with pytest.raises(ArenaError, match="anchor"):
        bradley_terry(THREE_OF_FOUR, anchor="nobody")


def test_bt_transitive_three_models():
    battles = ([battle("A", "B", "model_a")] * 3 + [battle("A", "B", "model_b")]
               + [battle("B", "C", "model_a")] * 3 + [battle("C", "B", "model_a")]
               + [battle("A", "C", "model_a")] * 4 + [battle("A", "C", "model_b")])
    r = bradley_terry(battles)
    assert r["A"] > r["B"] > r["C"]
    assert sum(r.values()) / 3 == pytest.approx(1000.0)


def test_bt_ties_are_half_a_win_each():
    # 2 wins + 2 ties of 4 is the same data as 3 wins of 4
    ties = [battle("A", "B", "model_a")] * 2 + [battle("A", "B", "tie"), battle("B", "A", "tie (bothbad)")]
    r = bradley_terry(ties, prior=0.0)
    assert r["A"] - r["B"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    r = bradley_terry([battle("A", "B", "tie")] * 5)
    assert r["A"] == pytest.approx(r["B"])


def test_bt_never_winning_model_is_finite_with_the_prior():
    # A never loses, C never wins: no finite MLE for either without the prior
    battles = ([battle("A", "B", "model_a")] * 5 + [battle("A", "C", "model_a"), battle("B", "C", "tie")]
               + [battle("B", "C", "model_a")] * 2)
    r = bradley_terry(battles)
    assert all(math.isfinite(v) for v in r.values())
    assert r["A"] > r["B"] > r["C"]
    with pytest.raises(ArenaError, match="prior"):
        bradley_terry(battles, prior=0.0)


def test_bt_recovers_a_synthetic_order():
    r = bradley_terry(synthetic(n_battles=3000))
    assert sorted(r, key=r.get) == ["m0", "m1", "m2", "m3", "m4"]
    # true spacing: 0.5 nats = 400/ln10 * 0.5 ≈ 86.9 points
    gaps = np.diff([r[f"m{i}"] for i in range(5)])
    assert np.all(np.abs(gaps - 86.86) < 30)


# ---- bootstrap / leaderboard ----------------------------------------------------------------

def test_leaderboard_intervals_contain_the_estimate_and_are_seeded():
    battles = synthetic(n_battles=800)
    rows = leaderboard(battles, n_bootstrap=200, seed=3)
    assert [r["model"] for r in rows] == ["m4", "m3", "m2", "m1", "m0"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert r["ci_low"] < r["rating"] < r["ci_high"]
        assert r["battles"] == r["wins"] + r["losses"] + r["ties"]
        assert 0.0 <= r["win_rate"] <= 1.0
        assert 1 <= r["rank_ci"] <= r["rank"]
    assert sum(r["battles"] for r in rows) == 2 * len(battles)
    assert leaderboard(battles, n_bootstrap=200, seed=3) == rows
    other = leaderboard(battles, n_bootstrap=200, seed=4)
    assert [r["ci_low"] for r in other] != [r["ci_low"] for r in rows]
    assert [r["rating"] for r in other] == [r["rating"] for r in rows]  # the point fit has no randomness
    assert {r["model"]: r["elo"] for r in rows} == pytest.approx(elo_ratings(battles))


def test_bootstrap_shapes_and_no_bootstrap():
    models, boot = bootstrap_ratings(THREE_OF_FOUR * 3, n_bootstrap=50, seed=0, anchor="B")
    assert models == ["A", "B"] and boot.shape == (50, 2)
    assert np.allclose(boot[:, 1], 1000.0)
    rows = leaderboard(THREE_OF_FOUR, n_bootstrap=0)
    assert rows[0]["model"] == "A" and rows[0]["ci_low"] is None and rows[0]["rank_ci"] == 1
    assert rows[0]["win_rate"] == pytest.approx(0.75)


# ---- reading --------------------------------------------------------------------------------

def test_read_battles_names_and_counts_malformed_lines(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [
        battle("A", "B", "model_a"),
        "{not json",
        battle("A", "B", "draw"),
        {"model_a": "A", "winner": "tie"},
        "",
        battle("A", "A", "tie"),
        battle("A", "B", "Tie (bothbad)"),
        "[1, 2]",
    ])
    battles = read_battles(path)
    assert battles == [battle("A", "B", "model_a"), battle("A", "B", "tie (bothbad)")]
    assert [ln for ln, _ in battles.malformed] == [2, 3, 4, 6, 8]
    reasons = dict(battles.malformed)
    assert "JSON" in reasons[2] and "draw" in reasons[3] and "model_b" in reasons[4]


def test_read_battles_without_a_valid_battle_is_an_error(tmp_path):
    with pytest.raises(ArenaError, match="no valid battle"):
        read_battles(write_jsonl(tmp_path / "b.jsonl", ["oops", battle("A", "B", "A wins")]))
    with pytest.raises(ArenaError, match="no valid battle"):
        read_battles(write_jsonl(tmp_path / "e.jsonl", []))


# ---- the subcommand -------------------------------------------------------------------------

def make_parser():
    p = argparse.ArgumentParser(prog="vlmkit")
    add_arena_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_arena_subcommand_writes_the_leaderboard(tmp_path, capsys):
    path = write_jsonl(tmp_path / "b.jsonl", synthetic(n_models=3, n_battles=300) + ["garbage"])
    out = tmp_path / "lb"
    args = make_parser().parse_args(["arena", str(path), "--out", str(out), "--bootstrap", "50", "--seed", "7"])
    assert (args.k, args.bootstrap, args.seed, args.anchor) == (4.0, 50, 7, None)
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "BT rating" in captured.out and "m2" in captured.out
    assert "b.jsonl:301" in captured.err
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["battles"] == 300 and data["malformed"][0]["line"] == 301
    assert data["settings"]["seed"] == 7 and data["settings"]["k"] == 4.0
    assert [r["model"] for r in data["leaderboard"]] == ["m2", "m1", "m0"]
    assert data["leaderboard"] == leaderboard(read_battles(path), n_bootstrap=50, seed=7)
    md = (out / "leaderboard.md").read_text()
    assert "| rank |" in md and "| m2 |" in md
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_arena_subcommand_errors_cleanly(tmp_path, capsys):
    path = write_jsonl(tmp_path / "b.jsonl", ["nothing valid"])
    args = make_parser().parse_args(["arena", str(path), "--k", "8", "--anchor", "x"])
    assert args.k == 8.0 and args.anchor == "x"
    assert args.func(args) == 2
    assert "no valid battle" in capsys.readouterr().err
    args = make_parser().parse_args(["arena", str(tmp_path / "missing.jsonl")])
    assert args.func(args) == 2


def test_vlmkit_arena_through_the_real_cli(tmp_path):
    from vlmkit.cli import main

    battles = tmp_path / "b.jsonl"
    battles.write_text("".join(json.dumps({"model_a": "x", "model_b": "y", "winner": w}) + "\n"
                               for w in ["model_a", "model_a", "model_b", "tie"]))  # fmt: skip
    assert main(["arena", str(battles), "--out", str(tmp_path / "lb"), "--bootstrap", "20"]) == 0
    rows = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())["leaderboard"]
    assert [r["model"] for r in rows] == ["x", "y"]
