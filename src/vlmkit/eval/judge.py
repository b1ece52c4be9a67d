"""LLM-as-judge through any OpenAI-compatible chat endpoint, and judge-made arena battles.

A judge is any server that answers ``POST {base_url}/chat/completions`` the way the OpenAI API
does (OpenAI, vLLM, llama.cpp's ``llama-server``, SGLang, ...). The judge reads text only: it
never sees the image; where a description of the image is given (``context``) it is shown.
See docs/judges.md.

Three judgements:

* ``relative`` -- the LLaVA-Bench relative score (Liu et al. 2023, "Visual Instruction Tuning").
  The judge sees the question, the context, the reference answer and the candidate answer, and
  rates both from 1 to 10 (first line of its reply: ``"ref_score cand_score"``). Per category
  ``relative = mean(candidate) / mean(reference) * 100``; ``overall`` pools all judged items.
* ``grade`` -- MM-Vet-style grading (Yu et al. 2023, "MM-Vet"): a correctness score in [0, 1] of
  the candidate against the ground truth (``<AND>`` / ``<OR>`` in the ground truth as MM-Vet uses
  them); ``score = mean * 100`` overall and per capability (an item may have several).
* ``pairwise`` -- two models' answers to the same questions, judged A / B / tie in both orders
  (A and B swapped) to cancel position bias, as in MT-Bench (Zheng et al. 2023); verdicts that
  disagree become a tie. The result is a battles JSONL for `vlmkit.eval.arena` (``vlmkit arena``).

Input for ``relative`` and ``grade``: JSON lines, one item per line::

    {"id": "q1", "question": "...", "prediction": "...", "answer": "...",
     "category": "conv", "context": "a caption of the image (optional)"}

Aliases: ``question_id`` for ``id``; ``prompt`` for ``question``; ``reference`` or ``target`` for
``answer``; ``question_type`` or ``capability`` for ``category`` (a list, or a comma-separated
string, gives an item several capabilities in ``grade``); ``caption`` for ``context``. So a vlmkit
``samples.jsonl`` can be judged as it is (its ``blind`` rows are skipped). With a separate
references file, the predictions file needs only ``id`` and ``prediction`` and the rest comes from
the references (matched by id); a reference with no prediction is *missing*: counted and listed,
and left out of the score. Input for ``pairwise``: two vlmkit ``samples.jsonl`` files, matched by
``(task, id)``.

Failures are never guessed. A reply whose first line cannot be read is asked again (up to
``max_retries`` times, with a reminder of the format); if it still cannot be read, the item is
*failed*: counted, listed, and left out of the score. HTTP and connection errors are retried with
backoff and then raised as `JudgeError`.

Every reply is cached (JSONL, keyed by the sha256 of model, messages, temperature, max_tokens and
the attempt number), so a rerun asks nothing again. The API key is read from the environment at
each call and is written nowhere.

    config = JudgeConfig(base_url="http://localhost:8000/v1", model="Qwen/Qwen2.5-7B-Instruct",
                         cache_path="judge_cache.jsonl")
    results = judge_relative(read_items("llava_bench.jsonl"), config)
    judge_battles(read_jsonl("a/samples.jsonl"), read_jsonl("b/samples.jsonl"), "a", "b", config,
                  "battles.jsonl")
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from vlmkit.utils.io import atomic_write_json, atomic_write_text, read_jsonl

log = logging.getLogger("vlmkit.eval.judge")

KINDS = ("relative", "grade", "pairwise")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})  # worth asking again
MAX_BACKOFF_S = 60.0
MAX_LISTED = 200  # failed / missing ids listed in results


class JudgeError(RuntimeError):
    """The judge server could not be reached or answered with an error (the message names the
    URL and the HTTP status)."""


class JudgeInputError(ValueError):
    """The items to judge are malformed (the message says which file and line)."""


# ------------------------------------------------------------------ configuration


@dataclass
class JudgeConfig:
    """Where the judge is and how it is asked.

    ``api_key_env`` names the environment variable that holds the key (read at each call; none
    is sent when it is unset or empty, as local servers need). ``max_retries`` re-asks an
    unreadable reply; ``http_retries`` re-sends after an HTTP 408/429/5xx or a connection error,
    waiting ``backoff_s * 2**i`` (or the server's Retry-After) in between.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 120.0
    max_retries: int = 2
    cache_path: str | Path | None = None
    http_retries: int = 3
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if not str(self.base_url).strip():
            raise ValueError("JudgeConfig: base_url is empty (e.g. http://localhost:8000/v1)")
        if not str(self.model).strip():
            raise ValueError("JudgeConfig: model is empty")
        if self.max_tokens < 1:
            raise ValueError("JudgeConfig: max_tokens must be >= 1")
        if self.max_retries < 0 or self.http_retries < 0:
            raise ValueError("JudgeConfig: max_retries and http_retries must be >= 0")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("JudgeConfig: timeout_s must be > 0 and backoff_s >= 0")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("JudgeConfig: temperature must be in [0, 2]")

    @property
    def url(self) -> str:
        return str(self.base_url).rstrip("/") + "/chat/completions"

    def describe(self) -> dict:
        """What results record about the judge (the name of the key's variable, never the key)."""
        d = asdict(self)
        d["cache_path"] = None if self.cache_path is None else str(self.cache_path)
        d["url"] = self.url
        return d


# ------------------------------------------------------------------ client and cache


@dataclass
class JudgeReply:
    text: str
    cached: bool


def cache_key(model: str, messages: list[dict], temperature: float, max_tokens: int, attempt: int = 0) -> str:
    """sha256 of the request that decides the reply; ``attempt`` > 0 makes a re-ask a new entry."""
    req: dict[str, Any] = {"model": model, "messages": messages, "temperature": float(temperature),
                           "max_tokens": int(max_tokens)}  # fmt: skip
    if attempt:
        req["attempt"] = int(attempt)
    return hashlib.sha256(json.dumps(req, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _snippet(raw: bytes | str, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class OpenAIJudgeClient:
    """Chat completions from an OpenAI-compatible server, with a JSONL reply cache.

    Counters: ``requests`` (answered HTTP requests), ``cached`` (replies served from the cache).
    """

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.requests = 0
        self.cached = 0
        self._sleep = sleep
        self._cache: dict[str, str] = {}
        self._cache_path = Path(config.cache_path) if config.cache_path is not None else None
        if self._cache_path is not None and self._cache_path.exists():
            self._load_cache(self._cache_path)

    def _load_cache(self, path: Path) -> None:
        bad = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    key, reply = row["key"], row["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    key = reply = None
                if isinstance(key, str) and isinstance(reply, str):
                    self._cache[key] = reply
                else:
                    bad += 1  # a torn line from a crash; that request is simply asked again
        if bad:
            log.warning("judge cache %s: %d unreadable line(s) ignored", path, bad)

    def _store(self, key: str, reply: str) -> None:
        self._cache[key] = reply
        if self._cache_path is None:
            return
        self._cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._cache_path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            prefix = b""
            if f.tell() > 0:  # do not glue the new line onto a torn last line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    prefix = b"\n"
            line = json.dumps({"key": key, "model": self.config.model, "reply": reply}, ensure_ascii=False)
            f.write(prefix + line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def chat(self, messages: list[dict], attempt: int = 0) -> JudgeReply:
        """The reply text for ``messages``; from the cache when this exact request was answered."""
        c = self.config
        key = cache_key(c.model, messages, c.temperature, c.max_tokens, attempt)
        if key in self._cache:
            self.cached += 1
            return JudgeReply(self._cache[key], True)
        text = self._complete({"model": c.model, "messages": messages, "temperature": c.temperature,
                               "max_tokens": c.max_tokens})  # fmt: skip
        self._store(key, text)
        return JudgeReply(text, False)

    def _complete(self, payload: dict) -> str:
        # One JSON POST is all the OpenAI protocol needs here: urllib does it without adding a
        # dependency (no openai / requests / httpx), and works the same against every server.
        url = self.config.url
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        tries = self.config.http_retries + 1
        last = ""
        for i in range(tries):
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            key = self._api_key()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            wait = self.config.backoff_s * (2**i)
            try:
                with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as err:
                try:
                    detail = _snippet(err.read() or b"")
                except (OSError, AttributeError, http.client.HTTPException):
                    detail = ""
                last = f"HTTP {err.code} {err.reason}: {detail}"
                if err.code not in RETRY_STATUS:
                    hint = ""
                    if err.code in (401, 403):
                        hint = f" (is the key in ${self.config.api_key_env}?)"
                    raise JudgeError(f"judge request to {url} failed: {last}{hint}") from None
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after:
                    try:
                        wait = min(MAX_BACKOFF_S, max(wait, float(retry_after)))
                    except ValueError:
                        pass
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"connection error: {type(err).__name__}: {reason}"
            else:
                self.requests += 1
                return self._content(url, raw)
            if i + 1 < tries:
                log.warning("judge request to %s: %s; retrying in %.1fs (%d/%d)", url, last, wait, i + 1, tries - 1)
                self._sleep(min(wait, MAX_BACKOFF_S))
        raise JudgeError(f"judge request to {url} failed after {tries} attempt(s): {last}")

    def _api_key(self) -> str | None:
        """The key from the environment, now (never stored; never put in a message)."""
        name = self.config.api_key_env
        key = (os.environ.get(name) or "").strip() if name else ""
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
            raise JudgeError(f"the API key in ${name} contains control characters")
        return key or None

    @staticmethod
    def _content(url: str, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"].get("content")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"judge reply from {url} is not a chat completion: {_snippet(raw)}") from None
        return "" if content is None else str(content)  # no text (e.g. a refusal): unreadable, re-asked


# ------------------------------------------------------------------ parsing


def _first_line(reply: str) -> str:
    for line in reply.splitlines():
        line = line.strip().strip("*`#").strip()
        if line:
            return line
    return ""


_SCORE = re.compile(r"(\d+(?:\.\d+)?)(?:/10)?")


def parse_relative(reply: str) -> tuple[float, float] | None:
    """``(ref_score, cand_score)`` from a first line holding exactly two scores in [1, 10]
    (separated by a space or a comma; ``8/10`` is read as 8), else None."""
    tokens = _first_line(reply).replace(",", " ").split()
    if len(tokens) != 2:
        return None
    scores = []
    for tok in tokens:
        m = _SCORE.fullmatch(tok)
        if m is None:
            return None
        v = float(m.group(1))
        if not 1.0 <= v <= 10.0:
            return None
        scores.append(v)
    return scores[0], scores[1]


_GRADE = re.compile(r"(?:0(?:\.\d+)?|1(?:\.0+)?|\.\d+)")


def parse_grade(reply: str) -> float | None:
    """A correctness score in [0, 1]: the first line must be that number alone (a final period
    is allowed), else None."""
    line = _first_line(reply).rstrip(".").strip()
    return float(line) if _GRADE.fullmatch(line) else None


def parse_verdict(reply: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a first line that says only that (``[[A]]``, ``Answer A``
    and a final period are allowed), else None."""
    line = _first_line(reply).strip("[]().:!\"' ").lower()
    line = " ".join(line.split())
    return {"a": "A", "answer a": "A", "b": "B", "answer b": "B", "tie": "tie"}.get(line)


# ------------------------------------------------------------------ prompts (written for vlmkit)

SYSTEM_RELATIVE = "You are a careful, impartial grader of answers to questions about images."
SYSTEM_GRADE = "You grade answers to questions about images against a ground truth. You reply with a number only."
SYSTEM_PAIRWISE = "You are an impartial judge comparing two answers to a question about an image."

CONTEXT_BLOCK = "[Description of the image]\n{context}\n\n"
NO_CONTEXT = "(no description of the image is available)\n\n"

RELATIVE_TEMPLATE = """You cannot see the image. Below is a description of it, a question about it and two answers.

{context_block}[Question]
{question}

[Answer 1]
{reference}

[Answer 2]
{candidate}

[Instructions]
Rate each answer from 1 (useless) to 10 (excellent) for how helpful, relevant, accurate and \
detailed it is as a reply to the question about this image. Judge the content, not the length, \
and do not let the order in which the answers appear sway you.
On the first line write only the two ratings, Answer 1's first, separated by a space (for \
example: 7 9). From the second line on, explain the ratings."""

GRADE_TEMPLATE = """Score how correct an answer is, compared with the ground truth, from 0.0 (entirely \
wrong) to 1.0 (entirely right) in steps of 0.1; give partial credit to a partly right answer. \
In a ground truth, <AND> joins parts that must all be in the answer for full credit, and <OR> \
joins alternatives of which any one is enough. For open-ended questions, judge whether the answer \
makes the points of the ground truth; the wording does not matter. Line breaks are written <br>.

Question | Ground truth | Answer | Correctness
How many circles are in the picture? | 3 | I can see three circles. | 1.0
What colour is the square? | blue | The square is green. | 0.0
Which shapes touch the left edge? | triangle <AND> star | Only a triangle. | 0.5
What does the sign say? | EXIT <OR> exit sign | It reads "Exit". | 1.0
Where is the star? | top right | It is near the top of the image. | 0.4
Describe the scene. | A small yellow triangle above a large blue square. | A yellow triangle over a blue box. | 0.8
{question} | {answer} | {prediction} |

Reply with the correctness of the last row only: one number from 0.0 to 1.0 and nothing else."""

PAIRWISE_TEMPLATE = """You cannot see the image. Below is a description of it (where available), a \
question about it{reference_note} and two answers, A and B.

{context_block}[Question]
{question}

{reference_block}[Answer A]
{answer_a}

[Answer B]
{answer_b}

[Instructions]
Decide which answer is better: more correct first, then more helpful and relevant. Length alone \
is no merit, and the order in which the answers appear must not affect your decision.
On the first line write only one of: A, B, tie. From the second line on, give a short reason."""

REFERENCE_BLOCK = "[Reference answer]\n{reference}\n\n"
REFERENCE_NOTE = ", a reference answer"

RETRY_REMINDER = {
    "relative": "I could not read your first line. Reply again: on the first line only the two "
                "ratings (1 to 10), Answer 1's first, separated by a space, e.g. 7 9.",
    "grade": "I could not read your reply. Reply again with one number from 0.0 to 1.0 and nothing else.",
    "pairwise": "I could not read your first line. Reply again: on the first line only one of A, B, tie.",
    "option": "I could not read your reply. Reply again with only the option's letter, or none.",
}  # fmt: skip


def prompts(kind: str) -> dict:
    """The prompt text of a judgement, as recorded in its results."""
    if kind == "relative":
        return {"system": SYSTEM_RELATIVE, "user": RELATIVE_TEMPLATE, "context_block": CONTEXT_BLOCK,
                "no_context": NO_CONTEXT, "retry": RETRY_REMINDER[kind]}  # fmt: skip
    if kind == "grade":
        return {"system": SYSTEM_GRADE, "user": GRADE_TEMPLATE, "retry": RETRY_REMINDER[kind]}
    if kind == "pairwise":
        return {"system": SYSTEM_PAIRWISE, "user": PAIRWISE_TEMPLATE, "context_block": CONTEXT_BLOCK,
                "no_context": NO_CONTEXT, "reference_block": REFERENCE_BLOCK, "reference_note": REFERENCE_NOTE,
                "retry": RETRY_REMINDER[kind]}  # fmt: skip
    raise ValueError(f"unknown judgement {kind!r}; expected one of {', '.join(KINDS)}")


def _context_block(context: str | None) -> str:
    return CONTEXT_BLOCK.format(context=context.strip()) if context and context.strip() else NO_CONTEXT


def _messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def relative_messages(item: dict) -> list[dict]:
    user = RELATIVE_TEMPLATE.format(context_block=_context_block(item.get("context")), question=item["question"],
                                    reference=item["reference"], candidate=item["prediction"])  # fmt: skip
    return _messages(SYSTEM_RELATIVE, user)


def _cell(text: str) -> str:
    return str(text).strip().replace("\r\n", "\n").replace("\n", "<br>").replace("<AND>", " <AND> ").replace(
        "<OR>", " <OR> ")


def grade_messages(item: dict) -> list[dict]:
    user = GRADE_TEMPLATE.format(question=_cell(item["question"]), answer=_cell(item["reference"]),
                                 prediction=_cell(item["prediction"]))  # fmt: skip
    return _messages(SYSTEM_GRADE, user)


def pairwise_messages(question: str, answer_a: str, answer_b: str, reference: str | None = None,
                      context: str | None = None) -> list[dict]:
    has_ref = bool(reference and str(reference).strip())
    user = PAIRWISE_TEMPLATE.format(
        reference_note=REFERENCE_NOTE if has_ref else "",
        context_block=_context_block(context),
        question=question,
        reference_block=REFERENCE_BLOCK.format(reference=str(reference).strip()) if has_ref else "",
        answer_a=answer_a,
        answer_b=answer_b,
    )
    return _messages(SYSTEM_PAIRWISE, user)


def ask(client: OpenAIJudgeClient, messages: list[dict], parse: Callable[[str], Any], kind: str) -> dict:
    """Ask, and re-ask up to ``max_retries`` times (with a format reminder) while the reply cannot be
    read. Returns ``{"value": parsed or None, "replies": [...], "attempts", "cached"}``."""
    replies: list[str] = []
    cached = 0
    convo = list(messages)
    for attempt in range(client.config.max_retries + 1):
        reply = client.chat(convo, attempt=attempt)
        replies.append(reply.text)
        cached += reply.cached
        value = parse(reply.text)
        if value is not None:
            return {"value": value, "replies": replies, "attempts": attempt + 1, "cached": cached}
        convo = convo + [{"role": "assistant", "content": reply.text},
                         {"role": "user", "content": RETRY_REMINDER[kind]}]  # fmt: skip
    return {"value": None, "replies": replies, "attempts": len(replies), "cached": cached}


# ------------------------------------------------------------------ items


def _pick(row: dict, *keys: str) -> Any:
    for k in keys:
        if row.get(k) is not None:
            return row[k]
    return None


def _categories(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        parts = [str(v).strip() for v in value]
    else:
        parts = [p.strip() for p in str(value).split(",")]
    return [p for p in parts if p]


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise JudgeInputError(f"{path}:line {n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise JudgeInputError(f"{path}:line {n}: a {type(row).__name__}, not an object")
            rows.append((n, row))
    return rows


def _keyed(path: Path, task: str | None) -> dict[str, tuple[int, dict]]:
    out: dict[str, tuple[int, dict]] = {}
    for n, row in _read_rows(path):
        if row.get("blind"):  # a vlmkit samples.jsonl asked without the image
            continue
        if task is not None and row.get("task") is not None and row.get("task") != task:
            continue
        rid = _fields(row)["id"]
        if rid is None:
            raise JudgeInputError(f"{path}:line {n}: no id (or question_id)")
        if rid in out:
            hint = " (a samples.jsonl with several tasks: choose one with task=)" if row.get("task") else ""
            raise JudgeInputError(f"{path}:line {n}: duplicate id {rid!r} (first on line {out[rid][0]}){hint}")
        out[rid] = (n, row)
    return out


def _fields(row: dict) -> dict:
    rid = _pick(row, "id", "question_id")
    return {
        "id": None if rid is None or isinstance(rid, bool) or str(rid).strip() == "" else str(rid).strip(),
        "question": _pick(row, "question", "prompt"),
        "prediction": row.get("prediction"),
        "reference": _pick(row, "answer", "reference", "target"),
        "category": _pick(row, "category", "question_type", "capability"),
        "context": _pick(row, "context", "caption"),
    }


def _checked(item: dict, where: str, need_reference: bool) -> dict:
    if item["id"] is None:
        raise JudgeInputError(f"{where}: no id (or question_id)")
    if item["question"] is None:
        raise JudgeInputError(f"{where}: no question (or prompt)")
    if need_reference and item["reference"] is None:
        raise JudgeInputError(f"{where}: no answer (or reference, target)")
    if item["prediction"] is not None and not isinstance(item["prediction"], str):
        raise JudgeInputError(f"{where}: prediction must be a string, got {type(item['prediction']).__name__}")
    item["question"] = str(item["question"])
    item["reference"] = None if item["reference"] is None else str(item["reference"])
    return item


def normalize_item(row: dict, where: str = "item", need_reference: bool = True) -> dict:
    """An item ``{"id", "question", "prediction", "reference", "category", "context"}`` from a row
    that may use the aliases of the module docstring (``prediction`` None: missing)."""
    return _checked(_fields(row), where, need_reference)


def read_items(predictions: str | Path, references: str | Path | None = None, task: str | None = None,
               need_reference: bool = True) -> list[dict]:
    """Items (see `normalize_item`) from the JSONL formats of the module docstring. With
    ``references``, the question, answer, category and context come from that file (the predictions
    file fills in what it lacks), the prediction from ``predictions``. ``task`` keeps only the rows
    of that task (rows without a task are kept)."""
    preds = _keyed(Path(predictions), task)
    refs = _keyed(Path(references), task) if references is not None else None
    if refs is None:
        items = [normalize_item(row, f"{predictions}:line {n}", need_reference) for n, row in preds.values()]
        if not items:
            raise JudgeInputError(f"{predictions}: no items")
        return items
    unknown = [i for i in preds if i not in refs]
    if unknown:
        raise JudgeInputError(f"{predictions}: {len(unknown)} prediction id(s) not in {references}, "
                              f"e.g. {', '.join(map(repr, unknown[:5]))}")  # fmt: skip
    items = []
    for rid, (n, row) in refs.items():
        ref, pred = _fields(row), _fields(preds[rid][1]) if rid in preds else {}
        merged = {k: v if v is not None else pred.get(k) for k, v in ref.items()}
        merged["prediction"] = pred.get("prediction")
        items.append(_checked(merged, f"{references}:line {n}", need_reference))
    if not items:
        raise JudgeInputError(f"{references}: no items")
    return items


# ------------------------------------------------------------------ judgements


def _client(config: JudgeConfig, client: OpenAIJudgeClient | None) -> OpenAIJudgeClient:
    return client if client is not None else OpenAIJudgeClient(config)


def _header(kind: str, method: str, config: JudgeConfig) -> dict:
    return {
        "kind": kind,
        "method": method,
        "judge": config.describe(),
        "prompt": prompts(kind),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _counts(n: int, judged: int, failed: int, missing: int, client: OpenAIJudgeClient, req0: int, cache0: int,
            retried: int) -> dict:
    return {"n": n, "judged": judged, "failed": failed, "missing": missing, "retried": retried,
            "cached": client.cached - cache0, "requests": client.requests - req0}  # fmt: skip


def _progress(iterable: Iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="item", dynamic_ncols=True, disable=None)


def _ratio(num: float, den: float) -> float | None:
    return num / den * 100.0 if den > 0 else None


def judge_relative(items: Sequence[dict], config: JudgeConfig, client: OpenAIJudgeClient | None = None) -> dict:
    """The LLaVA-Bench relative score of ``items`` (see `read_items`).

    Returns the results: ``score`` (overall relative score), ``overall`` and ``by_category``
    ``{relative, reference, candidate, judged, failed, n}`` where reference / candidate are the mean
    ratings (1-10) and ``relative = mean(candidate) / mean(reference) * 100`` over the judged items;
    ``counts``; the judge and prompts; ``failed_ids`` / ``missing_ids``; ``items`` (one record per item).
    """
    client = _client(config, client)
    req0, cache0 = client.requests, client.cached
    items = [normalize_item(it, f"item {i}") for i, it in enumerate(items)]
    out = _header("relative", "LLaVA-Bench relative score (Liu et al. 2023): mean(candidate) / mean(reference) * 100",
                  config)  # fmt: skip
    records = []
    for item in _progress(items, len(items), "judge relative"):
        rec = {"id": item["id"], "category": _category_label(item.get("category"))}
        if item.get("prediction") is None:
            records.append({**rec, "status": "missing"})
            continue
        got = ask(client, relative_messages(item), parse_relative, "relative")
        rec.update(attempts=got["attempts"], replies=got["replies"])
        if got["value"] is None:
            records.append({**rec, "status": "failed"})
        else:
            ref, cand = got["value"]
            records.append({**rec, "status": "judged", "reference_score": ref, "candidate_score": cand})
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)

    def summary(rs: list[dict]) -> dict:
        ok = [r for r in rs if r["status"] == "judged"]
        ref = sum(r["reference_score"] for r in ok) / len(ok) if ok else None
        cand = sum(r["candidate_score"] for r in ok) / len(ok) if ok else None
        return {"relative": _ratio(cand, ref) if ok else None, "reference": ref, "candidate": cand,
                "judged": len(ok), "failed": sum(r["status"] == "failed" for r in rs),
                "missing": sum(r["status"] == "missing" for r in rs), "n": len(rs)}  # fmt: skip

    out["overall"] = summary(records)
    out["score"] = out["overall"]["relative"]
    out["by_category"] = {c: summary(groups[c]) for c in sorted(groups)}
    _finish(out, records, client, req0, cache0)
    return out


def _category_label(value: Any) -> str:
    cats = _categories(value)
    return ",".join(cats) if cats else "all"


def _finish(out: dict, records: list[dict], client: OpenAIJudgeClient, req0: int, cache0: int) -> None:
    judged = sum(r["status"] == "judged" for r in records)
    failed = [r["id"] for r in records if r["status"] == "failed"]
    missing = [r["id"] for r in records if r["status"] == "missing"]
    retried = sum(r.get("attempts", 1) > 1 for r in records)
    out["counts"] = _counts(len(records), judged, len(failed), len(missing), client, req0, cache0, retried)
    out["failed_ids"] = failed[:MAX_LISTED]
    out["missing_ids"] = missing[:MAX_LISTED]
    out["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out["items"] = records
    if failed:
        log.warning("judge: %d item(s) failed (reply unreadable after %d attempts), left out of the score",
                    len(failed), client.config.max_retries + 1)  # fmt: skip


def judge_grades(items: Sequence[dict], config: JudgeConfig, client: OpenAIJudgeClient | None = None) -> dict:
    """MM-Vet-style grades of ``items`` (see `read_items`): a correctness in [0, 1] per item.

    Returns ``score`` (mean correctness * 100 over judged items), ``by_category`` {capability:
    {score, judged, failed, missing, n}} (an item counts under each of its capabilities),
    ``by_combination`` (the same per set of capabilities, when an item has more than one),
    ``counts``, the judge and prompts, ``failed_ids`` / ``missing_ids`` and ``items``.
    """
    client = _client(config, client)
    req0, cache0 = client.requests, client.cached
    items = [normalize_item(it, f"item {i}") for i, it in enumerate(items)]
    out = _header("grade", "MM-Vet-style correctness (Yu et al. 2023): mean score in [0, 1] * 100", config)
    records = []
    for item in _progress(items, len(items), "judge grade"):
        cats = _categories(item.get("category"))
        rec = {"id": item["id"], "category": cats}
        if item.get("prediction") is None:
            records.append({**rec, "status": "missing"})
            continue
        got = ask(client, grade_messages(item), parse_grade, "grade")
        rec.update(attempts=got["attempts"], replies=got["replies"])
        if got["value"] is None:
            records.append({**rec, "status": "failed"})
        else:
            records.append({**rec, "status": "judged", "grade": got["value"]})

    def summary(rs: list[dict]) -> dict:
        ok = [r["grade"] for r in rs if r["status"] == "judged"]
        return {"score": sum(ok) / len(ok) * 100.0 if ok else None, "judged": len(ok),
                "failed": sum(r["status"] == "failed" for r in rs),
                "missing": sum(r["status"] == "missing" for r in rs), "n": len(rs)}  # fmt: skip

    by_cat: dict[str, list[dict]] = defaultdict(list)
    by_combo: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        for c in r["category"] or ["all"]:
            by_cat[c].append(r)
        by_combo[",".join(sorted(r["category"])) or "all"].append(r)
    out["overall"] = summary(records)
    out["score"] = out["overall"]["score"]
    out["by_category"] = {c: summary(by_cat[c]) for c in sorted(by_cat)}
    out["by_combination"] = ({c: summary(by_combo[c]) for c in sorted(by_combo)}
                             if any(len(r["category"]) > 1 for r in records) else {})  # fmt: skip
    _finish(out, records, client, req0, cache0)
    return out


def _sample_rows(rows: Iterable[dict]) -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r.get("blind"):
            continue
        rid = _pick(r, "id", "question_id")
        if rid is None:
            raise JudgeInputError(f"a samples row has no id: {_snippet(json.dumps(r, ensure_ascii=False), 120)}")
        key = (str(r.get("task") or ""), str(rid))
        if key in out:
            raise JudgeInputError(f"duplicate samples row for task {key[0]!r}, id {key[1]!r}")
        out[key] = r
    return out


def combine_verdicts(first: str, second: str) -> str:
    """The winner from the verdict with model_a shown as A (``first``) and the one with model_a shown
    as B (``second``): both must pick the same model, else it is a tie."""
    one = {"A": "model_a", "B": "model_b", "tie": "tie"}[first]
    two = {"A": "model_b", "B": "model_a", "tie": "tie"}[second]
    return one if one == two else "tie"


def judge_battles(samples_a: Iterable[dict], samples_b: Iterable[dict], name_a: str, name_b: str,
                  config: JudgeConfig, out_path: str | Path | None, client: OpenAIJudgeClient | None = None,
                  with_reference: bool = True, limit: int | None = None) -> dict:
    """Pairwise judging of two models' answers, matched by ``(task, id)``, into arena battles.

    ``samples_a`` / ``samples_b`` are the rows of two vlmkit ``samples.jsonl`` files (``blind`` rows
    are skipped). Each question is judged twice, ``name_a``'s answer shown first as A and then as
    B; the battle's winner is the model both verdicts pick, else ``tie`` (disagreeing verdicts are
    counted as ``inconsistent``). ``limit`` keeps the first N matched questions. The reference
    answer (``target``) is shown when ``with_reference``.
    Writes ``{"model_a", "model_b", "winner", "question_id", "task", "judge", "verdicts"}`` lines to
    ``out_path`` (atomically, when given), for `vlmkit.eval.arena.read_battles`. Questions with an
    unreadable verdict in either order are *failed*: no battle.

    Returns ``{"battles": n written, "wins": {name_a, name_b, "tie"}, "inconsistent", "counts",
    "only_a", "only_b", ...}`` plus ``items`` (the battle records and failures).
    """
    if not str(name_a).strip() or not str(name_b).strip() or name_a == name_b:
        raise JudgeInputError(f"judge_battles: two different, non-empty model names are needed "
                              f"({name_a!r}, {name_b!r})")
    client = _client(config, client)
    req0, cache0 = client.requests, client.cached
    rows_a, rows_b = _sample_rows(samples_a), _sample_rows(samples_b)
    keys = [k for k in rows_a if k in rows_b]
    if limit is not None:
        keys = keys[: max(0, int(limit))]
    out = _header("pairwise", "pairwise judging in both orders (Zheng et al. 2023); disagreeing verdicts are ties",
                  config)  # fmt: skip
    out["models"] = {"model_a": name_a, "model_b": name_b}
    out["with_reference"] = bool(with_reference)
    records: list[dict] = []
    battles: list[dict] = []
    inconsistent = 0
    for task, qid in _progress(keys, len(keys), "judge pairwise"):
        ra, rb = rows_a[(task, qid)], rows_b[(task, qid)]
        question = str(_pick(ra, "question", "prompt") or _pick(rb, "question", "prompt") or "")
        reference = _pick(ra, "answer", "reference", "target") if with_reference else None
        context = _pick(ra, "context", "caption")
        pa, pb = str(ra.get("prediction") or ""), str(rb.get("prediction") or "")
        first = ask(client, pairwise_messages(question, pa, pb, reference, context), parse_verdict, "pairwise")
        second = ask(client, pairwise_messages(question, pb, pa, reference, context), parse_verdict, "pairwise")
        rec: dict[str, Any] = {"id": qid, "task": task, "attempts": max(first["attempts"], second["attempts"]),
                               "replies": [first["replies"], second["replies"]]}  # fmt: skip
        if first["value"] is None or second["value"] is None:
            records.append({**rec, "status": "failed"})
            continue
        winner = combine_verdicts(first["value"], second["value"])
        inconsistent += winner == "tie" and not (first["value"] == second["value"] == "tie")
        battle = {"model_a": name_a, "model_b": name_b, "winner": winner, "question_id": qid, "task": task,
                  "judge": config.model, "verdicts": [first["value"], second["value"]]}  # fmt: skip
        battles.append(battle)
        records.append({**rec, "status": "judged", "winner": winner, "verdicts": battle["verdicts"]})
    if out_path is not None:
        atomic_write_text(out_path, "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in battles))
        out["battles_path"] = str(out_path)
    out["battles"] = len(battles)
    out["wins"] = {name_a: sum(b["winner"] == "model_a" for b in battles),
                   name_b: sum(b["winner"] == "model_b" for b in battles),
                   "tie": sum(b["winner"] == "tie" for b in battles)}  # fmt: skip
    out["inconsistent"] = inconsistent
    out["only_a"] = len([k for k in rows_a if k not in rows_b])
    out["only_b"] = len([k for k in rows_b if k not in rows_a])
    _finish(out, records, client, req0, cache0)
    return out


# ------------------------------------------------------------------ files in, results out


def _default_name(path: Path) -> str:
    """A model's name for a battle: results.json's model beside the samples file, else its folder."""
    res = path.parent / "results.json"
    if res.exists():
        try:
            model = json.loads(res.read_text(encoding="utf-8")).get("model") or {}
            for key in ("name", "hf_model", "checkpoint"):
                if model.get(key):
                    return str(model[key])
        except (json.JSONDecodeError, AttributeError, OSError):
            pass
    return path.parent.name or path.stem


def judge_main(kind: str, predictions: str | Path | Sequence[str | Path], config: JudgeConfig,
               out_dir: str | Path, references: str | Path | None = None, names: Sequence[str] | None = None,
               task: str | None = None, limit: int | None = None, with_reference: bool = True) -> dict:
    """Judge files and write ``out_dir/results.json`` (atomically) and ``out_dir/judgements.jsonl``
    (one record per item, with the judge's replies); pairwise also writes ``out_dir/battles.jsonl``.

    ``relative`` / ``grade``: ``predictions`` is an items JSONL (or a vlmkit samples.jsonl);
    ``references`` optionally a separate file with the questions and answers. ``pairwise``:
    ``predictions`` is two samples.jsonl paths, ``names`` the two model names (default: the
    ``model`` of the results.json beside each file, else its folder name). ``limit`` keeps the first
    N items. Returns the results (without the per-item records).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown judgement {kind!r}; expected one of {', '.join(KINDS)}")
    out = Path(out_dir)
    client = OpenAIJudgeClient(config)
    t0 = time.perf_counter()
    if kind == "pairwise":
        paths = [Path(p) for p in ([predictions] if isinstance(predictions, (str, Path)) else predictions)]
        if len(paths) != 2:
            raise JudgeInputError(f"pairwise judging needs two samples.jsonl files, got {len(paths)}")
        if names is None:
            names = [_default_name(p) for p in paths]
        if len(names) != 2 or names[0] == names[1]:
            raise JudgeInputError(f"pairwise judging needs two different model names, got {list(names)} "
                                  "(give them explicitly)")  # fmt: skip
        rows = [[row for row in read_jsonl(p) if task is None or row.get("task") in (None, task)] for p in paths]
        results = judge_battles(rows[0], rows[1], names[0], names[1], config, out / "battles.jsonl",
                                client=client, with_reference=with_reference, limit=limit)  # fmt: skip
        results["inputs"] = {"samples_a": str(paths[0]), "samples_b": str(paths[1])}
    else:
        if not isinstance(predictions, (str, Path)):
            raise JudgeInputError(f"{kind} judging takes one predictions file")
        items = read_items(predictions, references, task=task)
        if limit is not None:
            items = items[: max(0, int(limit))]
        fn = judge_relative if kind == "relative" else judge_grades
        results = fn(items, config, client=client)
        results["inputs"] = {"predictions": str(predictions), "references": None if references is None
                             else str(references), "task": task, "limit": limit}  # fmt: skip
    results["elapsed_s"] = round(time.perf_counter() - t0, 3)
    records = results.pop("items")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "judgements.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(out / "results.json", results)
    return results


def format_summary(results: dict) -> str:
    """A few lines for the terminal."""
    c = results["counts"]
    head = (f"judge {results['judge']['model']} at {results['judge']['base_url']}: {c['n']} items, {c['judged']} "
            f"judged, {c['failed']} failed, {c['missing']} missing, {c['cached']} replies from cache")  # fmt: skip
    lines = [head]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"

    if results["kind"] == "relative":
        lines.append(f"relative score {fmt(results['score'])}")
        lines += [f"  {k}: {fmt(v['relative'])} (reference {fmt(v['reference'])}, candidate {fmt(v['candidate'])}, "
                  f"n={v['judged']})" for k, v in results["by_category"].items()]  # fmt: skip
    elif results["kind"] == "grade":
        lines.append(f"score {fmt(results['score'])}")
        lines += [f"  {k}: {fmt(v['score'])} (n={v['judged']})" for k, v in results["by_category"].items()]
    else:
        w = results["wins"]
        lines.append(f"{results['battles']} battles: " + ", ".join(f"{k} {v}" for k, v in w.items())
                     + f" ({results['inconsistent']} inconsistent verdicts -> tie)")
        if results.get("battles_path"):
            lines.append(f"battles in {results['battles_path']}; rank with: vlmkit arena {results['battles_path']}")
    return "\n".join(lines)
