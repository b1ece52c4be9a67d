import json

import pytest
import torch
from _model_helpers import left_pad, make_model, prompt_ids, tiny_model_config

from vlmkit.config import recipe_from_dict
from vlmkit.models.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint

RECIPE = {
    "name": "t",
    "data": {"train": {"path": "train.json"}},
    "stages": [{"name": "align", "data": {"train": 1.0}, "trainable": ["connector"], "lr": 1e-3, "steps": 2}],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = tiny_model_config()
    cfg.connector.output_norm = True
    cfg.connector.pixel_shuffle = 2
    model, tok = make_model(seed=1, cfg=cfg)
    with torch.no_grad():  # make the gain differ from its initial value, so loading must restore it
        model.connector.norm.gain.mul_(3.0)
    out = tmp_path_factory.mktemp("ck") / "final"
    path = save_checkpoint(model, tok, out, recipe=recipe_from_dict(RECIPE))
    return model, tok, path


def test_roundtrip_gives_identical_logits_without_pickle(saved, monkeypatch):
    model, tok, path = saved

    def no_pickle(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded, tok2 = load_checkpoint(path)
    assert not loaded.training
    assert loaded.tokens_per_image == model.tokens_per_image == 4
    assert loaded.image_token_id == model.image_token_id
    assert tok2.convert_tokens_to_ids("<image>") == model.image_token_id and len(tok2) == len(tok)
    rows = [prompt_ids(model, [1, 2, 3], 1), prompt_ids(model, [4], 1)]
    ids, mask = left_pad(rows)
    pv = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(ids, mask, pv).logits
        b = loaded(ids, mask, pv).logits
    assert torch.equal(a, b)
    # tied embeddings stay tied after loading
    assert loaded.llm.get_output_embeddings().weight.data_ptr() == loaded.llm.get_input_embeddings().weight.data_ptr()


def test_config_json_has_documented_keys(saved):
    model, _, path = saved
    meta = json.loads((path / "config.json").read_text())
    for key in ("format", "version", "model", "vision_hf_config", "llm_hf_config", "image_token_id", "tokens_per_image"):
        assert key in meta
    assert meta["format"] == "vlmkit-vlm" and meta["version"] == 1
    assert meta["model"]["connector"]["pixel_shuffle"] == 2
    assert meta["vision_hf_config"]["model_type"] == "resnet"
    assert meta["llm_hf_config"]["model_type"] == "llama"
    assert meta["tokens_per_image"] == 4
    assert (path / "model.safetensors").is_file() and (path / "recipe.yaml").is_file()
    assert "name: t" in (path / "recipe.yaml").read_text()
    assert not list(path.parent.glob(".final.*"))  # no temp dirs left


def test_missing_or_foreign_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a vlmkit checkpoint.*Hugging Face"):
        load_checkpoint(tmp_path)
