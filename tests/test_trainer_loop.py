import pytest
import torch

from safetensors.torch import load_model, save_model

from helpers_train import ToyVLM, fake_collate, fake_encode, make_source
from vlmkit.config import StageConfig
from vlmkit.data.bad_samples import BadSampleError, BadSampleLog, TooManyBadSamples
from vlmkit.train.checkpoints import CheckpointManager, checkpoint_dirs, latest_checkpoint
from vlmkit.train.trainer import RunContext, StageTrainer, StopRun, train_stages
from vlmkit.utils.io import read_jsonl


def _save_model(model, d):
    save_model(model, str(d / "model.safetensors"))


def _ctx(run_dir, bad_log=None, **kw):
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(
        run_dir=run_dir,
        bad_log=bad_log or BadSampleLog(max_fraction=0.5),
        collate_fn=fake_collate,
        pad_id=0,
        seed=3,
        checkpoints=CheckpointManager(run_dir / "checkpoints", _save_model, keep_last=2),
        progress_bar=False,
        **kw,
    )


def _stage(name="s", **kw):
    base = dict(name=name, data={"a": 2.0, "b": 1.0}, trainable=["connector", "llm"], lr={"connector": 1e-2, "llm": 5e-3},
                steps=5, batch_size=2, grad_accum=2, warmup_steps=1, weight_decay=0.1, log_every=1)
    base.update(kw)
    return StageConfig(**base)


SOURCES = {"a": make_source("a", 13, seed=1), "b": make_source("b", 6, bad_every=4, seed=2)}


def _grads_after_one_step(tmp_path, batch_size, grad_accum, group_by_length=False, batches_out=None):
    model = ToyVLM(seed=0)
    model.llm["drop"].p = 0.0
    stage = _stage(batch_size=batch_size, grad_accum=grad_accum, group_by_length=group_by_length)
    trainer = StageTrainer(model, stage, 0, SOURCES, fake_encode, _ctx(tmp_path / f"r{batch_size}-{group_by_length}"))
    batches = trainer.next_micro_batches()
    if batches_out is not None:
        batches_out.extend(batches)
    loss, n_targets, _, _ = trainer.forward_backward(batches)
    return loss, n_targets, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_normalises_by_all_target_tokens(tmp_path):
    loss1, n1, g1 = _grads_after_one_step(tmp_path, batch_size=8, grad_accum=1)
    loss2, n2, g2 = _grads_after_one_step(tmp_path, batch_size=4, grad_accum=2)
    loss4, n4, g4 = _grads_after_one_step(tmp_path, batch_size=2, grad_accum=4)
    assert n1 == n2 == n4 and loss1 == pytest.approx(loss2, rel=1e-6) == pytest.approx(loss4, rel=1e-6)
    assert g1.keys() == g2.keys() == g4.keys() and "vision.weight" not in g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-5, atol=1e-7)


def test_group_by_length_pads_less_and_keeps_the_step(tmp_path):
    """Length-sorted micro-batches: the same rows, less padding, the same loss and gradient."""
    plain, grouped = [], []
    loss1, n1, g1 = _grads_after_one_step(tmp_path, batch_size=4, grad_accum=3, batches_out=plain)
    loss2, n2, g2 = _grads_after_one_step(tmp_path, batch_size=4, grad_accum=3, group_by_length=True, batches_out=grouped)

    def rows(batches):
        return sorted(i for b in batches for i in b["sample_ids"])

    def padded(batches):
        return sum(b["input_ids"].numel() for b in batches)

    assert rows(plain) == rows(grouped) and len(grouped) == 3
    lengths = [int(m.sum()) for b in grouped for m in b["attention_mask"]]
    assert lengths == sorted(lengths)
    assert padded(grouped) < padded(plain)
    assert n1 == n2 and loss1 == pytest.approx(loss2, rel=1e-6)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7)


STAGES = [_stage("align", trainable=["connector"], lr=1e-2, steps=5),
          _stage("tune", trainable=["llm.*", "connector"], lr={"llm.*": 5e-3, "connector": 1e-3}, steps=4,
                 schedule="constant", data={"a": 1.0})]


def _run(run_dir, stop_after=None, resume=False):
    model = ToyVLM(seed=11 if resume else 0)  # a resumed run must not depend on the init
    ctx = _ctx(run_dir, save_every=2, stop_after_steps=stop_after)
    ckpt = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if ckpt is not None:
        load_model(model, str(ckpt / "model.safetensors"))
    train_stages(model, STAGES, SOURCES, lambda stage: fake_encode, ctx, resume_from=ckpt)
    return model, ctx


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}  # last row per step wins


@pytest.mark.parametrize("stop_after", [3, 5])  # resume inside a stage, and from a stage-end checkpoint
def test_resume_is_bitwise_identical(tmp_path, stop_after):
    torch.manual_seed(0)
    full, full_ctx = _run(tmp_path / "full")
    torch.manual_seed(0)
    with pytest.raises(StopRun):
        _run(tmp_path / "cut", stop_after=stop_after)
    torch.manual_seed(1234)  # the restart begins from another RNG state
    resumed, ctx = _run(tmp_path / "cut", resume=True)
    assert ctx.global_step == full_ctx.global_step == 9
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert ctx.bad_log.seen == full_ctx.bad_log.seen and len(ctx.bad_log.bad) == len(full_ctx.bad_log.bad)


def test_metrics_and_checkpoint_retention(tmp_path):
    _run(tmp_path / "r")
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [r["stage"] for r in rows] == ["align"] * 5 + ["tune"] * 4
    assert rows[5]["stage_step"] == 1
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"):
        assert isinstance(rows[-1][key], float)
    # periodic at 2, 4, 6, 8 (last two kept); stage ends at 5 and 9 kept
    assert [s for s, _ in checkpoint_dirs(tmp_path / "r" / "checkpoints")] == [5, 6, 8, 9]
    assert rows[0]["bad_samples"] >= 0


def test_too_many_bad_samples_stops_naming_the_row(tmp_path):
    sources = {"a": make_source("a", 20, bad_every=2), "b": make_source("b", 5)}
    ctx = _ctx(tmp_path, bad_log=BadSampleLog(max_fraction=0.2, min_seen=10))
    trainer = StageTrainer(ToyVLM(), _stage(data={"a": 1.0}), 0, sources, fake_encode, ctx)
    with pytest.raises(TooManyBadSamples, match=r"a-\d+ in /fake/a.json \(source a, row \d+\)"):
        trainer.run()


def test_run_dir_refusal_and_metrics_truncation(tmp_path):
    from vlmkit.config import ConfigError
    from vlmkit.train.run import check_run_dir, truncate_metrics
    from vlmkit.utils.io import append_jsonl

    check_run_dir(tmp_path, resume=False)  # empty: fine
    (tmp_path / "world").mkdir()
    check_run_dir(tmp_path, resume=False)  # a cached world is not a run
    for step in (1, 2, 3):
        append_jsonl(tmp_path / "metrics.jsonl", {"step": step, "loss": 1.0})
    with pytest.raises(ConfigError, match="--resume"):
        check_run_dir(tmp_path, resume=False)
    check_run_dir(tmp_path, resume=True)
    truncate_metrics(tmp_path / "metrics.jsonl", 2)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_sample_encoder_caches_images_and_keeps_token_order(tmp_path):
    from vlmkit.data.dataset import SampleEncoder
    from vlmkit.data.sample import ImageRef, Part, Sample, Turn
    from vlmkit.data.template import Encoded

    loads, encodes = [], []

    class Template:
        def encode_for_training(self, sample, tokens_per_image, max_len):
            encodes.append(sample.id)
            n = 40 * len(sample.turns)
            return Encoded(list(range(n)), [tokens_per_image] * n, len(sample.images), sample.id)

    def load(ref, root):
        loads.append(ref.path)
        return float(len(ref.path))

    enc = SampleEncoder(Template(), lambda img: torch.tensor([img]), tokens_per_image=3, max_len=64, cache_size=1, load=load)
    turns = [Turn("user", [Part(image=1), Part(text="and"), Part(image=0)]), Turn.of_text("assistant", "x")]
    sample = Sample("s", turns, [ImageRef(path="a.png"), ImageRef(path="bb.png")])
    # 80 tokens > max_len 64: too long, named as such, and the encoding is still cached
    with pytest.raises(BadSampleError, match="80 tokens > 64"):
        enc.encode(sample, tmp_path)
    longer = enc.with_max_len(128)
    encoded, pixels = longer.encode(sample, tmp_path)
    assert encoded.labels[0] == 3 and len(encoded) == 80 and [float(p) for p in pixels] == [6.0, 5.0]
    assert encodes == ["s"]  # the second encode came from the shared text cache
    assert loads == ["bb.png", "a.png"]  # the too-long sample was rejected before its images were read
    enc.encode(Sample("t", turns[:1], [ImageRef(path="a.png"), ImageRef(path="a.png")]), tmp_path)
    assert loads == ["bb.png", "a.png"]  # both hits: a.png is the last image read
    longer.encode(sample, tmp_path)
    assert loads == ["bb.png", "a.png", "bb.png", "a.png"]  # LRU of one: bb.png was evicted, then a.png


def test_sample_encoder_text_cache_is_keyed_by_content():
    """Same id, other content (e.g. a row edited between runs of a long-lived encoder): a fresh
    encode, never a stale one; the same content: one encode."""
    from vlmkit.data.dataset import SampleEncoder
    from vlmkit.data.sample import Sample, Turn
    from vlmkit.data.template import Encoded

    encodes = []

    class Template:
        def encode_for_training(self, sample, tokens_per_image, max_len):
            encodes.append(sample.target_text())
            ids = [ord(c) for c in sample.target_text()]
            return Encoded(ids, ids, 0, sample.id)

    enc = SampleEncoder(Template(), lambda img: img, tokens_per_image=1, max_len=64)
    ask = Turn.of_text("user", "q")
    a = enc.encode(Sample("s", [ask, Turn.of_text("assistant", "yes")], []), ".")[0]
    b = enc.encode(Sample("s", [ask, Turn.of_text("assistant", "no")], []), ".")[0]
    c = enc.encode(Sample("s", [ask, Turn.of_text("assistant", "yes")], []), ".")[0]
    assert a.input_ids == c.input_ids == [ord("y"), ord("e"), ord("s")] and b.input_ids == [ord("n"), ord("o")]
    assert encodes == ["yes", "no"]


class NaNOnCalls(ToyVLM):
    """A toy model whose loss is NaN on the given forward calls (1-based)."""

    def __init__(self, bad_calls):
        super().__init__(seed=0)
        self.calls, self.bad = 0, set(bad_calls)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.calls += 1
        if self.calls in self.bad:
            out.loss_sum = out.loss_sum * float("nan")
        return out


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    model = NaNOnCalls(bad_calls={2})
    trainer = StageTrainer(model, _stage(grad_accum=1, steps=4), 0, SOURCES, fake_encode, _ctx(tmp_path / "nan"))
    trainer.train_step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step()  # NaN: no update
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert trainer.ctx.nonfinite_skipped == 1 and trainer.stage_step == 2
    trainer.train_step()  # finite again: updates, and the run of NaN steps is over
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert trainer.ctx.nonfinite_in_a_row == 0


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path):
    from vlmkit.train.trainer import NonFiniteLoss

    model = NaNOnCalls(bad_calls={2, 3, 4})
    ctx = _ctx(tmp_path / "nan3", max_nonfinite_in_a_row=3)
    trainer = StageTrainer(model, _stage(grad_accum=1, steps=6), 0, SOURCES, fake_encode, ctx)
    with pytest.raises(NonFiniteLoss, match=r"step 4.*3 non-finite steps in a row.*samples: \['") as err:
        trainer.run()
    assert "stage s" in str(err.value)


def test_group_by_modality_keeps_the_rows_and_separates_image_free_ones(tmp_path):
    from helpers_train import Enc

    def encode(sample, root):  # every third sample has no image
        enc, pixels = fake_encode(sample, root)
        text_only = int(sample.id.split("-")[1]) % 3 == 0
        return Enc(enc.input_ids, enc.labels, 0 if text_only else 1, enc.sample_id), [] if text_only else pixels

    def step_rows(group):
        model = ToyVLM(seed=0)
        stage = _stage(batch_size=3, grad_accum=4, group_by_modality=group)
        trainer = StageTrainer(model, stage, 0, SOURCES, encode, _ctx(tmp_path / f"m{group}"))
        return trainer.next_micro_batches()

    plain, grouped = step_rows(False), step_rows(True)
    ids = lambda batches: sorted(i for b in batches for i in b["sample_ids"])  # noqa: E731
    assert ids(plain) == ids(grouped)
    kinds = [[int(i.split("-")[1]) % 3 == 0 for i in b["sample_ids"]] for b in grouped]
    mixed = [k for k in kinds if len(set(k)) > 1]
    assert len(mixed) <= 1  # text-only rows first, then image rows: at most one batch holds both
    assert kinds[0][0]  # image-free rows come first
    assert sum(len(set(k)) > 1 for k in [[int(i.split("-")[1]) % 3 == 0 for i in b["sample_ids"]] for b in plain]) >= len(mixed)


def _rank_trainer(tmp_path, rank, world, sources, **stage_kw):
    from vlmkit.train.parallel import DistEnv, Parallel

    parallel = Parallel(DistEnv(rank=rank, world_size=world), None, torch.device("cpu"))  # no collectives
    ctx = _ctx(tmp_path / f"rank{rank}", parallel=parallel)
    return StageTrainer(ToyVLM(seed=0), _stage(**stage_kw), 0, sources, fake_encode, ctx)


def test_ranks_split_each_micro_batch_and_drop_their_bad_rows(tmp_path):
    """Data-parallel draws: every rank walks the same mixture positions and keeps its slice of
    each micro-batch; together the ranks hold the rows one process would have drawn (bad ones
    dropped, not replaced, so the mixtures stay in step)."""
    sources = {"a": make_source("a", 13, seed=1), "b": make_source("b", 6, bad_every=2, seed=2)}
    one = _rank_trainer(tmp_path, 0, 1, sources, batch_size=4, grad_accum=2)
    positions = [one.mixture.next() for _ in range(8)]  # what a step draws, in order
    expected = [[sources[n].samples[i].id for n, i in positions[k * 4 : (k + 1) * 4]] for k in range(2)]
    good = {s.id for src in sources.values() for s in src.samples if not s.meta["bad"]}
    shares = [_rank_trainer(tmp_path, r, 2, sources, batch_size=4, grad_accum=2)._rank_shares(4, 2) for r in (0, 1)]
    for k in range(2):
        got = [e.sample_id for r in (0, 1) for e, _ in shares[r][k]]
        assert got == [sid for sid in expected[k] if sid in good]
        assert all(sid in expected[k][:2] for sid in [e.sample_id for e, _ in shares[0][k]])


def test_a_rank_left_without_good_rows_gets_a_row_with_no_target(tmp_path):
    from vlmkit.train.objectives import NextTokenObjective

    sources = {"a": make_source("a", 6, bad_every=1, seed=1)}  # every row is bad
    trainer = _rank_trainer(tmp_path, 1, 2, sources, data={"a": 1.0}, batch_size=2, grad_accum=1)
    trainer.objective = NextTokenObjective()
    [share] = trainer._rank_shares(2, 1)
    [(placeholder, pixels)] = share
    assert pixels == [] and placeholder.n_images == 0 and placeholder.n_targets == 0
