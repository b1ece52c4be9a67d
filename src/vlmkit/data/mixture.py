"""Weighted, deterministic, resumable sampling across several data sources.

Draw ``k`` picks its source from a uniform number that is a pure function of ``(seed, k)``
(a hash, no RNG state), so the source sequence depends only on the seed and the weights.
Within a source, items come in the order of a per-epoch permutation seeded by
``(seed, source, epoch)``: every item appears exactly once per epoch of that source.
The whole position is ``draws`` plus each source's ``(epoch, position)``: a small JSON dict.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _hash64(*key: object) -> int:
    text = "/".join(str(k) for k in key).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


class MixtureSampler:
    """``next() -> (source, index)`` over ``source_sizes`` in proportion to ``weights``.

    Sources with weight 0 are never drawn. Weights need not sum to 1.
    """

    def __init__(self, source_sizes: dict[str, int], weights: dict[str, float], seed: int):
        unknown = sorted(set(weights) - set(source_sizes))
        if unknown:
            raise ValueError(f"mixture weights name unknown sources {unknown}")
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"mixture weights must be >= 0, got {weights}")
        self.names = sorted(n for n, w in weights.items() if w > 0)
        if not self.names:
            raise ValueError("mixture needs at least one source with a positive weight")
        empty = [n for n in self.names if source_sizes[n] <= 0]
        if empty:
            raise ValueError(f"mixture sources {empty} have no samples")
        self.sizes = {n: int(source_sizes[n]) for n in self.names}
        total = float(sum(weights[n] for n in self.names))
        self.weights = {n: weights[n] / total for n in self.names}
        self._cumulative = np.cumsum([self.weights[n] for n in self.names]).tolist()
        self.seed = int(seed)
        self.draws = 0
        self.epoch = {n: 0 for n in self.names}
        self.position = {n: 0 for n in self.names}
        self._perms: dict[str, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        """Items in one pass over every drawn source (what "an epoch" of the mixture means)."""
        return sum(self.sizes.values())

    def source_at(self, k: int) -> str:
        """The source of draw ``k``: a pure function of (seed, k) and the weights."""
        u = _hash64(self.seed, "draw", k) / 2.0**64
        for name, edge in zip(self.names, self._cumulative):
            if u < edge:
                return name
        return self.names[-1]

    def _permutation(self, source: str, epoch: int) -> np.ndarray:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng(_hash64(self.seed, source, epoch))
            cached = (epoch, rng.permutation(self.sizes[source]))
            self._perms[source] = cached
        return cached[1]

    def next(self) -> tuple[str, int]:
        source = self.source_at(self.draws)
        self.draws += 1
        if self.position[source] >= self.sizes[source]:
            self.epoch[source] += 1
            self.position[source] = 0
        index = int(self._permutation(source, self.epoch[source])[self.position[source]])
        self.position[source] += 1
        return source, index

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "draws": self.draws,
            "sources": {
                n: {"size": self.sizes[n], "epoch": self.epoch[n], "position": self.position[n]}
                for n in self.names
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"mixture state has seed {state['seed']}, this sampler {self.seed}")
        sources = state["sources"]
        if sorted(sources) != self.names:
            raise ValueError(f"mixture state covers sources {sorted(sources)}, expected {self.names}")
        changed = [n for n in self.names if sources[n]["size"] != self.sizes[n]]
        if changed:
            raise ValueError(f"sources {changed} changed size since the state was saved")
        self.draws = int(state["draws"])
        self.epoch = {n: int(sources[n]["epoch"]) for n in self.names}
        self.position = {n: int(sources[n]["position"]) for n in self.names}
