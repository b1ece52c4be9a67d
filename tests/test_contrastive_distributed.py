"""Data-parallel contrastive losses with real processes (2 ranks, gloo, CPU): every rank scores
its own rows against the gathered global batch, and the gradients must equal one process's on
the same global batch -- for CLIP and SigLIP, on raw features (even and uneven shares, both
reductions) and on a small DualEncoder wrapped in DistributedDataParallel.

Everything runs in float64 so the comparison can be tight (1e-6 relative; the differences are
at rounding level)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

WORLD = 2
N = 6  # raw features: global batch
SHARES = {"even": (3, 3), "uneven": (2, 4)}
DE_N = 4  # dual encoder: global batch (2 rows per rank)
VOCAB = 40



pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------- the problems (shared)


def raw_problem():
    """Inputs and parameters of a small linear 'dual encoder' on raw features (same on every rank)."""
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(N, 5, generator=g, dtype=torch.float64)
    x_txt = torch.randn(N, 7, generator=g, dtype=torch.float64)
    params = {
        "w_img": torch.nn.Parameter(torch.randn(4, 5, generator=g, dtype=torch.float64)),
        "w_txt": torch.nn.Parameter(torch.randn(4, 7, generator=g, dtype=torch.float64)),
        "log_scale": torch.nn.Parameter(torch.tensor(math.log(3.0), dtype=torch.float64)),
        "bias": torch.nn.Parameter(torch.tensor(-1.5, dtype=torch.float64)),
    }
    return x_img, x_txt, params


def hard_negatives():
    """A hard-negative text per row (raw features), the last row without one."""
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(N, dtype=torch.bool)
    mask[-1] = False
    return torch.randn(N, 7, generator=g, dtype=torch.float64), mask


def raw_loss(kind, params, x_img, x_txt, gather, reduction, x_neg=None, neg_mask=None):
    from vlmkit.train.contrastive_losses import clip_loss, siglip_loss

    img = F.normalize(x_img @ params["w_img"].T, dim=-1)
    txt = F.normalize(x_txt @ params["w_txt"].T, dim=-1)
    neg = {}
    if x_neg is not None:
        neg = {"negatives": F.normalize(x_neg @ params["w_txt"].T, dim=-1), "negative_mask": neg_mask}
    scale = params["log_scale"].exp().clamp(max=100.0)
    if kind == "clip":
        return clip_loss(img, txt, scale, gather=gather, reduction=reduction, **neg) + 0.0 * params["bias"]
    return siglip_loss(img, txt, scale, params["bias"], gather=gather, reduction=reduction, **neg)


def dual_encoder(kind):
    from vlmkit.config import VisionConfig
    from vlmkit.models.contrastive import DualEncoderConfig, TextTowerConfig, build_dual_encoder

    torch.manual_seed(0)
    cfg = DualEncoderConfig(
        vision=VisionConfig(name="tiny-vit", image_size=32, overrides={"num_hidden_layers": 2, "hidden_size": 64,
                                                                       "intermediate_size": 128}),
        text=TextTowerConfig(pooling="eos", max_length=16,
                             overrides={"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64}),
        embed_dim=16, loss=kind,
    )  # fmt: skip
    return build_dual_encoder(cfg).double()


def dual_encoder_batch():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(DE_N, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(5, VOCAB, (DE_N, 8), generator=g)
    lengths = [8, 5, 3, 6]
    mask = torch.zeros(DE_N, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return pixels, ids * mask, mask


# ---------------------------------------------------------------------- the worker


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import safetensors.torch
    from torch.nn.parallel import DistributedDataParallel

    from vlmkit.train.contrastive_losses import dual_encoder_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results: dict[str, torch.Tensor] = {}
    try:
        for kind in ("clip", "siglip"):
            for share, sizes in SHARES.items():
                start = sum(sizes[:rank])
                rows = slice(start, start + sizes[rank])
                for reduction in ("sum", "mean"):
                    if reduction == "mean" and share == "uneven":
                        continue  # "mean" is exact with equal shares only (docs/contrastive.md)
                    x_img, x_txt, params = raw_problem()
                    loss = raw_loss(kind, params, x_img[rows], x_txt[rows], True, reduction)
                    # sum: divide by the global batch, then sum gradients over ranks;
                    # mean: DDP's recipe, average gradients (and losses) over ranks
                    part = loss / N if reduction == "sum" else loss
                    part.backward()
                    value = part.detach().clone()
                    dist.all_reduce(value)
                    key = f"raw.{kind}.{share}.{reduction}"
                    results[f"{key}.loss"] = value if reduction == "sum" else value / WORLD
                    for name, p in params.items():
                        grad = p.grad.clone()
                        dist.all_reduce(grad)
                        results[f"{key}.{name}"] = grad if reduction == "sum" else grad / WORLD

                # NegCLIP hard negatives, gathered like the texts (sum reduction)
                x_img, x_txt, params = raw_problem()
                x_neg, neg_mask = hard_negatives()
                loss = raw_loss(kind, params, x_img[rows], x_txt[rows], True, "sum", x_neg[rows], neg_mask[rows])
                (loss / N).backward()
                for name, p in params.items():
                    grad = p.grad.clone()
                    dist.all_reduce(grad)
                    results[f"neg.{kind}.{share}.{name}"] = grad

            # a DualEncoder under DDP: each rank runs its 2 rows; DDP averages the gradients
            model = dual_encoder(kind)
            ddp = DistributedDataParallel(model, find_unused_parameters=True)  # (no buffers: a ViT)
            pixels, ids, mask = dual_encoder_batch()
            mine = slice(rank * DE_N // WORLD, (rank + 1) * DE_N // WORLD)
            out = ddp(pixel_values=pixels[mine], input_ids=ids[mine], attention_mask=mask[mine])
            loss = dual_encoder_loss(out, kind, gather=True, reduction="mean")
            loss.backward()
            value = loss.detach().clone()
            dist.all_reduce(value)
            results[f"de.{kind}.loss"] = value / WORLD
            for name, p in model.named_parameters():
                results[f"de.{kind}.{name}"] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        tensors = {k: v.contiguous() for k, v in results.items()}
        safetensors.torch.save_file(tensors, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import safetensors.torch
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("contrastive-ddp")
    dual_encoder("clip")  # import the model code here once: forked ranks inherit it (seconds each)
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True, start_method=method)
    return [safetensors.torch.load_file(str(out / f"rank{r}.safetensors")) for r in range(WORLD)]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=lambda m: f"{what}: {m}")


CASES = [(kind, share, reduction) for kind in ("clip", "siglip") for share in SHARES for reduction in ("sum", "mean")
         if not (reduction == "mean" and share == "uneven")]  # fmt: skip


@pytest.mark.parametrize("kind,share,reduction", CASES)
def test_raw_feature_gradients_equal_one_process(ranks, kind, share, reduction):
    x_img, x_txt, params = raw_problem()
    loss = raw_loss(kind, params, x_img, x_txt, gather=False, reduction="mean")
    loss.backward()
    key = f"raw.{kind}.{share}.{reduction}"
    for r, got in enumerate(ranks):
        _close(got[f"{key}.loss"], loss.detach(), f"rank {r} loss")
        for name, p in params.items():
            if kind == "clip" and name == "bias":
                continue
            assert p.grad.abs().max() > 0, name
            _close(got[f"{key}.{name}"], p.grad, f"rank {r} {name}")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_encoder_ddp_gradients_equal_one_process(ranks, kind):
    from vlmkit.train.contrastive_losses import dual_encoder_loss

    model = dual_encoder(kind)
    pixels, ids, mask = dual_encoder_batch()
    loss = dual_encoder_loss(model(pixels, ids, mask), kind)
    loss.backward()
    checked = 0
    for r, got in enumerate(ranks):
        _close(got[f"de.{kind}.loss"], loss.detach(), f"rank {r} loss")
        for name, p in model.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            _close(got[f"de.{kind}.{name}"], want, f"rank {r} {name}")
            checked += int(want.abs().max() > 0)
    # the gradient reached both towers, the projections and the temperature
    for name in ("image_proj.weight", "text_proj.weight", "logit_scale"):
        assert model.get_parameter(name).grad.abs().max() > 0, name
    assert checked > 20


def test_gather_without_a_process_group_is_the_identity():
    from vlmkit.train.contrastive_losses import clip_loss, gather_features, siglip_loss

    x = torch.randn(3, 4)
    y, offset = gather_features(x)
    assert y is x and offset == 0
    img, txt = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    assert clip_loss(img, txt, 5.0, gather=True) == clip_loss(img, txt, 5.0)
    assert siglip_loss(img, txt, 5.0, -1.0, gather=True) == siglip_loss(img, txt, 5.0, -1.0)


@pytest.mark.parametrize("kind,share", [(k, s) for k in ("clip", "siglip") for s in SHARES])
def test_hard_negative_gradients_equal_one_process(ranks, kind, share):
    x_img, x_txt, params = raw_problem()
    x_neg, neg_mask = hard_negatives()
    raw_loss(kind, params, x_img, x_txt, False, "mean", x_neg, neg_mask).backward()
    for r, got in enumerate(ranks):
        for name, p in params.items():
            if kind == "clip" and name == "bias":
                continue
            _close(got[f"neg.{kind}.{share}.{name}"], p.grad, f"rank {r} {name}")
