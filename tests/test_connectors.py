import pytest
import torch
from _model_helpers import left_pad, make_model, prompt_ids, tiny_model_config

from vlmkit.config import ConnectorConfig
from vlmkit.models.connectors import (
    CONNECTORS,
    MLPGeluProjector,
    PerceiverResampler,
    QFormer,
    avg_pool_tokens,
    build_connector,
    pixel_shuffle,
    register_connector,
)

ALL_TYPES = ["linear", "mlp2x_gelu", "mlp3x_gelu", "perceiver", "qformer"]
RESAMPLERS = ["perceiver", "qformer"]


def test_pixel_shuffle_shape_and_exact_mapping():
    n, side, c, s = 2, 4, 3, 2
    x = torch.arange(n * side * side * c, dtype=torch.float32).reshape(n, side * side, c)
    y = pixel_shuffle(x, s)
    assert y.shape == (n, 4, c * 4)
    # output token (i=1, j=0) = block with top-left input token (2, 0); channel block k = di*2 + dj
    out_tok = 1 * 2 + 0
    for di in range(2):
        for dj in range(2):
            k = di * 2 + dj
            in_tok = (2 + di) * side + (0 + dj)
            assert torch.equal(y[1, out_tok, k * c : (k + 1) * c], x[1, in_tok])
    # by hand: sample 0, output token 0 = input tokens 0, 1, 4, 5 (channels 0..2 each)
    expect = torch.cat([x[0, 0], x[0, 1], x[0, 4], x[0, 5]])
    assert torch.equal(y[0, 0], expect)
    assert pixel_shuffle(x, 1) is x


def test_pixel_shuffle_rejects_bad_grids():
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.zeros(1, 12, 2), 2)
    with pytest.raises(ValueError, match="does not divide"):
        pixel_shuffle(torch.zeros(1, 9, 2), 2)


def test_build_connector_shapes_and_structure():
    x = torch.randn(2, 16, 8)
    lin = build_connector(ConnectorConfig(type="linear"), 8, 20)
    assert lin(x).shape == (2, 16, 20)
    mlp = build_connector(ConnectorConfig(type="mlp2x_gelu", pixel_shuffle=2), 8, 20)
    layers = list(mlp.projector.layers)
    assert [type(m).__name__ for m in layers] == ["Linear", "GELU", "Linear"]
    assert layers[0].in_features == 32
    assert mlp(x).shape == (2, 4, 20)
    assert mlp.num_output_tokens(16) == 4
    mlp3 = build_connector(ConnectorConfig(type="mlp3x_gelu"), 8, 20)
    assert isinstance(mlp3.projector, MLPGeluProjector)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp3.projector.layers) == 3


def test_unknown_type_lists_registry():
    with pytest.raises(ValueError) as err:
        build_connector(ConnectorConfig(type="no_such_connector"), 8, 8)
    for key in CONNECTORS:
        assert key in str(err.value)
    assert {"linear", "mlp2x_gelu", "perceiver", "qformer"} <= set(CONNECTORS)


def test_register_connector_adds_and_refuses_duplicates():
    seen = {}

    @register_connector("_test_identity")
    class Identity(torch.nn.Module):
        def __init__(self, in_dim, out_dim, cfg):
            super().__init__()
            seen.update(in_dim=in_dim, out_dim=out_dim, cfg=cfg)

        def forward(self, x):
            return x

    try:
        cfg = ConnectorConfig(type="_test_identity", pixel_shuffle=2, num_queries=7)
        conn = build_connector(cfg, 4, 4)
        assert isinstance(conn.projector, Identity)
        # the projector gets the post-shuffle width, the LLM width and the config itself
        assert seen == {"in_dim": 16, "out_dim": 4, "cfg": cfg}
        with pytest.raises(ValueError, match="already registered"):
            register_connector("_test_identity")(Identity)
    finally:
        CONNECTORS.pop("_test_identity")


def test_projector_output_tokens_composes_after_pool_and_shuffle():
    @register_connector("_test_first_half")
    class FirstHalf(torch.nn.Module):
        def __init__(self, in_dim, out_dim, cfg):
            super().__init__()
            self.proj = torch.nn.Linear(in_dim, out_dim)

        def output_tokens(self, num_tokens):
            return num_tokens // 2

        def forward(self, x):
            return self.proj(x[:, : x.shape[1] // 2])

    try:
        conn = build_connector(ConnectorConfig(type="_test_first_half", pool_tokens=16, pixel_shuffle=2), 3, 5)
        # 64 -> pool 16 -> shuffle 16/4 = 4 -> projector 4/2 = 2
        assert conn.num_output_tokens(64) == 2
        assert conn(torch.randn(2, 64, 3)).shape == (2, 2, 5)
    finally:
        CONNECTORS.pop("_test_first_half")


def test_output_norm_matches_target_rms_and_is_learnable():
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(type="mlp2x_gelu", output_norm=True), 8, 32, target_rms=0.02)
    y = conn(torch.randn(3, 16, 8) * 10)
    rms = y.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.02), rtol=1e-4)
    assert conn.norm.gain.requires_grad
    with pytest.raises(ValueError, match="target_rms"):
        build_connector(ConnectorConfig(output_norm=True), 8, 32)


# ------------------------------------------------------------------ shapes and token counts

N, T, C, D, Q = 2, 64, 6, 16, 5  # T = 8x8 grid
# (pool_tokens, pixel_shuffle) -> tokens out of a grid-preserving projector, by hand:
# 64 as is; pool 64 -> 16 (4x4); shuffle 2: 64 / 4 = 16; pool 16 then shuffle 2: 16 / 4 = 4
GRID_COUNTS = {(None, 1): 64, (16, 1): 16, (None, 2): 16, (16, 2): 4}


def _cfg(type_, pool=None, s=1, **kw):
    kw = {"num_queries": Q, "num_layers": 2, "num_heads": 4, **kw}
    return ConnectorConfig(type=type_, pool_tokens=pool, pixel_shuffle=s, **kw)


@pytest.mark.parametrize("pool,s", list(GRID_COUNTS))
@pytest.mark.parametrize("type_", ALL_TYPES)
def test_output_shape_and_token_count(type_, pool, s):
    torch.manual_seed(0)
    conn = build_connector(_cfg(type_, pool, s), C, D)
    expected = Q if type_ in RESAMPLERS else GRID_COUNTS[(pool, s)]
    assert conn.num_output_tokens(T) == expected
    y = conn(torch.randn(N, T, C))
    assert y.shape == (N, expected, D)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("type_", ALL_TYPES)
def test_projector_sees_shuffled_width(type_, s):
    conn = build_connector(_cfg(type_, s=s), C, D)
    p = conn.projector
    if type_ == "qformer":  # the image is read by its LayerNorm and the cross-attention keys/values
        widths = [
            p.norm_image.normalized_shape[0],
            p.blocks[0].cross_attn.k.in_features,
            p.blocks[1].cross_attn.v.in_features,
        ]
    else:  # linear, MLP, perceiver: the first linear layer reads the image
        widths = [next(m for m in p.modules() if isinstance(m, torch.nn.Linear)).in_features]
    assert widths == [C * s * s] * len(widths)


@pytest.mark.parametrize("type_", RESAMPLERS)
def test_resampler_count_is_independent_of_input_tokens(type_):
    torch.manual_seed(0)
    conn = build_connector(_cfg(type_), C, D)
    for t in (16, 64, 10):  # 10: not even a square grid, a resampler does not need one
        assert conn.num_output_tokens(t) == Q
        assert conn(torch.randn(N, t, C)).shape == (N, Q, D)


def test_pooling_to_144_tokens_llava_budget():
    conn = build_connector(ConnectorConfig(type="linear", pool_tokens=144), 4, 8)
    assert conn.num_output_tokens(576) == 144
    assert conn(torch.randn(1, 576, 4)).shape == (1, 144, 8)


# ------------------------------------------------------------------ dependence on inputs, gradients


@pytest.mark.parametrize("pool,s", [(None, 1), (16, 2)])
@pytest.mark.parametrize("type_", ALL_TYPES)
def test_output_depends_on_image_features(type_, pool, s):
    torch.manual_seed(0)
    conn = build_connector(_cfg(type_, pool, s), C, D)
    x = torch.randn(N, T, C)
    x2 = x.clone()
    # replace one token of sample 0 (not by a constant shift: LayerNorm on the features removes that)
    x2[0, 37] = torch.randn(C) * 3
    with torch.no_grad():
        y, y2 = conn(x), conn(x2)
    assert not torch.allclose(y[0], y2[0])
    assert torch.equal(y[1], y2[1])  # samples do not mix


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_gradients_reach_every_parameter(type_):
    torch.manual_seed(0)
    conn = build_connector(_cfg(type_, 16, 2, output_norm=True), C, D, target_rms=1.0)
    y = conn(torch.randn(N, T, C))
    (y * torch.randn_like(y)).sum().backward()
    params = dict(conn.named_parameters())
    assert "norm.gain" in params
    missing = [name for name, p in params.items() if p.grad is None]
    assert not missing
    zero = [name for name, p in params.items() if not p.grad.abs().sum() > 0]
    assert not zero


# ------------------------------------------------------------------ resampler structure


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("s", [1, 2])
def test_perceiver_structure_and_parameter_count(s):
    conn = build_connector(_cfg("perceiver", s=s, num_layers=3), C, D)
    p = conn.projector
    assert isinstance(p, PerceiverResampler) and len(p.blocks) == 3
    assert p.latents.shape == (Q, D)
    assert p.blocks[0].ff[1].out_features == 4 * D  # FFN mult 4
    c, L = C * s * s, 3
    assert _num_params(p) == c * D + 3 * D + Q * D + L * (12 * D * D + 6 * D)


def test_perceiver_latents_attend_to_features_and_themselves():
    # keys/values are [media; latents]: with one image token, the attention is over 1 + Q keys
    conn = build_connector(_cfg("perceiver", num_layers=1), C, D)
    block = conn.projector.blocks[0]
    seen = {}
    orig = block.attn.forward
    block.attn.forward = lambda q, kv: (seen.setdefault("kv", kv.shape), orig(q, kv))[1]
    conn(torch.randn(N, 1, C))
    assert seen["kv"] == (N, 1 + Q, D)


@pytest.mark.parametrize("s", [1, 2])
def test_qformer_structure_and_parameter_count(s):
    conn = build_connector(_cfg("qformer", s=s, num_layers=3), C, D)
    p = conn.projector
    assert isinstance(p, QFormer) and len(p.blocks) == 3
    assert p.queries.shape == (Q, D)
    c, L = C * s * s, 3
    assert p.blocks[0].cross_attn.k.in_features == c  # keys/values come from the image width
    assert (p.proj.in_features, p.proj.out_features) == (D, D)
    assert _num_params(p) == 2 * c + Q * D + 3 * D + D * D + L * (14 * D * D + 2 * c * D + 17 * D)


def test_qformer_blocks_are_post_ln():
    # BERT's post-LN: each sublayer reads the previous LayerNorm's output and its residual sum is
    # normalised: q1 = LN(q + SA(q)), q2 = LN(q1 + CA(q1, img)), q3 = LN(q2 + FFN(q2))
    torch.manual_seed(0)
    conn = build_connector(_cfg("qformer", num_layers=1), C, D)
    blk = conn.projector.blocks[0]
    io = {}
    for name in ("self_attn", "cross_attn", "ff", "norm_self", "norm_cross", "norm_ff"):
        getattr(blk, name).register_forward_hook(lambda m, a, out, name=name: io.__setitem__(name, (a, out)))
    q, img = torch.randn(N, Q, D) * 5 + 3, torch.randn(N, T, C)
    with torch.no_grad():
        out = blk(q, img)
    assert torch.equal(io["self_attn"][0][0], q)
    assert torch.allclose(io["norm_self"][0][0], q + io["self_attn"][1])
    q1 = io["norm_self"][1]
    assert torch.equal(io["cross_attn"][0][0], q1) and torch.equal(io["cross_attn"][0][1], img)
    assert torch.allclose(io["norm_cross"][0][0], q1 + io["cross_attn"][1])
    q2 = io["norm_cross"][1]
    assert torch.equal(io["ff"][0][0], q2)
    assert torch.allclose(io["norm_ff"][0][0], q2 + io["ff"][1])
    assert torch.equal(out, io["norm_ff"][1])


def test_perceiver_blocks_are_pre_ln():
    # Flamingo's pre-LN: latents + Attn(LN(latents), [LN(media); LN(latents)]), then + FFN(LN(.))
    torch.manual_seed(0)
    conn = build_connector(_cfg("perceiver", num_layers=1), C, D)
    blk = conn.projector.blocks[0]
    media, lat = torch.randn(N, T, D), torch.randn(N, Q, D) * 5 + 3
    with torch.no_grad():
        out = blk(media, lat)
        ql = blk.norm_latents(lat)
        mid = lat + blk.attn(ql, torch.cat([blk.norm_media(media), ql], dim=1))
        expect = mid + blk.ff[3](blk.ff[2](blk.ff[1](blk.ff[0](mid))))
    assert isinstance(blk.ff[0], torch.nn.LayerNorm)
    assert torch.allclose(out, expect, atol=1e-6)


@pytest.mark.parametrize("type_", RESAMPLERS)
def test_resampler_init_is_deterministic(type_):
    cfg = _cfg(type_, num_queries=64)
    torch.manual_seed(5)
    a = build_connector(cfg, C, 64)
    torch.manual_seed(5)
    b = build_connector(cfg, C, 64)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    learned = a.projector.latents if type_ == "perceiver" else a.projector.queries
    assert 0.018 < learned.std().item() < 0.022 and abs(learned.mean().item()) < 0.002


# ------------------------------------------------------------------ pooling


def test_avg_pool_tokens_is_the_mean_of_each_block():
    # a 4x4 grid, row-major, channel 0 = token index, channel 1 = -10 * token index
    v = torch.arange(16, dtype=torch.float32)
    x = torch.stack([v, -10 * v], dim=-1).unsqueeze(0)  # [1, 16, 2]
    y = avg_pool_tokens(x, 4)
    # blocks: (0,0) = tokens 0,1,4,5; (0,1) = 2,3,6,7; (1,0) = 8,9,12,13; (1,1) = 10,11,14,15
    expect = torch.tensor([[2.5, -25.0], [4.5, -45.0], [10.5, -105.0], [12.5, -125.0]])
    assert torch.allclose(y[0], expect)
    assert torch.allclose(avg_pool_tokens(x, 1)[0, 0], torch.tensor([7.5, -75.0]))
    assert avg_pool_tokens(x, 16) is x


def test_avg_pool_tokens_non_dividing_grid_uses_overlapping_windows():
    # 3x3 -> 2x2: adaptive windows rows/cols [0, 2) and [1, 3)
    x = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1)
    y = avg_pool_tokens(x, 4)[0, :, 0]
    expect = [(0 + 1 + 3 + 4) / 4, (1 + 2 + 4 + 5) / 4, (3 + 4 + 6 + 7) / 4, (4 + 5 + 7 + 8) / 4]
    assert torch.allclose(y, torch.tensor(expect))


def test_pool_runs_before_pixel_shuffle():
    # pool 8x8 -> 4x4 then shuffle 2 -> 2x2 tokens of width 4C; checked against the two steps by hand
    @register_connector("_test_id")
    class Identity(torch.nn.Module):
        def __init__(self, in_dim, out_dim, cfg):
            super().__init__()

        def forward(self, x):
            return x

    try:
        conn = build_connector(ConnectorConfig(type="_test_id", pool_tokens=16, pixel_shuffle=2), C, C)
        x = torch.randn(N, T, C)
        assert torch.equal(conn(x), pixel_shuffle(avg_pool_tokens(x, 16), 2))
        grid = x.reshape(N, 8, 8, C)
        # output token 0, channel block 1 = pooled token (0, 1) = mean of input rows 0-1, cols 2-3
        assert torch.allclose(conn(x)[:, 0, C : 2 * C], grid[:, 0:2, 2:4].mean(dim=(1, 2)), atol=1e-6)
    finally:
        CONNECTORS.pop("_test_id")


# ------------------------------------------------------------------ errors name the config key


def test_pool_tokens_errors_name_the_key():
    with pytest.raises(ValueError, match=r"connector\.pool_tokens=12 is not a square"):
        build_connector(ConnectorConfig(type="linear", pool_tokens=12), C, D)
    conn = build_connector(ConnectorConfig(type="linear", pool_tokens=25), C, D)
    with pytest.raises(ValueError, match=r"connector\.pool_tokens=25 is larger than the 16 tokens"):
        conn.num_output_tokens(16)
    with pytest.raises(ValueError, match=r"connector\.pool_tokens"):
        conn(torch.randn(1, 16, C))
    with pytest.raises(ValueError, match=r"connector\.pool_tokens needs a square token grid"):
        conn.num_output_tokens(30)
    with pytest.raises(ValueError, match=r"connector\.pixel_shuffle=2 does not divide.*connector\.pool_tokens=9"):
        build_connector(ConnectorConfig(type="linear", pool_tokens=9, pixel_shuffle=2), C, D)


@pytest.mark.parametrize("type_", RESAMPLERS)
def test_num_heads_must_divide_width(type_):
    with pytest.raises(ValueError, match=r"connector\.num_heads=5 does not divide.*width 16"):
        build_connector(_cfg(type_, num_heads=5), C, D)
    build_connector(_cfg(type_, num_heads=8), C, D)  # 16 / 8 is fine


# ------------------------------------------------------------------ in the VLM and checkpoints


@pytest.mark.parametrize("type_", RESAMPLERS)
def test_resampler_in_vlm_and_checkpoint_roundtrip(type_, tmp_path):
    from vlmkit.models.checkpoint_io import load_checkpoint, save_checkpoint

    cfg = tiny_model_config()
    cfg.connector = ConnectorConfig(type=type_, num_queries=6, num_layers=1, num_heads=2, pool_tokens=4)
    model, tok = make_model(seed=0, cfg=cfg)
    assert model.tokens_per_image == 6
    path = save_checkpoint(model, tok, tmp_path / "ck")
    loaded, _ = load_checkpoint(path)
    assert loaded.tokens_per_image == 6
    ids, mask = left_pad([prompt_ids(model, [1, 2], 1), prompt_ids(model, [3], 1)])
    pv = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, pv).logits, loaded(ids, mask, pv).logits)
