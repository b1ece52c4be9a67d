"""The fusion encoder (models/fusion.py), its MLM / ITM objectives and its evaluation."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from vlmkit.eval.fusion_eval import evaluate_fusion, evaluate_itm, evaluate_mlm, itm_items, itm_metrics, mlm_items
from vlmkit.models.fusion import IMAGE, TEXT, FusionEncoder, FusionEncoderConfig, FusionOutput, load_fusion
from vlmkit.train.fusion_objectives import (
    ATTRIBUTE_INDEX,
    ATTRIBUTES,
    MaskingConfig,
    attribute_pieces,
    caption_attributes,
    encode_texts,
    fusion_caption,
    fusion_loss,
    hard_negative,
    itm_examples,
    load_pixels,
    load_world_scenes,
    mask_for_mlm,
    mlm_vocab,
    perturb_scene,
    train_fusion,
    world_tokenizer,
)

TINY = dict(hidden=32, layers=2, heads=2, dropout=0.0)


@pytest.fixture(scope="module")
def tok(tiny_world, tmp_path_factory):
    """The world's BPE at a size small enough that some attribute words are split in pieces."""
    return world_tokenizer(tiny_world, tmp_path_factory.mktemp("fusion-tok"), 300)


@pytest.fixture(scope="module")
def scenes(tiny_world):
    return [s for _, s in load_world_scenes(tiny_world, "train")]


def tiny_model(tok, **kw) -> FusionEncoder:
    torch.manual_seed(0)
    cfg = FusionEncoderConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id,
                              max_text_len=160, **{**TINY, **kw})  # fmt: skip
    return FusionEncoder(cfg).eval()


# ------------------------------------------------------------------ model


def test_forward_shapes_and_heads(tok, scenes):
    model = tiny_model(tok)
    batch = encode_texts(tok, [fusion_caption(s) for s in scenes[:3]], 128)
    px = torch.randn(3, 3, 64, 64)
    out = model(batch.input_ids, batch.attention_mask, px)
    b, length = batch.input_ids.shape
    n_patches = (64 // 16) ** 2
    assert out.hidden.shape == (3, 1 + length + n_patches, 32)
    assert out.mlm_logits.shape == (3, length, len(tok))
    assert out.itm_logits.shape == (3, 2)
    only_itm = model(batch.input_ids, batch.attention_mask, px, mlm=False)
    assert only_itm.mlm_logits is None and torch.allclose(only_itm.itm_logits, out.itm_logits, atol=1e-6)
    assert model.mlm_decoder.weight is model.word_embed.weight  # tied by default
    untied = tiny_model(tok, tie_word_embeddings=False)
    assert untied.mlm_decoder.weight is not untied.word_embed.weight
    # padding is masked out: extra padding does not change the real positions' outputs
    padded_ids = torch.nn.functional.pad(batch.input_ids, (0, 5), value=tok.pad_token_id)
    padded_mask = torch.nn.functional.pad(batch.attention_mask, (0, 5))
    out2 = model(padded_ids, padded_mask, px)
    assert torch.allclose(out2.itm_logits, out.itm_logits, atol=1e-5)
    assert torch.allclose(out2.mlm_logits[:, :length], out.mlm_logits, atol=1e-4)


def test_modality_embeddings_differ_between_text_and_image(tok):
    model = tiny_model(tok)
    ids = torch.randint(10, len(tok) - 1, (2, 7))
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model.embed(ids, px)
        types = model.modality.weight.clone()
        model.modality.weight.zero_()
        bare = model.embed(ids, px)
        model.modality.weight.copy_(types)
    diff = full - bare  # [B, 1 + L + N, H]: exactly the modality embedding of each position
    kinds = model.modality_ids(7)
    assert (kinds[: 1 + 7] == TEXT).all() and (kinds[1 + 7 :] == IMAGE).all()
    assert torch.allclose(diff[:, kinds == TEXT], types[TEXT].expand(2, 8, -1), atol=1e-6)
    assert torch.allclose(diff[:, kinds == IMAGE], types[IMAGE].expand(2, 16, -1), atol=1e-6)
    assert not torch.allclose(types[TEXT], types[IMAGE])
    # and they are trained: both get gradients
    out = model(ids, None, px)
    (out.itm_logits.sum() + out.mlm_logits.sum()).backward()
    assert model.modality.weight.grad[TEXT].abs().sum() > 0 and model.modality.weight.grad[IMAGE].abs().sum() > 0


def test_save_load_round_trip(tok, tmp_path, scenes):
    for tied in (True, False):
        model = tiny_model(tok, tie_word_embeddings=tied)
        batch = encode_texts(tok, [fusion_caption(s) for s in scenes[:2]], 128)
        px = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            before = model(batch.input_ids, batch.attention_mask, px)
        path = model.save(tmp_path / f"ckpt-{tied}", tokenizer=tok, meta={"text": {"caption_style": "detailed"}})
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # no pickle
        loaded, tok2, meta = load_fusion(path)
        assert meta == {"text": {"caption_style": "detailed"}}
        assert loaded.config == model.config and tok2.mask_token_id == tok.mask_token_id
        with torch.no_grad():
            after = loaded(batch.input_ids, batch.attention_mask, px)
        assert torch.equal(before.mlm_logits, after.mlm_logits) and torch.equal(before.itm_logits, after.itm_logits)
        assert (loaded.mlm_decoder.weight is loaded.word_embed.weight) == tied


def test_config_validation():
    with pytest.raises(ValueError):
        FusionEncoderConfig(image_size=64, patch_size=10)
    with pytest.raises(ValueError):
        FusionEncoderConfig(hidden=30, heads=4)
    with pytest.raises(ValueError):
        FusionEncoderConfig(vocab_size=10, mask_token_id=10)
    with pytest.raises(ValueError):
        FusionEncoderConfig(unknown=1)


# ------------------------------------------------------------------ MLM masking


def test_word_units_and_attribute_tokens(tok):
    text = "a large orange hexagon<|endoftext|> there are 12 objects."
    batch = encode_texts(tok, [text], 64)
    units = batch.units[0]
    assert units == ["a", "large", "orange", "hexagon", "there", "are", "12", "objects", "."]
    wid, attr = batch.word_ids[0], batch.attr_ids[0]
    eos = (batch.input_ids[0] == tok.eos_token_id).nonzero().flatten()
    assert len(eos) == 1 and wid[eos] == -1
    kinds = {units[int(u)]: int(a) for u, a in zip(wid, attr) if u >= 0}
    assert kinds["large"] == ATTRIBUTE_INDEX["size"] and kinds["orange"] == ATTRIBUTE_INDEX["color"]
    assert kinds["hexagon"] == ATTRIBUTE_INDEX["shape"] and kinds["12"] == ATTRIBUTE_INDEX["count"]
    assert kinds["there"] == kinds["objects"] == kinds["."] == 0
    # the pieces of each word decode back to the word (with its leading space)
    for u, word in enumerate(units):
        pieces = batch.input_ids[0][wid == u].tolist()
        assert tok.decode(pieces).strip() == word
    assert len(batch.input_ids[0][wid == units.index("12")]) >= 2  # digits are split: a multi-piece word
    # the pieces of a word are the tokenizer's pieces of " word" (attribute_pieces)
    pieces = attribute_pieces(tok)
    for word in ("large", "orange", "hexagon"):
        assert batch.input_ids[0][wid == units.index(word)].tolist() == pieces[word]
    assert any(len(p) > 1 for w, p in pieces.items() if not w.isdigit())  # this vocabulary splits some


def test_mlm_masking_rates_whole_word_and_specials(tok, scenes):
    texts = [fusion_caption(s) + " <|endoftext|>" for s in scenes] * 20
    batch = encode_texts(tok, texts, 128)
    vocab = mlm_vocab(tok)
    cfg = MaskingConfig(word_prob=0.15, attribute_prob=0.5)
    masked, labels = mask_for_mlm(batch, vocab, cfg, torch.Generator().manual_seed(0))
    again = mask_for_mlm(batch, vocab, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again[0]) and torch.equal(labels, again[1])  # seeded: deterministic

    ids = batch.input_ids
    chosen = labels != -100
    # labels: the original id where chosen, -100 elsewhere; unchosen tokens are untouched
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    # never padding or special tokens
    special = torch.zeros_like(chosen)
    for sid in vocab.special_ids:
        special |= ids == sid
    assert special.any() and not (chosen & special).any()
    assert not (chosen & (batch.attention_mask == 0)).any()
    assert (masked[special] == ids[special]).all()

    n_multi = 0
    stats = {True: Counter(), False: Counter()}  # attribute word? -> chosen / total
    actions = Counter()
    for r in range(len(texts)):
        wid = batch.word_ids[r]
        for u in range(len(batch.units[r])):
            pos = (wid == u).nonzero().flatten()
            n_multi += len(pos) > 1
            c = chosen[r, pos]
            assert bool(c.all()) or not bool(c.any()), "a word is masked whole or not at all"
            is_attr = bool(batch.attr_ids[r, pos[0]] > 0)
            stats[is_attr]["total"] += 1
            if not c.any():
                continue
            stats[is_attr]["chosen"] += 1
            m = masked[r, pos]
            if (m == vocab.mask_id).all():
                actions["mask"] += 1
            elif torch.equal(m, ids[r, pos]):
                actions["keep"] += 1
            else:
                assert not (m == vocab.mask_id).any(), "one decision per word"
                actions["random"] += 1
    assert n_multi > 100  # the test sees words split into several pieces
    attr_rate = stats[True]["chosen"] / stats[True]["total"]
    word_rate = stats[False]["chosen"] / stats[False]["total"]
    assert stats[True]["total"] > 2000 and stats[False]["total"] > 2000
    assert abs(attr_rate - 0.5) < 0.03, attr_rate
    assert abs(word_rate - 0.15) < 0.02, word_rate
    n = sum(actions.values())
    assert abs(actions["mask"] / n - 0.8) < 0.03, actions
    assert abs(actions["random"] / n - 0.1) < 0.025, actions
    assert abs(actions["keep"] / n - 0.1) < 0.025, actions


def test_masking_config_knobs(tok, scenes):
    batch = encode_texts(tok, [fusion_caption(s) for s in scenes] * 5, 128)
    vocab = mlm_vocab(tok)
    _, labels = mask_for_mlm(batch, vocab, MaskingConfig(word_prob=0.0, attribute_prob=1.0), torch.Generator())
    assert torch.equal(labels != -100, batch.attr_ids > 0)  # exactly the attribute words
    only_color = MaskingConfig(word_prob=0.0, attribute_prob=1.0, attributes=["color"])
    _, labels = mask_for_mlm(batch, vocab, only_color, torch.Generator())
    assert torch.equal(labels != -100, batch.attr_ids == ATTRIBUTE_INDEX["color"])
    masked, labels = mask_for_mlm(batch, vocab, MaskingConfig(word_prob=1.0, attribute_prob=1.0, mask_prob=1.0,
                                                              random_prob=0.0), torch.Generator())  # fmt: skip
    real = batch.attention_mask.bool()
    assert (masked[real] == vocab.mask_id).all() and (labels[real] != -100).all()
    with pytest.raises(ValueError):
        MaskingConfig(mask_prob=0.8, random_prob=0.3)
    with pytest.raises(ValueError):
        MaskingConfig(attributes=["texture"])


# ------------------------------------------------------------------ hard negatives

def _objects_and_count(text: str) -> tuple[list[str], int]:
    m = re.fullmatch(r"(.*?)\.(?: the word \w+ is written at the bottom\.)? there are (\d+) objects\.", text)
    assert m, text
    return m.group(1).split(", "), int(m.group(2))


def test_hard_negative_changes_exactly_one_attribute(scenes):
    from vlmkit.data.worlds.shapes import COLORS, SHAPES, SIZES

    values = {"color": set(COLORS), "shape": set(SHAPES), "size": set(SIZES)}
    seen = Counter()
    for i, scene in enumerate(scenes):
        positive = fusion_caption(scene)
        for attribute in ATTRIBUTES:
            for k in range(3):
                rng = random.Random(f"{i}-{attribute}-{k}")
                text, change = hard_negative(scene, rng, attribute)
                assert text != positive and change["attribute"] == attribute
                seen[attribute] += 1
                if attribute != "count":
                    a, b = positive.split(), text.split()
                    assert len(a) == len(b)
                    diff = [j for j in range(len(a)) if a[j] != b[j]]
                    assert len(diff) == 1, (positive, text)
                    old, new = a[diff[0]].strip(",."), b[diff[0]].strip(",.")
                    assert old == scene["objects"][change["object"]][attribute] == change["old"]
                    assert new == change["new"] and new != old and new in values[attribute]
                else:
                    objs, n = _objects_and_count(positive)
                    neg_objs, neg_n = _objects_and_count(text)
                    assert n == len(scene["objects"]) and neg_n != n and abs(neg_n - n) == 1
                    assert neg_n == change["new"] == len(neg_objs)
                    # the object list differs by exactly one object, the rest is the same
                    more, less = (neg_objs, objs) if neg_n > n else (objs, neg_objs)
                    assert not (Counter(less) - Counter(more))
                    assert sum((Counter(more) - Counter(less)).values()) == 1
    assert all(seen[a] for a in ATTRIBUTES)
    # the scene itself is never modified
    assert fusion_caption(scenes[0]) == fusion_caption(json.loads(json.dumps(scenes[0])))


def test_perturb_count_bounds_and_styles(scenes):
    from vlmkit.data.worlds.shapes import MAX_OBJECTS

    one = dict(scenes[0], objects=scenes[0]["objects"][:1])
    for seed in range(5):
        out, change = perturb_scene(one, "count", random.Random(seed))
        assert change["new"] == 2 and len(out["objects"]) == 2
        cells = [tuple(o["cell"]) for o in out["objects"]]
        assert cells == sorted(cells) and len(set(cells)) == 2
    full = next((s for s in scenes if len(s["objects"]) == MAX_OBJECTS), None)
    if full is not None:
        assert perturb_scene(full, "count", random.Random(0))[1]["new"] == MAX_OBJECTS - 1
    assert "size" not in caption_attributes("short")
    with pytest.raises(ValueError):
        hard_negative(scenes[0], random.Random(0), "size", style="short")
    texts, labels, kinds = itm_examples(scenes, range(len(scenes)), random.Random(0), 0.5, 0.3, "short")
    assert set(kinds) <= {"positive", "easy", "color", "shape", "count"}
    assert all((k == "positive") == (lab == 1) for k, lab in zip(kinds, labels))


def test_itm_examples_mix(scenes):
    rng = random.Random(0)
    idx = [i % len(scenes) for i in range(2000)]
    texts, labels, kinds = itm_examples(scenes, idx, rng, p_positive=0.5, easy_ratio=0.25)
    c = Counter(kinds)
    assert abs(c["positive"] / 2000 - 0.5) < 0.04
    assert abs(c["easy"] / (2000 - c["positive"]) - 0.25) < 0.05
    for i, text, lab, kind in zip(idx, texts, labels, kinds):
        own = fusion_caption(scenes[i])
        assert (text == own) == (lab == 1) == (kind == "positive")


# ------------------------------------------------------------------ loss and training


def test_fusion_loss_parts():
    mlm_logits = torch.zeros(2, 3, 5)
    mlm_logits[0, 1, 2] = 10.0
    itm_logits = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    out = FusionOutput(None, mlm_logits, itm_logits)
    labels = torch.full((2, 3), -100)
    labels[0, 1] = 2
    labels[1, 0] = 4
    loss, parts = fusion_loss(out, labels, torch.tensor([1, 0]), mlm_weight=1.0, itm_weight=2.0)
    import math

    mlm = (-torch.log_softmax(mlm_logits[0, 1], -1)[2] + math.log(5)) / 2
    itm = (math.log(2) - torch.log_softmax(itm_logits[1], -1)[0]) / 2
    assert parts["mlm_tokens"] == 2
    assert abs(parts["mlm_loss"] - float(mlm)) < 1e-5 and abs(parts["itm_loss"] - float(itm)) < 1e-5
    assert abs(float(loss) - float(mlm + 2 * itm)) < 1e-5
    none_masked, parts = fusion_loss(out, torch.full((2, 3), -100), None)
    assert float(none_masked) == 0.0 and parts["mlm_tokens"] == 0


def test_train_fusion_loss_decreases_and_checkpoint_evaluates(tiny_world, tmp_path, one_thread):
    final = train_fusion(tiny_world, tmp_path / "run", steps=40, batch_size=8, lr=3e-3, seed=0,
                         model={**TINY, "max_text_len": 128},
                         vocab_size=300, log_every=1, warmup_steps=2)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41)) and all(r["stage"] == "fusion" for r in rows)
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert all(k in rows[0] for k in ("loss", "mlm_loss", "itm_loss", "lr"))

    model, tok, meta = load_fusion(final)
    assert meta["text"]["caption_style"] == "detailed" and tok.mask_token_id == model.config.mask_token_id
    results = evaluate_fusion(final, tiny_world, tmp_path / "results.json", limit=4)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    itm, mlm = results["tasks"]["fusion_itm"], results["tasks"]["fusion_mlm"]
    assert itm["n"] == 2 * 4 * 4 and set(itm["metrics"]["by_attribute"]) == set(ATTRIBUTES)
    assert 0.0 <= itm["metrics"]["accuracy"] <= 1.0
    assert set(mlm["metrics"]["by_attribute"]) == set(ATTRIBUTES) and mlm["n"] > 0
    assert 0.0 <= mlm["metrics"]["attribute_accuracy"] <= 1.0


def test_a_killed_fusion_run_resumes_to_the_same_weights_and_metrics(tiny_world, tmp_path, one_thread):
    """Stopped after 7 steps (the checkpoint is at step 5; log rows every 2 steps, so the
    checkpoint falls inside an open metrics window), then resumed: the final weights equal an
    uninterrupted run's bitwise, and so do the logged losses."""
    import safetensors.torch

    options = dict(steps=12, batch_size=4, lr=3e-3, seed=0, model={**TINY, "max_text_len": 128}, vocab_size=300,
                   log_every=2, warmup_steps=2, save_every=5)  # fmt: skip
    whole = train_fusion(tiny_world, tmp_path / "whole", **options)
    assert train_fusion(tiny_world, tmp_path / "cut", stop_after_steps=7, **options) is None
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000005"]
    resumed = train_fusion(tiny_world, tmp_path / "cut", resume=True, **options)
    a = safetensors.torch.load_file(str(whole / "model.safetensors"))
    b = safetensors.torch.load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["itm_accuracy"]) for r in rows]

    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert [s for s, _, _ in losses(tmp_path / "whole")] == [2, 4, 6, 8, 10, 12]


# ------------------------------------------------------------------ evaluation with fake models


class LookupITM(torch.nn.Module):
    """A fake fusion model: ITM logits from a table keyed by (image, unpadded token ids); each
    image is a constant picture of its scene index."""

    def __init__(self, table: dict[tuple, bool], default: bool = True):
        super().__init__()
        self.table, self.default = table, default
        self.config = SimpleNamespace(max_text_len=512)

    def forward(self, input_ids, attention_mask, pixel_values, mlm=True, itm=True):
        rows = []
        for ids, m, px in zip(input_ids.tolist(), attention_mask.tolist(), pixel_values):
            key = (int(px[0, 0, 0]), tuple(i for i, k in zip(ids, m) if k))
            rows.append([0.0, 3.0] if self.table.get(key, self.default) else [3.0, 0.0])
        return FusionOutput(None, None, torch.tensor(rows))


def test_itm_accuracy_on_fake_models(tok, scenes):
    sc = scenes[:6]
    px = torch.arange(len(sc), dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 3, 64, 64)

    def key(it):  # the same text can be one scene's positive and another's easy negative
        return it["scene"], tuple(tok(it["text"], add_special_tokens=False)["input_ids"])

    always = evaluate_itm(LookupITM({}, default=True), tok, sc, px)
    m = always["metrics"]
    assert always["n"] == 2 * 6 * 4
    assert m["accuracy"] == 0.5 and m["positive_accuracy"] == 1.0 and m["negative_accuracy"] == 0.0
    assert m["by_attribute"] == {a: 0.5 for a in ATTRIBUTES} and m["easy_negative_accuracy"] == 0.0

    items = itm_items(sc)
    oracle = {key(it): it["label"] == 1 for it in items}
    m = evaluate_itm(LookupITM(oracle), tok, sc, px)["metrics"]
    assert m["accuracy"] == 1.0 and m["pairwise"] == 1.0 and m["easy_negative_accuracy"] == 1.0

    # colour-blind: accepts colour negatives, rejects the rest
    blind = {key(it): it["label"] == 1 or it["kind"] == "color" for it in items}
    m = evaluate_itm(LookupITM(blind), tok, sc, px)["metrics"]
    assert m["by_attribute"] == {"color": 0.5, "shape": 1.0, "size": 1.0, "count": 1.0}
    assert m["accuracy"] == pytest.approx(3.5 / 4)
    assert m["negative_accuracy_by_attribute"]["color"] == 0.0 and m["pairwise_by_attribute"]["color"] == 0.0


def test_itm_metrics_by_hand():
    items = [{"scene": s, "kind": k} for s in (0, 1) for k in ("positive", "color", "count")]
    probs = [0.9, 0.2, 0.95, 0.4, 0.1, 0.3]
    m = itm_metrics(items, probs)
    # pairs: color (0.9 | 0.2) -> 2 right; color (0.4 | 0.1) -> 1 right; count (0.9 | 0.95) -> 1; (0.4 | 0.3) -> 1
    assert m["by_attribute"] == {"color": 0.75, "count": 0.5}
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["pairwise_by_attribute"] == {"color": 1.0, "count": 0.5}
    assert m["n_pairs"] == 4 and m["easy_negative_accuracy"] is None


class OracleMLM(torch.nn.Module):
    """A fake fusion model that fills masked words from a table ((image, masked ids) -> original
    ids); rows not in the table are predicted as they are (the mask token where masked)."""

    def __init__(self, table, vocab: int):
        super().__init__()
        self.table, self.vocab = table, vocab
        self.config = SimpleNamespace(max_text_len=512)

    def forward(self, input_ids, attention_mask, pixel_values, mlm=True, itm=True):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r, (ids, m, px) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(), pixel_values)):
            n = sum(m)
            target = self.table.get((int(px[0, 0, 0]), tuple(ids[:n])), ids[:n])
            logits[r, torch.arange(n), torch.tensor(target)] = 1.0
        return FusionOutput(None, logits, None)


def test_mlm_attribute_accuracy_on_fake_models(tok, scenes):
    sc = scenes[:5]
    px = torch.arange(len(sc), dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 3, 64, 64)
    items = mlm_items(tok, sc, 512)
    assert {it["kind"] for it in items} == set(ATTRIBUTES)

    def original(it):
        ids = it["ids"].clone()
        ids[it["positions"]] = it["targets"]
        return ids.tolist()

    oracle = OracleMLM({(it["scene"], tuple(it["ids"].tolist())): original(it) for it in items}, len(tok))
    res = evaluate_mlm(oracle, tok, sc, px)
    assert res["n"] == len(items)
    assert res["metrics"]["attribute_accuracy"] == 1.0
    assert res["metrics"]["shuffled_image"]["attribute_accuracy"] == 0.0  # the table knows each word's own image
    colour_only = OracleMLM({(it["scene"], tuple(it["ids"].tolist())): original(it) for it in items
                             if it["kind"] == "color"}, len(tok))  # fmt: skip
    m = evaluate_mlm(colour_only, tok, sc, px, shuffled_image=False)["metrics"]
    assert m["by_attribute"] == {"color": 1.0, "shape": 0.0, "size": 0.0, "count": 0.0}
    n = m["n_by_attribute"]
    assert m["attribute_accuracy"] == pytest.approx(n["color"] / sum(n.values()))
    assert "shuffled_image" not in m


def test_load_world_scenes_and_pixels(tiny_world):
    pairs = load_world_scenes(tiny_world, "test")
    assert len(pairs) == 6 and len({p for p, _ in pairs}) == 6
    px = load_pixels(tiny_world, [p for p, _ in pairs[:2]], 64)
    assert px.shape == (2, 3, 64, 64) and px.min() >= -1.0 and px.max() <= 1.0


def test_the_fusion_command_line_trains_and_evaluates(tiny_world, tmp_path, one_thread):
    from vlmkit.cli import main

    run = tmp_path / "fusion"
    assert main(["fusion", "train", "--data", str(tiny_world), "--out", str(run), "--steps", "3",
                 "--batch-size", "4"]) == 0  # fmt: skip
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 1
    out = tmp_path / "fusion.json"
    assert main(["fusion", "eval", str(run / "final"), "--data", str(tiny_world), "--out", str(out),
                 "--limit", "2"]) == 0  # fmt: skip
    assert set(json.loads(out.read_text())["tasks"]) == {"fusion_itm", "fusion_mlm"}
