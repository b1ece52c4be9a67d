"""A leaderboard from pairwise battles, as the Chatbot Arena / WildVision arena show it.

Online Elo (in file order), a Bradley-Terry maximum-likelihood fit (Newton's method, numpy only),
and percentile-bootstrap 95% intervals for the Bradley-Terry ratings. See docs/arena.md.

    battles = read_battles("battles.jsonl")
    rows = leaderboard(battles, n_bootstrap=1000, seed=0)
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

INITIAL = 1000.0
SCALE = 400.0
BASE = 10.0
DEFAULT_K = 4.0
DEFAULT_PRIOR = 1e-4  # L2 strength on the natural-log-odds strengths; see docs/arena.md

# winner spelling -> score of model_a (1 win, 0 loss, 0.5 tie)
_WINNERS = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


class ArenaError(ValueError):
    """No usable battles, an unknown anchor, a fit that has no finite answer."""


class Battles(list):
    """The valid battles of a file (dicts with model_a, model_b, winner), in file order.

    ``malformed`` lists ``(line_number, reason)`` for every line that was skipped.
    """

    def __init__(self, items: Iterable[dict] = (), malformed: list[tuple[int, str]] | None = None):
        super().__init__(items)
        self.malformed: list[tuple[int, str]] = list(malformed or [])


def _normalize_winner(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    w = " ".join(value.strip().lower().split())
    if w == "tie(bothbad)":
        w = "tie (bothbad)"
    return w if w in _WINNERS else None


def _check_battle(row: Any) -> tuple[dict | None, str]:
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    for key in ("model_a", "model_b", "winner"):
        if key not in row:
            return None, f"missing key {key!r}"
    a, b = row["model_a"], row["model_b"]
    if not isinstance(a, str) or not a.strip() or not isinstance(b, str) or not b.strip():
        return None, "model_a and model_b must be non-empty strings"
    if a == b:
        return None, f"a model cannot battle itself ({a!r})"
    winner = _normalize_winner(row["winner"])
    if winner is None:
        return None, f"unknown winner {row['winner']!r} (expected one of {', '.join(_WINNERS)})"
    return {"model_a": a, "model_b": b, "winner": winner}, ""


def read_battles(path: str | Path) -> Battles:
    """Read a battles JSONL file. Blank lines are ignored; malformed lines are skipped and listed
    in ``result.malformed`` as ``(line_number, reason)`` (the CLI prints each one). Raises ArenaError
    if no line is a valid battle."""
    path = Path(path)
    good: list[dict] = []
    bad: list[tuple[int, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append((lineno, f"invalid JSON: {err.msg}"))
                continue
            battle, reason = _check_battle(row)
            if battle is None:
                bad.append((lineno, reason))
            else:
                good.append(battle)
    for lineno, reason in bad:
        log.debug("%s:%d: skipped malformed battle: %s", path, lineno, reason)
    if not good:
        raise ArenaError(f"{path}: no valid battle ({len(bad)} malformed line(s))")
    return Battles(good, bad)


def _validated(battles: Sequence[dict]) -> list[dict]:
    out = []
    for i, row in enumerate(battles):
        battle, reason = _check_battle(row)
        if battle is None:
            raise ArenaError(f"battle {i}: {reason}")
        out.append(battle)
    if not out:
        raise ArenaError("no valid battle")
    return out


def elo_ratings(battles: Sequence[dict], k: float = DEFAULT_K, scale: float = SCALE, base: float = BASE,
                initial: float = INITIAL) -> dict[str, float]:
    """Online Elo in the given order: E_a = 1 / (1 + base^((R_b - R_a)/scale)),
    R_a += k (S_a - E_a), R_b += k (S_b - E_b), with S = 1 / 0 / 0.5 for a win / loss / tie."""
    ratings: dict[str, float] = {}
    for battle in _validated(battles):
        a, b = battle["model_a"], battle["model_b"]
        ra, rb = ratings.get(a, initial), ratings.get(b, initial)
        ea = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        sa = _WINNERS[battle["winner"]]
        ratings[a] = ra + k * (sa - ea)
        ratings[b] = rb + k * ((1.0 - sa) - (1.0 - ea))
    return ratings


# ---- Bradley-Terry --------------------------------------------------------------------------

def _encode(battles: Sequence[dict]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    battles = _validated(battles)
    models = sorted({b["model_a"] for b in battles} | {b["model_b"] for b in battles})
    index = {m: i for i, m in enumerate(models)}
    ia = np.array([index[b["model_a"]] for b in battles], dtype=np.int64)
    ib = np.array([index[b["model_b"]] for b in battles], dtype=np.int64)
    sa = np.array([_WINNERS[b["winner"]] for b in battles], dtype=np.float64)
    return models, ia, ib, sa


def _win_matrix(n: int, ia: np.ndarray, ib: np.ndarray, sa: np.ndarray) -> np.ndarray:
    """W[i, j] = wins of i over j, a tie counting half a win for each side."""
    w = np.bincount(ia * n + ib, weights=sa, minlength=n * n)
    w += np.bincount(ib * n + ia, weights=1.0 - sa, minlength=n * n)
    return w.reshape(n, n)


def _objective(theta: np.ndarray, w: np.ndarray, prior: float) -> float:
    d = theta[:, None] - theta[None, :]
    return float(-(w * np.logaddexp(0.0, -d)).sum() - 0.5 * prior * theta @ theta)


def _fit_strengths(w: np.ndarray, prior: float, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """Maximise sum_ij W_ij log sigmoid(t_i - t_j) - prior/2 |t|^2 by Newton with backtracking.

    Returns natural-log-odds strengths with mean 0 (the prior centres them; with prior 0 the
    step is constrained to sum 0, so the mean stays at its start, 0)."""
    n = w.shape[0]
    theta = np.zeros(n)
    nij = w + w.T
    centre = np.full((n, n), 1.0 / n)  # removes the translation null space when prior == 0
    f = _objective(theta, w, prior)
    for _ in range(max_iter):
        d = theta[:, None] - theta[None, :]
        p = 0.5 * (1.0 + np.tanh(0.5 * d))  # sigmoid(d), overflow-free
        grad = (w - nij * p).sum(axis=1) - prior * theta
        c = nij * p * (1.0 - p)
        neg_hess = np.diag(c.sum(axis=1)) - c + prior * np.eye(n)
        try:
            step = np.linalg.solve(neg_hess + centre, grad)
        except np.linalg.LinAlgError as err:
            raise ArenaError("Bradley-Terry: singular system (disconnected battles with prior 0?)") from err
        t = 1.0
        while True:
            cand = theta + t * step
            fc = _objective(cand, w, prior)
            if fc >= f - 1e-12 * abs(f) or t < 1e-8:
                break
            t *= 0.5
        theta, f = cand, fc
        if np.max(np.abs(t * step)) < tol:
            return theta - theta.mean()
    if prior <= 0:
        raise ArenaError("Bradley-Terry did not converge: with prior 0 a model that never wins or never "
                         "loses has no finite rating; use a prior > 0")
    log.warning("Bradley-Terry: no convergence to %g in %d Newton steps", tol, max_iter)
    return theta - theta.mean()


def _to_ratings(theta: np.ndarray, models: list[str], anchor: str | None, scale: float, base: float,
                initial: float) -> np.ndarray:
    r = initial + scale / math.log(base) * theta
    if anchor is not None:
        if anchor not in models:
            raise ArenaError(f"anchor model {anchor!r} is in no battle")
        r = r - r[models.index(anchor)] + initial
    return r


def bradley_terry(battles: Sequence[dict], anchor: str | None = None, prior: float = DEFAULT_PRIOR,
                  scale: float = SCALE, base: float = BASE, initial: float = INITIAL,
                  tol: float = 1e-10) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings: P(a beats b) = 1 / (1 + base^((R_b - R_a)/scale)).

    Ties count as half a win for each side. ``prior`` is a Gaussian (L2) penalty on the
    natural-log-odds strengths that keeps the ratings of never-winning / never-losing models finite.
    Ratings are anchored so their mean is ``initial`` or, with ``anchor``, that model sits at ``initial``.
    """
    models, ia, ib, sa = _encode(battles)
    theta = _fit_strengths(_win_matrix(len(models), ia, ib, sa), prior, tol=tol)
    r = _to_ratings(theta, models, anchor, scale, base, initial)
    return {m: float(x) for m, x in zip(models, r)}


def bootstrap_ratings(battles: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0,
                      anchor: str | None = None, prior: float = DEFAULT_PRIOR, scale: float = SCALE,
                      base: float = BASE, initial: float = INITIAL) -> tuple[list[str], np.ndarray]:
    """Refit Bradley-Terry on ``n_bootstrap`` resamples (with replacement) of the battles.

    Returns the models and an array (n_bootstrap, n_models); a model absent from a resample (or every
    model, when the anchor is absent) is NaN in that row. Without an anchor model, each resample is
    shifted so that the mean rating of the models it contains equals the mean of their full-data
    ratings (otherwise a model missing from a resample would move everyone else's ratings)."""
    models, ia, ib, sa = _encode(battles)
    n, m = len(models), len(ia)
    point = _to_ratings(_fit_strengths(_win_matrix(n, ia, ib, sa), prior), models, None, scale, base, initial)
    rng = np.random.default_rng(seed)
    out = np.full((n_bootstrap, n), np.nan)
    anchor_i = None
    if anchor is not None:
        if anchor not in models:
            raise ArenaError(f"anchor model {anchor!r} is in no battle")
        anchor_i = models.index(anchor)
    for r in range(n_bootstrap):
        s = rng.integers(0, m, size=m)
        present = np.zeros(n, dtype=bool)
        present[ia[s]] = True
        present[ib[s]] = True
        if anchor_i is not None and not present[anchor_i]:
            continue
        keep = np.flatnonzero(present)
        remap = np.full(n, -1)
        remap[keep] = np.arange(len(keep))
        w = _win_matrix(len(keep), remap[ia[s]], remap[ib[s]], sa[s])
        theta = _fit_strengths(w, prior)
        rating = initial + scale / math.log(base) * theta
        if anchor_i is not None:
            rating = rating - rating[remap[anchor_i]] + initial
        else:
            rating = rating - rating.mean() + point[keep].mean()
        out[r, keep] = rating
    return models, out


def _record(battles: Sequence[dict]) -> dict[str, dict[str, float]]:
    rec: dict[str, dict[str, float]] = {}
    for b in battles:
        sa = _WINNERS[b["winner"]]
        for model, s in ((b["model_a"], sa), (b["model_b"], 1.0 - sa)):
            r = rec.setdefault(model, {"battles": 0, "wins": 0, "losses": 0, "ties": 0})
            r["battles"] += 1
            r["wins" if s == 1.0 else "losses" if s == 0.0 else "ties"] += 1
    return rec


def leaderboard(battles: Sequence[dict], n_bootstrap: int = 1000, seed: int = 0, k: float = DEFAULT_K,
                anchor: str | None = None, prior: float = DEFAULT_PRIOR) -> list[dict]:
    """One row per model, sorted by Bradley-Terry rating (best first).

    Keys: rank (position), rank_ci (1 + number of models whose CI low is above this model's CI high,
    as the arenas show it), model, rating, ci_low, ci_high (2.5% / 97.5% bootstrap quantiles; None
    without bootstrap), battles, wins, losses, ties, win_rate ((wins + ties/2) / battles), elo."""
    battles = _validated(battles)
    bt = bradley_terry(battles, anchor=anchor, prior=prior)
    elo = elo_ratings(battles, k=k)
    rec = _record(battles)
    lo: dict[str, float | None] = {m: None for m in bt}
    hi: dict[str, float | None] = {m: None for m in bt}
    if n_bootstrap > 0:
        models, boot = bootstrap_ratings(battles, n_bootstrap=n_bootstrap, seed=seed, anchor=anchor, prior=prior)
        for j, m in enumerate(models):
            col = boot[:, j]
            col = col[~np.isnan(col)]
            if col.size:
                lo[m], hi[m] = (float(x) for x in np.quantile(col, [0.025, 0.975]))
    order = sorted(bt, key=lambda m: (-bt[m], m))
    rows = []
    for pos, m in enumerate(order, start=1):
        r = rec[m]
        rows.append({
            "rank": pos,
            "model": m,
            "rating": bt[m],
            "ci_low": lo[m],
            "ci_high": hi[m],
            "battles": r["battles"],
            "wins": r["wins"],
            "losses": r["losses"],
            "ties": r["ties"],
            "win_rate": (r["wins"] + 0.5 * r["ties"]) / r["battles"],
            "elo": elo[m],
        })
    for row in rows:
        if row["ci_high"] is None:
            row["rank_ci"] = row["rank"]
            continue
        row["rank_ci"] = 1 + sum(1 for o in rows if o["ci_low"] is not None and o["ci_low"] > row["ci_high"])
    return rows


# ---- output ---------------------------------------------------------------------------------

_COLUMNS = [("rank", "rank"), ("rank_ci", "rank (CI)"), ("model", "model"), ("rating", "BT rating"),
            ("ci", "95% CI"), ("battles", "battles"), ("win_rate", "win rate"), ("elo", "Elo")]


def _cells(row: dict) -> list[str]:
    ci = "n/a" if row["ci_low"] is None else f"{row['ci_low']:.1f} .. {row['ci_high']:.1f}"
    return [str(row["rank"]), str(row["rank_ci"]), row["model"], f"{row['rating']:.1f}", ci,
            str(row["battles"]), f"{row['win_rate']:.3f}", f"{row['elo']:.1f}"]


def text_table(rows: list[dict]) -> str:
    head = [h for _, h in _COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(h for _, h in _COLUMNS) + " |",
             "|" + "|".join("---" if key == "model" else "---:" for key, _ in _COLUMNS) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_leaderboard(out_dir: str | Path, rows: list[dict], settings: dict, n_battles: int,
                      malformed: list[tuple[int, str]]) -> None:
    from vlmkit.utils.io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "leaderboard.json", {
        "settings": settings,
        "battles": n_battles,
        "malformed": [{"line": ln, "reason": why} for ln, why in malformed],
        "leaderboard": rows,
    })
    md = [
        "# Arena leaderboard",
        "",
        f"{n_battles} battles ({len(malformed)} malformed lines skipped). Bradley-Terry ratings "
        f"(anchor: {settings['anchor'] or 'mean = 1000'}, prior {settings['prior']:g}) with "
        f"{settings['bootstrap']}-resample bootstrap 95% intervals (seed {settings['seed']}); "
        f"online Elo with K = {settings['k']:g}. Win rate counts a tie as half a win.",
        "",
        markdown_table(rows),
        "",
    ]
    atomic_write_text(out_dir / "leaderboard.md", "\n".join(md))


def _cmd_arena(args) -> int:
    try:
        battles = read_battles(args.battles)
        for lineno, reason in battles.malformed:
            print(f"{args.battles}:{lineno}: malformed battle skipped: {reason}", file=sys.stderr)
        rows = leaderboard(battles, n_bootstrap=args.bootstrap, seed=args.seed, k=args.k,
                           anchor=args.anchor, prior=args.prior)
    except (ArenaError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text_table(rows))
    print(f"{len(battles)} battles, {len(battles.malformed)} malformed line(s) skipped")
    if args.out:
        settings = {"k": args.k, "bootstrap": args.bootstrap, "seed": args.seed, "anchor": args.anchor,
                    "prior": args.prior, "scale": SCALE, "base": BASE, "initial": INITIAL}
        write_leaderboard(args.out, rows, settings, len(battles), battles.malformed)
        print(f"wrote {Path(args.out) / 'leaderboard.json'} and {Path(args.out) / 'leaderboard.md'}")
    return 0


def add_arena_parser(subparsers) -> Any:
    """Add ``vlmkit arena`` to the ``add_subparsers()`` object of the vlmkit parser."""
    p = subparsers.add_parser("arena", help="a leaderboard (Bradley-Terry + bootstrap CIs, Elo) from pairwise battles")
    p.add_argument("battles", help="JSONL: one {model_a, model_b, winner} per line")
    p.add_argument("--out", default=None, help="write DIR/leaderboard.json and DIR/leaderboard.md")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--k", type=float, default=DEFAULT_K, help="online Elo K factor (default 4)")
    p.add_argument("--anchor", default=None, metavar="MODEL",
                   help="fix MODEL's Bradley-Terry rating at 1000 (default: the mean rating is 1000)")
    p.add_argument("--prior", type=float, default=DEFAULT_PRIOR,
                   help="L2 prior on Bradley-Terry log-odds strengths, keeps unbeaten models finite")
    p.set_defaults(func=_cmd_arena)
    return p
