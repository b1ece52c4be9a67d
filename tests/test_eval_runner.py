import json

import pytest

from eval_helpers import N_EVALUATED, make_world, oracle, sighted
from vlmkit.eval.runner import run_evaluation
from vlmkit.utils.io import read_jsonl

ROW_FIELDS = {"id", "task", "question_type", "prompt", "prediction", "extracted", "method", "target", "score",
              "blind", "extra", "item", "images", "elapsed_s"}


def _without_timing(res):
    """The parts of the results that must not depend on how the run was split up."""
    strip = lambda d: {k: {kk: vv for kk, vv in v.items() if kk != "elapsed_s"} for k, v in d.items()}
    return {"tasks": strip(res["tasks"]), "blind": strip(res["blind"]), "image_gain": res["image_gain"],
            "data": res["data"], "fingerprint": res["fingerprint"]}


def test_oracle_scores_one_everywhere(tmp_path):
    samples = make_world(tmp_path / "world")
    res = run_evaluation(oracle, samples, tmp_path / "out", batch_size=4, info={"model": {"name": "oracle"}})
    t = res["tasks"]
    assert set(t) == {"shapes_vqa", "shapes_pope", "shapes_grounding", "shapes_mcq"}
    assert t["shapes_vqa"]["n"] == 7
    assert t["shapes_vqa"]["metrics"]["accuracy"] == 1.0
    assert t["shapes_vqa"]["metrics"]["by_type"] == {
        "color": 1.0, "count_color": 1.0, "count_total": 1.0, "shape": 1.0, "spatial": 1.0}
    assert t["shapes_vqa"]["extraction"] == {"exact": 7}
    pope = t["shapes_pope"]["metrics"]
    assert list(pope) == ["random", "popular", "adversarial", "all"]
    assert pope["random"] == pytest.approx(
        {"n": 2, "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5,
         "n_unparsed": 0, "tp": 1, "fp": 0, "tn": 1, "fn": 0})
    # the popular split here has only a "no" item: no positives, so precision = recall = f1 = 0
    assert pope["popular"]["accuracy"] == 1.0 and pope["popular"]["yes_ratio"] == 0.0
    assert pope["adversarial"]["yes_ratio"] == 1.0 and pope["all"]["accuracy"] == 1.0
    assert t["shapes_grounding"]["metrics"] == {"n": 3, "acc_iou50": 1.0, "mean_iou": 1.0, "n_unparsed": 0}
    mcq = t["shapes_mcq"]["metrics"]
    assert mcq["accuracy"] == 1.0 and mcq["by_letter"] == {"A": 1.0, "B": 1.0}
    assert mcq["pred_letter_ratio"] == {"A": 0.5, "B": 0.5}
    assert res["blind"] == {} and res["image_gain"] == {}
    assert res["model"] == {"name": "oracle"}
    assert res["data"]["n_rows"] == 17 and res["data"]["not_evaluated"] == {"caption/caption": 1}
    assert res["timing"]["items_predicted"] == N_EVALUATED
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["tasks"] == res["tasks"]


def test_samples_jsonl_fields(tmp_path):
    samples = make_world(tmp_path / "world")
    run_evaluation(oracle, samples, tmp_path / "out", batch_size=5)
    rows = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert len(rows) == N_EVALUATED
    assert all(ROW_FIELDS <= set(r) for r in rows)
    g1 = next(r for r in rows if r["id"] == "g1")
    assert g1["prompt"] == "Where is the red square?"
    assert g1["prediction"] == "[0.250, 0.250, 0.750, 0.750]"
    assert g1["extracted"] == g1["target"] and g1["method"] == "exact" and g1["score"] == 1.0
    assert g1["extra"]["iou"] == pytest.approx(1.0) and g1["blind"] is False
    assert g1["images"] == ["images/a.png"]
    p3 = next(r for r in rows if r["id"] == "p3")
    assert p3["extra"] == {"split": "popular"}


def test_predictor_sees_prompt_only(tmp_path):
    seen = []

    def spy(batch):
        seen.extend(batch)
        return sighted(batch)

    run_evaluation(spy, make_world(tmp_path / "world"), tmp_path / "out", blind=True, batch_size=3)
    assert len(seen) == 2 * N_EVALUATED
    assert all(t.role != "assistant" for s in seen for t in s.turns)
    blind = [s for s in seen if not s.images]
    assert len(blind) == N_EVALUATED
    assert all(not p.is_image for s in blind for t in s.turns for p in t.parts)
    assert blind[0].turns[0].text == "What colour is the square?"  # placeholder whitespace dropped


def test_blind_gap_shows_in_image_gain(tmp_path):
    res = run_evaluation(sighted, make_world(tmp_path / "world"), tmp_path / "out", blind=True, batch_size=4)
    assert res["tasks"]["shapes_vqa"]["metrics"]["accuracy"] == 1.0
    assert res["blind"]["shapes_vqa"]["metrics"]["accuracy"] == 0.0
    assert res["blind"]["shapes_vqa"]["extraction"] == {"failed": 2, "rule:first_word": 5}
    assert res["blind"]["shapes_pope"]["metrics"]["all"]["n_unparsed"] == 4
    assert res["blind"]["shapes_grounding"]["metrics"]["acc_iou50"] == 0.0
    assert res["image_gain"] == {
        "shapes_vqa": {"color": 1.0, "count_color": 1.0, "count_total": 1.0, "shape": 1.0, "spatial": 1.0},
        "shapes_pope": {"exists": 1.0},
        "shapes_grounding": {"ground_ref": 1.0},
        "shapes_mcq": {"color": 1.0},
    }
    rows = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert sum(r["blind"] for r in rows) == N_EVALUATED


def test_limit_takes_first_items_per_task(tmp_path):
    res = run_evaluation(oracle, make_world(tmp_path / "world"), tmp_path / "out", limit=2, tasks=["shapes_vqa", "shapes_mcq"])
    assert {k: v["n"] for k, v in res["tasks"].items()} == {"shapes_vqa": 2, "shapes_mcq": 2}
    rows = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert [r["id"] for r in rows] == ["v1", "v2", "m1", "m2"]


class Boom(RuntimeError):
    pass


def test_resume_predicts_only_the_rest_and_matches_uninterrupted(tmp_path):
    world = make_world(tmp_path / "world")
    full = run_evaluation(sighted, world, tmp_path / "full", blind=True, batch_size=2)

    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 4:  # three batches of 2 finish, the fourth dies
            raise Boom()
        return sighted(batch)

    out = tmp_path / "resumed"
    with pytest.raises(Boom):
        run_evaluation(flaky, world, out, blind=True, batch_size=2)
    assert len(read_jsonl(out / "samples.jsonl")) == 6
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"id": "v4", "task": "shap')  # a torn line, as a crash mid-write leaves it

    counted = []

    def counting(batch):
        counted.extend(s.id for s in batch)
        return sighted(batch)

    res = run_evaluation(counting, world, out, blind=True, batch_size=2, resume=True)
    assert len(counted) == 2 * N_EVALUATED - 6
    assert res["timing"]["items_resumed"] == 6 and res["timing"]["items_predicted"] == 2 * N_EVALUATED - 6
    assert _without_timing(res) == _without_timing(full)
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 2 * N_EVALUATED
    assert len({(r["task"], r["item"], r["blind"]) for r in rows}) == 2 * N_EVALUATED

    # resuming a finished run predicts nothing
    counted.clear()
    again = run_evaluation(counting, world, out, blind=True, batch_size=2, resume=True)
    assert counted == [] and _without_timing(again) == _without_timing(full)


def test_resume_refuses_other_data(tmp_path):
    world = make_world(tmp_path / "world")
    run_evaluation(oracle, world, tmp_path / "out")
    world[0].meta["answer"] = "green"
    with pytest.raises(ValueError, match="cannot resume"):
        run_evaluation(oracle, world, tmp_path / "out", resume=True)


def test_without_resume_starts_over(tmp_path):
    world = make_world(tmp_path / "world")
    run_evaluation(oracle, world, tmp_path / "out")
    run_evaluation(oracle, world, tmp_path / "out")
    assert len(read_jsonl(tmp_path / "out" / "samples.jsonl")) == N_EVALUATED


def test_predictor_contract_is_checked(tmp_path):
    world = make_world(tmp_path / "world")
    with pytest.raises(ValueError, match="outputs"):
        run_evaluation(lambda b: ["yes"], world, tmp_path / "a", batch_size=2)
    with pytest.raises(TypeError):
        run_evaluation(lambda b: [None] * len(b), world, tmp_path / "b")


def test_evaluate_glue_with_a_fake_load_predictor(tmp_path, monkeypatch):
    """evaluate(): reads test.json with read_llava, builds the predictor, writes all three outputs."""
    import vlmkit.infer.predictor as predictor_mod
    from eval_helpers import make_png
    from vlmkit.eval.runner import evaluate, file_sha256

    data = tmp_path / "data"
    make_png(data / "images" / "a.png")
    rows = [
        {"id": "q1", "image": "images/a.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}],
         "meta": {"task": "vqa", "question_type": "color", "answer": "red"}},
        {"id": "q2", "image": "images/a.png",
         "conversations": [{"from": "human", "value": "<image>\nIs there a square?"}, {"from": "gpt", "value": "yes"}],
         "meta": {"task": "pope", "question_type": "exists", "answer": "yes", "pope_split": "random"}},
    ]
    (data / "test.json").write_text(json.dumps(rows))
    calls = {}

    def fake_load_predictor(checkpoint, **kwargs):
        calls.update(kwargs, checkpoint=checkpoint)
        return sighted, {"name": "fake"}

    monkeypatch.setattr(predictor_mod, "load_predictor", fake_load_predictor)
    res = evaluate("ckpt", data, tmp_path / "out", blind=True, max_new_tokens=7)
    assert calls == {"checkpoint": "ckpt", "image_root": data, "max_new_tokens": 7}
    assert res["model"] == {"checkpoint": "ckpt", "name": "fake"}
    assert res["data"]["sha256"] == file_sha256(data / "test.json") and res["data"]["n_rows"] == 2
    assert res["data"]["size"] == (data / "test.json").stat().st_size
    for task in res["tasks"].values():  # how every task's answers were asked for and generated
        assert "{question}" in task["prompt_template"]
        assert task["generation"]["batch_size"] == 32 and task["generation"]["greedy"] is True
    assert res["image_gain"] == {"shapes_vqa": {"color": 1.0}, "shapes_pope": {"exists": 1.0}}
    for name in ("results.json", "samples.jsonl", "report.html"):
        assert (tmp_path / "out" / name).exists()


def test_shapes_chair_counts_hallucinated_objects_against_the_scene(tmp_path):
    from vlmkit.data.sample import ImageRef, Part, Sample, Turn
    from vlmkit.eval.runner import run_evaluation

    scene = {"objects": [{"shape": "circle", "color": "red", "size": "large"},
                         {"shape": "square", "color": "blue", "size": "small"}]}  # fmt: skip

    def caption_row(sid: str) -> Sample:
        turns = [Turn("user", [Part(image=0), Part(text="Describe the image.")]), Turn.of_text("assistant", "x")]
        return Sample(sid, turns, [ImageRef(path="a.png")], {"task": "caption", "question_type": "caption_short",
                                                              "scene": scene})  # fmt: skip

    answers = {"c1": "a red circle and a green triangle.", "c2": "a blue square.", "c3": "a blue circle."}
    res = run_evaluation(lambda batch: [answers[s.id] for s in batch], [caption_row(k) for k in answers],
                         tmp_path / "out", tasks=["shapes_chair"])  # fmt: skip
    m = res["tasks"]["shapes_chair"]["metrics"]
    # objects: c1 circle, triangle (triangle absent); c2 square; c3 circle -> 1 of 4 mentions, 1 of 3 captions
    assert m["chair_i"] == 0.25 and m["chair_s"] == 1 / 3
    # colour-shape pairs: red circle ok, green triangle no, blue square ok, blue circle no -> 2 of 4, 2 of 3
    assert m["attribute_chair_i"] == 0.5 and m["attribute_chair_s"] == 2 / 3
    assert m["mentions_per_caption"] == 4 / 3


def test_items_answered_right_without_the_image_are_listed(tmp_path):
    from vlmkit.eval.report import write_report
    from vlmkit.eval.tasks import target_of

    samples = make_world(tmp_path / "world")

    def predictor(batch):  # right with the image; blind it always says "yes"
        return [target_of(s) if s.images else "yes" for s in batch]

    res = run_evaluation(predictor, samples, tmp_path / "out", blind=True, batch_size=4)
    pope_yes = [s.id for s in samples if s.meta.get("task") == "pope" and s.meta.get("answer") == "yes"]
    n_pope = sum(1 for s in samples if s.meta.get("task") == "pope")
    leaked = res["answered_without_image"]["shapes_pope"]
    assert pope_yes and sorted(leaked["ids"]) == sorted(pope_yes)
    assert leaked["n"] == len(pope_yes) and leaked["share"] == len(pope_yes) / n_pope
    report = write_report(res, tmp_path / "out" / "samples.jsonl", tmp_path / "world", tmp_path / "r.html")
    html = report.read_text()
    assert "Answered correctly without the image" in html and all(sid in html for sid in pope_yes)


def test_leakage_against_a_base_llm(tiny_world, tmp_path):
    """``vlmkit eval --blind --base-llm``: the text-only LLM answers the same questions without
    images; ML = max(0, blind VLM - base LLM) per task, from the two runs' own metrics."""
    from _model_helpers import make_model
    from transformers import AutoModelForCausalLM

    from vlmkit.cli import main
    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
    from vlmkit.eval.tasks import primary_value
    from vlmkit.models.checkpoint_io import save_checkpoint

    model, tok = make_model()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(model.llm.config).save_pretrained(base)  # a random text-only LM
    tok.save_pretrained(base)
    args = ["eval", str(ckpt), "--data", str(tiny_world), "--out", str(tmp_path / "e"), "--limit", "3", "--blind",
            "--base-llm", str(base)]  # fmt: skip
    assert main(args) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    base_res = json.loads((tmp_path / "e" / "base_llm" / "results.json").read_text())
    assert set(res["leakage"]["tasks"]) == set(res["blind"])
    for name, row in res["leakage"]["tasks"].items():
        assert row["blind_vlm"] == primary_value(name, res["blind"][name]["metrics"])
        assert row["base_llm"] == primary_value(name, base_res["tasks"][name]["metrics"])
        assert row["ml"] == max(0.0, row["blind_vlm"] - row["base_llm"])
