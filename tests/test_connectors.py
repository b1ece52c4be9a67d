import pytest
import torch

from vlmkit.config import ConnectorConfig
from vlmkit.models.connectors import CONNECTORS, MLPGeluProjector, build_connector, pixel_shuffle, register_connector


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
        build_connector(ConnectorConfig(type="qformer"), 8, 8)
    for key in CONNECTORS:
        assert key in str(err.value)


def test_register_connector_adds_and_refuses_duplicates():
    @register_connector("_test_identity")
    class Identity(torch.nn.Module):
        def __init__(self, in_dim, out_dim):
            super().__init__()

        def forward(self, x):
            return x

    try:
        conn = build_connector(ConnectorConfig(type="_test_identity"), 4, 4)
        assert isinstance(conn.projector, Identity)
        with pytest.raises(ValueError, match="already registered"):
            register_connector("_test_identity")(Identity)
    finally:
        CONNECTORS.pop("_test_identity")


def test_output_norm_matches_target_rms_and_is_learnable():
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(type="mlp2x_gelu", output_norm=True), 8, 32, target_rms=0.02)
    y = conn(torch.randn(3, 16, 8) * 10)
    rms = y.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 0.02), rtol=1e-4)
    assert conn.norm.gain.requires_grad
    with pytest.raises(ValueError, match="target_rms"):
        build_connector(ConnectorConfig(output_norm=True), 8, 32)
