"""LLM-as-judge (eval/judge.py) against a scripted OpenAI-compatible server on localhost.

The server reads the answers out of the judge prompt and replies deterministically: ``score=N``
in an answer is its 1-10 rating, ``grade=X`` its correctness, ``quality=N`` decides a pairwise
verdict; ``GARBAGE_ONCE`` gets an unreadable first reply, ``GARBAGE_ALWAYS`` only unreadable ones.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlmkit.eval.arena import leaderboard, read_battles
from vlmkit.eval.judge import (
    JudgeConfig,
    JudgeError,
    OpenAIJudgeClient,
    combine_verdicts,
    judge_battles,
    judge_grades,
    judge_main,
    judge_relative,
    format_summary,
    parse_grade,
    parse_relative,
    parse_verdict,
    read_items,
)

KEY_ENV = "VLMKIT_TEST_JUDGE_KEY"
SECRET = "sk-test-SECRET-4242"


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def _num(text: str, name: str) -> str:
    return re.search(name + r"=([0-9.]+)", text).group(1)


def _scripted_reply(body: dict, mode: str) -> str:
    msgs = body["messages"]
    user = msgs[1]["content"]
    retry = len(msgs) > 2  # the client appended its reply and a format reminder
    if "[Answer 1]" in user:  # relative (LLaVA-Bench)
        ref = _between(user, "[Answer 1]\n", "\n\n[Answer 2]")
        cand = _between(user, "[Answer 2]\n", "\n\n[Instructions]")
        if "GARBAGE_ALWAYS" in cand or ("GARBAGE_ONCE" in cand and not retry):
            return "Both answers are quite good, I would say."
        return f"{_num(ref, 'score')} {_num(cand, 'score')}\nAnswer 2 misses some details."
    if "Correctness" in user:  # grade (MM-Vet)
        if "GARBAGE_ALWAYS" in user or ("GARBAGE_ONCE" in user and not retry):
            return "The answer is partly right."
        return _num(user, "grade")
    if "Which option does the answer choose?" in user:  # MCQ option placement
        answer = _between(user, "[Answer]\n", "\n\nWhich option")
        if "GARBAGE" in answer:
            return "It is hard to say."
        m = re.search(r"the (first|second|third) one", answer)
        return {"first": "A", "second": "B", "third": "C"}[m.group(1)] if m else "none"
    if "[Answer A]" in user:  # pairwise
        if mode == "always_a":
            return "A\nThe first answer is better."
        a = float(_num(_between(user, "[Answer A]\n", "\n\n[Answer B]"), "quality"))
        b = float(_num(_between(user, "[Answer B]\n", "\n\n[Instructions]"), "quality"))
        return ("A" if a > b else "B" if b > a else "tie") + "\nreason"
    return "?"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state["lock"]:
            state["requests"].append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": "not found"}})
        elif state["mode"] == "500":
            self._send(500, {"error": {"message": "internal error"}})
        elif state["mode"] == "401":
            self._send(401, {"error": {"message": "bad key"}})
        else:
            reply = _scripted_reply(body, state["mode"])
            self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                          "finish_reason": "stop"}]})


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = {"lock": threading.Lock(), "requests": [], "mode": "script"}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", httpd.state
    httpd.shutdown()
    httpd.server_close()


def _config(base_url: str, tmp_path, cache: str | None = "cache.jsonl", **kw) -> JudgeConfig:
    kw = {"max_retries": 2, "http_retries": 2, "backoff_s": 0.0, "timeout_s": 5.0, **kw}
    return JudgeConfig(base_url=base_url, model="judge-test", api_key_env=KEY_ENV,
                       cache_path=None if cache is None else tmp_path / cache, **kw)


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


REFERENCES = [
    {"id": "q1", "question": "What is in the image?", "answer": "score=8", "category": "conv",
     "context": "A red circle left of a blue square."},
    {"id": "q2", "question": "What colour is the circle?", "answer": "score=10", "category": "conv"},
    {"id": "q3", "question": "Describe the image.", "answer": "score=8", "category": "detail"},
    {"id": "q4", "question": "Describe it in detail.", "answer": "score=6", "category": "detail"},
    {"id": "q5", "question": "Describe everything.", "answer": "score=9", "category": "detail"},
    {"id": "q6", "question": "Why is the square blue?", "answer": "score=7", "category": "complex"},
]
PREDICTIONS = [
    {"id": "q1", "prediction": "score=6"},
    {"id": "q2", "prediction": "score=9"},
    {"id": "q3", "prediction": "score=4"},
    {"id": "q4", "prediction": "score=6 GARBAGE_ONCE"},
    {"id": "q5", "prediction": "GARBAGE_ALWAYS score=1"},
]  # q6 has no prediction: missing


def _relative_files(tmp_path):
    _write_jsonl(tmp_path / "refs.jsonl", REFERENCES)
    _write_jsonl(tmp_path / "preds.jsonl", PREDICTIONS)
    return tmp_path / "preds.jsonl", tmp_path / "refs.jsonl"


def test_parsers():
    assert parse_relative("8 7\nAnswer 2 is shorter.") == (8.0, 7.0)
    assert parse_relative("**8, 6.5**") == (8.0, 6.5)
    assert parse_relative("8/10 7/10") == (8.0, 7.0)
    assert parse_relative("Assistant 1: 8, Assistant 2: 7") is None
    assert parse_relative("8 11") is None and parse_relative("0 5") is None and parse_relative("") is None
    assert parse_relative("8\n7") is None
    assert parse_grade("0.7") == 0.7 and parse_grade("1.0.") == 1.0 and parse_grade(" 0 ") == 0.0
    assert parse_grade("1.5") is None and parse_grade("about 0.5") is None and parse_grade("-0.2") is None
    assert parse_verdict("A\nbecause") == "A" and parse_verdict("[[B]]") == "B" and parse_verdict("Tie.") == "tie"
    assert parse_verdict("Answer A") == "A" and parse_verdict("A is better") is None
    assert combine_verdicts("A", "B") == "model_a" and combine_verdicts("B", "A") == "model_b"
    assert combine_verdicts("A", "A") == "tie" and combine_verdicts("tie", "B") == "tie"


def test_relative_score_retry_failure_and_cache(server, tmp_path):
    url, state = server
    preds, refs = _relative_files(tmp_path)
    config = _config(url, tmp_path)
    res = judge_main("relative", preds, config, tmp_path / "out", references=refs)

    # conv: candidates 6, 9 / references 8, 10 -> 7.5 / 9; detail: 4, 6 / 8, 6 (q5 failed) -> 5 / 7
    assert res["by_category"]["conv"]["relative"] == pytest.approx(7.5 / 9 * 100)
    assert res["by_category"]["detail"]["relative"] == pytest.approx(5 / 7 * 100)
    assert res["by_category"]["detail"]["failed"] == 1
    assert res["by_category"]["complex"]["relative"] is None and res["by_category"]["complex"]["missing"] == 1
    assert res["score"] == pytest.approx(6.25 / 8 * 100)  # pooled over the 4 judged items
    assert res["overall"]["reference"] == 8.0 and res["overall"]["candidate"] == 6.25
    # q1-q3 one request each, q4 garbage then a good reply, q5 three unreadable replies
    assert res["counts"] == {"n": 6, "judged": 4, "failed": 1, "missing": 1, "retried": 2, "cached": 0,
                             "requests": 8}
    assert len(state["requests"]) == 8
    assert res["failed_ids"] == ["q5"] and res["missing_ids"] == ["q6"]
    assert res["judge"]["model"] == "judge-test" and res["judge"]["base_url"] == url
    assert res["judge"]["temperature"] == 0.0 and "[Answer 2]" in res["prompt"]["user"]
    # the context reached the judge; a re-ask carries the earlier reply and a format reminder
    first = state["requests"][0]["body"]
    assert "A red circle left of a blue square." in first["messages"][1]["content"]
    assert first["model"] == "judge-test" and first["temperature"] == 0.0 and first["max_tokens"] == 512
    assert any(len(r["body"]["messages"]) == 4 for r in state["requests"])

    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["score"] == res["score"] and "items" not in on_disk
    assert "relative score 78.1" in format_summary(res) and "1 failed, 1 missing" in format_summary(res)
    records = [json.loads(line) for line in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["judged", "judged", "judged", "judged", "failed", "missing"]
    assert records[4]["attempts"] == 3 and len(records[4]["replies"]) == 3

    # a cached answer is not asked again, even after a crash tore the cache's last line
    with open(tmp_path / "cache.jsonl", "a", encoding="utf-8") as f:
        f.write('{"key": "abc", "rep')
    again = judge_main("relative", preds, config, tmp_path / "out2", references=refs)
    assert len(state["requests"]) == 8
    assert again["counts"]["cached"] == 8 and again["counts"]["requests"] == 0
    assert again["score"] == res["score"] and again["counts"]["failed"] == 1

    # after the torn line, new answers are appended on lines of their own and read back
    extra = [{"id": "n1", "question": "?", "prediction": "score=3", "answer": "score=6", "category": "conv"}]
    r3 = judge_relative(extra, config)
    assert r3["counts"]["requests"] == 1 and r3["score"] == pytest.approx(50.0)
    r4 = judge_relative(extra, config)
    assert r4["counts"]["requests"] == 0 and r4["counts"]["cached"] == 1


def test_grades_mean_and_by_capability(server, tmp_path):
    url, state = server
    items = [
        {"id": "g1", "question": "What is it?", "prediction": "grade=1.0", "answer": "a cat", "category": ["rec"]},
        {"id": "g2", "question": "Read it.", "prediction": "grade=0.5", "answer": "STOP <AND> 4", "category": "rec,ocr"},
        {"id": "g3", "question": "Read this.", "prediction": "grade=0.0", "answer": "EXIT", "category": ["ocr"]},
        {"id": "g4", "question": "Sum?", "prediction": "grade=0.7 GARBAGE_ONCE", "answer": "12", "category": ["math"]},
        {"id": "g5", "question": "Product?", "prediction": "grade=1.5", "answer": "42", "category": ["math"]},
    ]
    _write_jsonl(tmp_path / "items.jsonl", items)
    res = judge_grades(read_items(tmp_path / "items.jsonl"), _config(url, tmp_path))
    assert res["score"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.7) / 4 * 100)  # g5's 1.5 is out of range: failed
    assert res["by_category"]["rec"]["score"] == pytest.approx(75.0)
    assert res["by_category"]["ocr"]["score"] == pytest.approx(25.0)
    assert res["by_category"]["math"]["score"] == pytest.approx(70.0) and res["by_category"]["math"]["failed"] == 1
    assert res["by_combination"]["ocr,rec"]["score"] == pytest.approx(50.0)
    assert res["counts"]["failed"] == 1 and res["failed_ids"] == ["g5"] and res["counts"]["requests"] == 3 + 2 + 3
    assert "<AND>" in res["prompt"]["user"]
    sent = state["requests"][1]["body"]["messages"][1]["content"]
    assert "STOP  <AND>  4" in sent and "| grade=0.5 |" in sent


def test_api_key_sent_but_never_written(server, tmp_path, monkeypatch):
    url, state = server
    preds, refs = _relative_files(tmp_path)
    monkeypatch.setenv(KEY_ENV, SECRET + "\n")  # a stray newline (from a key file) is stripped
    judge_main("relative", preds, _config(url, tmp_path), tmp_path / "out", references=refs)
    assert state["requests"] and all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in state["requests"])
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("refs.jsonl", "preds.jsonl")]
    assert {p.name for p in written} >= {"cache.jsonl", "results.json", "judgements.jsonl"}
    for p in written:
        assert SECRET not in p.read_text(encoding="utf-8"), p
    # no key in the environment: no Authorization header (local servers)
    monkeypatch.delenv(KEY_ENV)
    n = len(state["requests"])
    judge_relative([{"id": "x", "question": "?", "prediction": "score=2", "reference": "score=4"}],
                   _config(url, tmp_path, cache=None))
    assert "Authorization" not in state["requests"][n]["headers"]


def test_http_errors_are_retried_then_raised(server, tmp_path):
    url, state = server
    item = [{"id": "x", "question": "?", "prediction": "score=2", "reference": "score=4"}]
    state["mode"] = "500"
    with pytest.raises(JudgeError, match=r"127\.0\.0\.1.*/chat/completions.*HTTP 500"):
        judge_relative(item, _config(url, tmp_path))
    assert len(state["requests"]) == 3  # the first try and http_retries=2 more
    assert not (tmp_path / "cache.jsonl").exists()  # nothing cached from a failed request
    state["mode"] = "401"
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge_relative(item, _config(url, tmp_path))
    assert len(state["requests"]) == 4  # a client error is not retried
    with socket.socket() as s:  # a port with no server behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match=f"127.0.0.1:{port}.*connection error"):
        judge_relative(item, _config(f"http://127.0.0.1:{port}/v1", tmp_path, http_retries=1))


def _samples(preds: dict, blind_pred: str | None = None) -> list[dict]:
    rows = [{"id": qid, "task": task, "question_type": "vqa", "prompt": f"Question {qid}?", "prediction": p,
             "target": "the answer", "blind": False} for (task, qid), p in preds.items()]
    if blind_pred is not None:
        rows.append({"id": "1", "task": "t", "prompt": "Question 1?", "prediction": blind_pred, "blind": True})
    return rows


def test_battles_read_back_and_position_bias(server, tmp_path):
    url, state = server
    a = _samples({("t", "1"): "quality=8", ("t", "2"): "quality=3", ("t", "3"): "quality=5",
                  ("u", "1"): "quality=9", ("t", "9"): "quality=1"}, blind_pred="quality=0")
    b = _samples({("t", "1"): "quality=6", ("t", "2"): "quality=9", ("t", "3"): "quality=5, said otherwise",
                  ("u", "1"): "quality=2"})
    for name, rows in (("model-a", a), ("model-b", b)):
        (tmp_path / name).mkdir()
        _write_jsonl(tmp_path / name / "samples.jsonl", rows)
    paths = [tmp_path / "model-a" / "samples.jsonl", tmp_path / "model-b" / "samples.jsonl"]
    res = judge_main("pairwise", paths, _config(url, tmp_path), tmp_path / "out")  # names from the folders

    battles = read_battles(tmp_path / "out" / "battles.jsonl")
    assert not battles.malformed and len(battles) == 4
    assert [(b["model_a"], b["model_b"], b["winner"]) for b in battles] == [
        ("model-a", "model-b", "model_a"), ("model-a", "model-b", "model_b"),
        ("model-a", "model-b", "tie"), ("model-a", "model-b", "model_a")]
    raw = [json.loads(line) for line in (tmp_path / "out" / "battles.jsonl").read_text().splitlines()]
    assert [(r["task"], r["question_id"]) for r in raw] == [("t", "1"), ("t", "2"), ("t", "3"), ("u", "1")]
    assert all(r["judge"] == "judge-test" for r in raw)
    assert res["wins"] == {"model-a": 2, "model-b": 1, "tie": 1} and res["inconsistent"] == 0
    assert res["only_a"] == 1 and res["only_b"] == 0
    assert res["counts"]["requests"] == 8  # both orders for each of the 4 matched questions
    # each question was shown both ways round, and the reference answer was shown
    shown = [r["body"]["messages"][1]["content"] for r in state["requests"][:2]]
    assert _between(shown[0], "[Answer A]\n", "\n\n") == "quality=8"
    assert _between(shown[1], "[Answer A]\n", "\n\n") == "quality=6"
    assert "[Reference answer]\nthe answer" in shown[0] and "quality=0" not in "".join(shown)
    assert leaderboard(battles, n_bootstrap=0)[0]["model"] == "model-a"
    assert "vlmkit arena" in format_summary(res)

    # a judge that always prefers the first answer shown: every battle is a tie
    state["mode"] = "always_a"
    biased = judge_battles(a, b, "model-a", "model-b", _config(url, tmp_path, cache=None), tmp_path / "biased.jsonl")
    assert [x["winner"] for x in read_battles(tmp_path / "biased.jsonl")] == ["tie"] * 4
    assert biased["inconsistent"] == 4 and biased["wins"]["tie"] == 4


def test_inputs_from_a_samples_file_and_bad_inputs(server, tmp_path):
    url, _ = server
    rows = _samples({("t", "1"): "score=5", ("t", "2"): "score=10"}, blind_pred="score=1")
    for r, ref in zip(rows, ("score=10", "score=10")):
        r["target"] = ref
    _write_jsonl(tmp_path / "samples.jsonl", rows)
    items = read_items(tmp_path / "samples.jsonl")  # the blind row is skipped
    assert [(i["id"], i["category"], i["question"]) for i in items] == [("1", "vqa", "Question 1?"),
                                                                       ("2", "vqa", "Question 2?")]
    res = judge_relative(items, _config(url, tmp_path))
    assert res["score"] == pytest.approx(75.0) and list(res["by_category"]) == ["vqa"]

    from vlmkit.eval.judge import JudgeInputError

    _write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "question": "?", "prediction": "", "answer": "x"}] * 2)
    with pytest.raises(JudgeInputError, match="duplicate id"):
        read_items(tmp_path / "dup.jsonl")
    _write_jsonl(tmp_path / "refs.jsonl", REFERENCES)
    _write_jsonl(tmp_path / "stray.jsonl", [{"id": "zz", "prediction": "x"}])
    with pytest.raises(JudgeInputError, match="not in"):
        read_items(tmp_path / "stray.jsonl", tmp_path / "refs.jsonl")
    with pytest.raises(JudgeInputError, match="two different"):
        judge_battles(rows, rows, "same", "same", _config(url, tmp_path), None)
    with pytest.raises(ValueError):
        JudgeConfig(base_url="", model="m")
    assert OpenAIJudgeClient(_config(url, tmp_path)).config.url == url + "/chat/completions"


def test_the_cli_judges_and_then_the_arena_ranks(server, tmp_path, capsys):
    """`vlmkit judge pairwise` writes battles that `vlmkit arena` reads; a judge error is a clean
    exit 2, not a traceback."""
    from vlmkit.cli import main

    url, state = server
    for name, quality in (("good", 9), ("bad", 2)):
        rows = [{"id": str(i), "task": "t", "prompt": f"Question {i}?", "prediction": f"quality={quality}",
                 "target": "x", "blind": False} for i in range(3)]  # fmt: skip
        (tmp_path / name).mkdir()
        _write_jsonl(tmp_path / name / "samples.jsonl", rows)
    out = tmp_path / "judged"
    argv = ["judge", "pairwise", str(tmp_path / "good" / "samples.jsonl"), str(tmp_path / "bad" / "samples.jsonl"),
            "--base-url", url, "--judge-model", "judge-test", "--out", str(out), "--api-key-env", KEY_ENV]
    assert main(argv) == 0
    assert (out / "judge_cache.jsonl").exists()  # the default cache lives in OUT
    assert [b["winner"] for b in read_battles(out / "battles.jsonl")] == ["model_a"] * 3
    assert main(["arena", str(out / "battles.jsonl"), "--out", str(tmp_path / "arena")]) == 0
    assert "good" in capsys.readouterr().out
    dead = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    assert main(["judge", "grade", str(tmp_path / "good" / "samples.jsonl"), "--base-url", dead,
                 "--judge-model", "m", "--out", str(tmp_path / "x"), "--http-retries", "0"]) == 2


def test_mcq_answers_no_rule_reads_go_to_the_judge_when_configured(server, tmp_path):
    """Rules first; the judge only for what they can't read; "none" and unreadable replies are
    failures (wrong), and results record the judge."""
    from test_eval_formats import HEADER, b64, png, write_tsv
    from vlmkit.eval.benchmark_tasks import mark_benchmark
    from vlmkit.eval.formats.vlmevalkit import read_vlmevalkit
    from vlmkit.eval.option_judge import OptionJudge
    from vlmkit.eval.runner import run_evaluation

    url, state = server
    image = b64(png((16, 16)))
    rows = [[str(i), image if i == 1 else "1", f"Q{i}?", "", "red", "blue", "green", "", answer, "c", "l2", "dev"]
            for i, answer in ((1, "A"), (2, "B"), (3, "C"), (4, "A"))]  # fmt: skip
    samples = mark_benchmark(read_vlmevalkit(write_tsv(tmp_path / "q.tsv", HEADER, rows)))
    answers = {"1": "A", "2": "i would say the second one", "3": "GARBAGE", "4": "no idea at all"}

    def predictor(batch):
        return [answers[str(s.meta["index"])] for s in batch]

    judge = OptionJudge(_config(url, tmp_path))
    res = run_evaluation(predictor, samples, tmp_path / "out", tasks=["benchmark_mcq"], judge=judge)
    task = res["tasks"]["benchmark_mcq"]
    assert task["extraction"] == {"failed": 2, "judge": 1, "rule_letter": 1}
    assert task["metrics"]["accuracy"] == 0.5  # 1 by rule, 2 by the judge; 3 unreadable, 4 none
    recorded = res["config"]["judge"]
    assert recorded["model"] == "judge-test" and recorded["asked"] == 3 and recorded["unreadable"] == 1
    assert "Which option does the answer choose?" in recorded["prompt"]["user"]
    # the rule-read answer never reached the judge; the unreadable one was re-asked
    asked = [r["body"]["messages"][1]["content"] for r in state["requests"]]
    assert not any("[Answer]\nA\n" in a for a in asked) and len(asked) == 1 + (1 + 2) + 1
    # without a judge the same answers are rule-only
    plain = run_evaluation(predictor, samples, tmp_path / "plain", tasks=["benchmark_mcq"])
    assert plain["tasks"]["benchmark_mcq"]["extraction"] == {"failed": 3, "rule_letter": 1}
    assert "judge" not in plain["config"]
