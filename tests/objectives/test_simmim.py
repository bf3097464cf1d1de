"""SimMIM: exact per-image masking at mask-patch granularity, the masked-pixel L1 loss by hand, the mask token
in the encoder's input, and the whole model on the demo ViT and SwinV2."""
import math

import pytest
import torch

from pipeline.models.backbone import create_backbone
from pipeline.data.decoders import MaskedImageDecoder
from pipeline.objectives.simmim import (SimMIM, local_normalise, mask_patch_count, pixel_mask,
                                        random_patch_mask, simmim_loss)


@pytest.mark.parametrize("batch,grid,ratio,mask_patch,model_patch,expected", [
    (8, (48, 48), 0.6, 32, 4, 22),    # SwinV2 at 192: 6x6 mask patches of 8x8 tokens, ceil/round(21.6) = 22
    (8, (14, 14), 0.6, 16, 16, 118),  # ViT-B/16 at 224, mask patch = model patch: round(117.6)
    (5, (16, 16), 0.6, 16, 4, 10),    # the demo SwinV2: 4x4 mask patches
    (3, (8, 8), 0.75, 8, 8, 48),
    (4, (6, 6), 0.0, 4, 4, 0),
    (4, (6, 6), 1.0, 4, 4, 36),
])
def test_mask_ratio_exact_per_image(batch, grid, ratio, mask_patch, model_patch, expected):
    g = torch.Generator().manual_seed(1)
    mask = random_patch_mask(batch, grid, ratio, mask_patch, model_patch, g)
    scale = mask_patch // model_patch
    assert mask.dtype == torch.bool and mask.shape == (batch, *grid)
    blocks = mask.view(batch, grid[0] // scale, scale, grid[1] // scale, scale)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant within each mask patch
    per_image = blocks[:, :, 0, :, 0].flatten(1).sum(1)
    assert per_image.tolist() == [expected] * batch
    assert mask.flatten(1).sum(1).tolist() == [expected * scale * scale] * batch


def test_masks_are_random_per_image_and_reproducible():
    a = random_patch_mask(16, (48, 48), 0.6, 32, 4, torch.Generator().manual_seed(0))
    b = random_patch_mask(16, (48, 48), 0.6, 32, 4, torch.Generator().manual_seed(0))
    c = random_patch_mask(16, (48, 48), 0.6, 32, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(m.flatten().tolist()) for m in a}) == 16
    # every mask patch is masked about 60% of the time over many images
    many = random_patch_mask(4000, (6, 6), 0.6, 4, 4, torch.Generator().manual_seed(2)).float().mean(0)
    assert torch.allclose(many, torch.full_like(many, 22 / 36), atol=0.04)


def test_mask_count_rounding_and_errors():
    assert mask_patch_count(36, 0.6) == 22 and mask_patch_count(10, 0.6) == 6 and mask_patch_count(5, 0.5) == 3
    with pytest.raises(ValueError, match="multiple"):
        random_patch_mask(1, (48, 48), 0.6, 30, 4)
    with pytest.raises(ValueError, match="divisible"):
        random_patch_mask(1, (14, 14), 0.6, 64, 16)  # 4x4 tokens per mask patch on a 14x14 grid


def test_loss_by_hand_two_masked_patches():
    # 1 image, 3 channels, 8x8 pixels, patch 4 -> 2x2 tokens holding the values 1, 2 / 3, 4 in every channel
    tokens = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    images = pixel_mask(tokens.unsqueeze(0), 4).expand(1, 3, 8, 8).contiguous()
    recon = torch.zeros_like(images)
    recon[:, 1] = 1.0  # channel 1 predicted 1 everywhere
    mask = torch.tensor([[[False, True], [False, True]]])  # the tokens holding 2 and 4
    # masked pixels: 2 tokens x 16 pixels; errors per channel |2-0|,|2-1|,|2-0| and |4-0|,|4-1|,|4-0|
    total = 16 * (2 + 1 + 2) + 16 * (4 + 3 + 4)
    expected = total / (32 + 1e-5) / 3
    assert simmim_loss(images, recon, mask, 4).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(8 / 3, rel=1e-5)


def test_unmasked_pixels_do_not_matter():
    torch.manual_seed(0)
    images, recon = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32, requires_grad=True)
    mask = random_patch_mask(4, (8, 8), 0.5, 8, 4, torch.Generator().manual_seed(0))
    pm = pixel_mask(mask, 4).expand_as(images)
    loss = simmim_loss(images, recon, mask, 4)
    noise = torch.randn_like(images) * 10
    images2 = torch.where(pm, images, images + noise)
    recon2 = torch.where(pm, recon.detach(), recon.detach() - noise)
    assert simmim_loss(images2, recon2, mask, 4).item() == pytest.approx(loss.item(), rel=1e-6)
    assert simmim_loss(torch.where(pm, images + 1, images), recon.detach(), mask, 4).item() != \
        pytest.approx(loss.item(), rel=1e-3)
    loss.backward()
    assert (recon.grad[~pm] == 0).all() and (recon.grad[pm] != 0).all()


def test_local_normalise_matches_brute_force():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64) * 3 + 1
    win = 5
    out = local_normalise(x, win)
    ref = torch.empty_like(x)
    for i in range(6):
        for j in range(7):
            patch = x[:, :, max(0, i - 2):i + 3, max(0, j - 2):j + 3].flatten(2)
            mean, var = patch.mean(-1), patch.var(-1, unbiased=True)
            ref[:, :, i, j] = (x[:, :, i, j] - mean) / (var + 1e-6).sqrt()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="odd"):
        local_normalise(x, 4)


def _capture_input(module):
    seen = {}

    def hook(mod, args):
        seen["x"] = args[0].detach().clone()
    return seen, module.register_forward_pre_hook(hook)


def test_mask_token_replaces_masked_embeddings_vit():
    torch.manual_seed(0)
    model = SimMIM(create_backbone("demo_vit")).eval()
    enc = model.encoder
    images = torch.randn(2, 3, 64, 64)
    mask = model.make_mask(2, 0.6, 8, torch.Generator().manual_seed(0))
    seen, handle = _capture_input(enc.blocks[0])
    model(images, mask)
    handle.remove()
    with torch.no_grad():
        patches = enc.patch_embed(images)  # (B, 64, D)
        expected = torch.where(mask.flatten(1).unsqueeze(-1), model.mask_token.expand_as(patches), patches)
        expected = torch.cat([enc.cls_token.expand(2, -1, -1), expected], 1) + enc.pos_embed
    torch.testing.assert_close(seen["x"], expected)
    assert not torch.allclose(seen["x"][:, 1:], (patches + enc.pos_embed[:, 1:]))


def test_mask_token_replaces_masked_embeddings_swinv2():
    torch.manual_seed(0)
    model = SimMIM(create_backbone("demo_swinv2")).eval()
    enc = model.encoder
    images = torch.randn(2, 3, 64, 64)
    mask = model.make_mask(2, 0.6, 16, torch.Generator().manual_seed(0))
    seen, handle = _capture_input(enc.layers[0])
    out = model(images, mask)
    handle.remove()
    with torch.no_grad():
        patches = enc.patch_embed(images)  # (B, 16, 16, D) NHWC
        token = model.mask_token.view(1, 1, 1, -1).expand_as(patches)
        expected = torch.where(mask.unsqueeze(-1), token, patches)
    torch.testing.assert_close(seen["x"], expected)
    out["loss"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("name,mask_patch", [("demo_vit", 8), ("demo_swinv2", 16)])
def test_simmim_model_end_to_end(name, mask_patch):
    torch.manual_seed(0)
    model = SimMIM(create_backbone(name), norm_target_window=0)
    assert model.encoder.num_classes == 0  # the classifier is dropped: no parameter without a gradient
    images = torch.randn(4, 3, 64, 64)
    mask = model.make_mask(4, 0.6, mask_patch, torch.Generator().manual_seed(0))
    out = model(images, mask)
    assert out["reconstruction"].shape == images.shape
    torch.testing.assert_close(out["loss"], simmim_loss(images, out["reconstruction"], mask, model.info.patch_size))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # activation checkpointing gives the same loss
    model.encoder.set_grad_checkpointing(True)
    torch.testing.assert_close(model(images, mask)["loss"], out["loss"])
    # a few steps on one batch lower the loss
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(6):
        loss = model(images, mask)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first


def test_norm_target_and_mask_shape_check():
    torch.manual_seed(0)
    model = SimMIM(create_backbone("demo_swinv2"), norm_target_window=7)
    images = torch.rand(2, 3, 64, 64)
    mask = model.make_mask(2, 0.6, 16)
    out = model(images, mask)
    assert math.isfinite(out["loss"].item())
    assert out["loss"].item() == pytest.approx(
        simmim_loss(images, out["reconstruction"], mask, 4, norm_target_window=7).item())
    with pytest.raises(ValueError, match="token grid"):
        model(images, mask[:, :8, :8])
    with pytest.raises(ValueError, match="odd"):
        SimMIM(create_backbone("demo_vit"), norm_target_window=8)


def test_masked_image_decoder_is_seeded_by_the_loader():
    import io

    from PIL import Image

    from pipeline.data.loader import BadSample
    from pipeline.models.backbone import backbone_transforms

    model = SimMIM(create_backbone("demo_swinv2"))
    dec = MaskedImageDecoder(backbone_transforms(model.encoder, train=True, scale=(0.67, 1.0)),
                             model.info.grid_size, 0.6, 16, model.info.patch_size)
    buf = io.BytesIO()
    Image.new("RGB", (80, 72), (200, 30, 30)).save(buf, format="JPEG")
    raw = {"jpg": buf.getvalue()}  # no label, no caption: fine for SimMIM
    samples = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)  # what the loader does around decoder.sample()
        samples.append(dec.sample(raw))
    assert samples[0]["images"].shape == (3, 64, 64) and samples[0]["masks"].shape == (16, 16)
    assert samples[0]["masks"].sum() == 10 * 16
    assert torch.equal(samples[0]["masks"], samples[1]["masks"]) and not torch.equal(samples[0]["masks"],
                                                                                      samples[2]["masks"])
    batch = dec.collate(samples)
    assert batch["images"].shape == (3, 3, 64, 64) and batch["masks"].dtype == torch.bool
    assert torch.isfinite(model(dec.image.model_input(batch["images"], "cpu", torch.float32), batch["masks"])["loss"])
    with pytest.raises(BadSample):
        dec.sample({"txt": b"no image"})
    with pytest.raises(ValueError):
        MaskedImageDecoder(None, (16, 16), 0.6, 24, 4)


def test_simmim_flops():
    """SimMIM's forward on a masked image = the encoder's + the 1x1-conv decoder (2 x C x stride^2 x in_chans
    per final position = 2 x C x in_chans x H x W); the mask token is elementwise (0 FLOPs)."""
    from pipeline.train.flops import forward_flops

    encoder = create_backbone("demo_swinv2", num_classes=0)
    images = torch.empty(1, 3, 64, 64, device="meta")
    enc = forward_flops(encoder, images)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool, device="meta")
    assert forward_flops(SimMIM(encoder), images, mask) == enc + 2 * 256 * 3 * 64 * 64


def test_evaluate_reconstruction_on_demo_shards(demo_data):
    from pipeline.models.backbone import backbone_transforms
    from pipeline.objectives.simmim import evaluate_reconstruction

    torch.manual_seed(0)
    model = SimMIM(create_backbone("demo_swinv2"))
    tf = backbone_transforms(model.encoder, train=False)
    a = evaluate_reconstruction(model, demo_data["val"], tf, 0.6, 16, batch_size=16, max_samples=24)
    b = evaluate_reconstruction(model, demo_data["val"], tf, 0.6, 16, batch_size=16, max_samples=24)
    assert a == b and a["samples"] == 24 and model.training
    assert a["recon_l1"] > 0 and a["recon_l1_mean_baseline"] > 0
