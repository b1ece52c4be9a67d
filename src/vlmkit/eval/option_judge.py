"""A judge that maps a free-form answer to a multiple-choice option, when the rules can't.

VLMEvalKit's MMBench protocol: option letters are first extracted by rules
(`metrics.mcq.extract_option`); only an answer no rule reads goes to an LLM, which is shown the
question's options and the answer and says which option the answer chose, or none. Used only
when a judge is configured (``vlmkit eval --judge-url URL --judge-model NAME``); the method is
then ``judge`` in the extraction counts, and an answer the judge can't place (or whose reply
stays unreadable after the retries) is ``failed``: wrong, never guessed.
"""

from __future__ import annotations

import re
from typing import Mapping

from vlmkit.eval.judge import JudgeConfig, OpenAIJudgeClient, ask

SYSTEM_OPTION = """You match an answer to a multiple-choice question against the question's options.
Say which single option the answer chooses. If it chooses none of them, or several, say none.
Reply with only the option's letter, or none."""

OPTION_TEMPLATE = """[Options]
{options}

[Answer]
{answer}

Which option does the answer choose? Reply with only its letter, or none."""

NONE = "none"


def parse_option(reply: str, letters: set[str]) -> str | None:
    """The letter (or ``none``) on the reply's first line; None when unreadable."""
    first = (reply or "").strip().splitlines()[0].strip() if (reply or "").strip() else ""
    first = re.sub(r"^[\[\(*\s]*|[\]\).*\s]*$", "", first)  # [[B]], (B), **B**, "B."
    if first.upper() in letters:
        return first.upper()
    if first.lower() == NONE:
        return NONE
    return None


class OptionJudge:
    """``(answer, options) -> letter | None``, the callable `metrics.mcq.extract_option` takes."""

    def __init__(self, config: JudgeConfig, client: OpenAIJudgeClient | None = None):
        self.config = config
        self.client = client or OpenAIJudgeClient(config)
        self.asked = self.failed = 0

    def __call__(self, answer: str, options: Mapping[str, str]) -> str | None:
        letters = {str(k).upper() for k in options}
        listed = "\n".join(f"{k}. {v}" for k, v in sorted(options.items()))
        messages = [{"role": "system", "content": SYSTEM_OPTION},
                    {"role": "user", "content": OPTION_TEMPLATE.format(options=listed, answer=answer.strip())}]  # fmt: skip
        self.asked += 1
        got = ask(self.client, messages, lambda reply: parse_option(reply, letters), "option")
        if got["value"] is None:
            self.failed += 1
        return None if got["value"] in (None, NONE) else got["value"]

    def describe(self) -> dict:
        """What results record: the judge (never its key), its prompt, and how often it was asked."""
        return {**self.config.describe(), "prompt": {"system": SYSTEM_OPTION, "user": OPTION_TEMPLATE},
                "asked": self.asked, "unreadable": self.failed}  # fmt: skip
