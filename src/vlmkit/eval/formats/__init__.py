"""Readers for the file formats evaluation benchmarks ship in (see docs/benchmark-formats.md)."""

from vlmkit.eval.formats.pope import POPE_PROMPT_TEMPLATE, iter_pope, pope_split_of, read_pope
from vlmkit.eval.formats.vlmevalkit import (
    PROMPT_TEMPLATES,
    build_prompt,
    detect_kind,
    iter_vlmevalkit,
    read_vlmevalkit,
)

__all__ = [
    "POPE_PROMPT_TEMPLATE",
    "PROMPT_TEMPLATES",
    "build_prompt",
    "detect_kind",
    "iter_pope",
    "iter_vlmevalkit",
    "pope_split_of",
    "read_pope",
    "read_vlmevalkit",
]
