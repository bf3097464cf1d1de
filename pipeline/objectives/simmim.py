"""SimMIM masked image modelling (Xie et al. 2022) for timm ViTs and SwinV2 backbones.

Masked patches of the input are replaced by a learnable mask token right after the patch embedding, the
encoder runs as usual, a 1x1 convolution maps each position of the final feature map to the pixels it covers
(Conv2d(C, stride^2 * 3, 1) + PixelShuffle(stride)), and the loss is the L1 error on masked pixels only:

    loss = sum(|target - reconstruction| * pixel_mask) / (sum(pixel_mask) + 1e-5) / channels

with the target the (already mean/std normalised) input image, or, as in the SwinV2 SimMIM recipe, that image
normalised by the mean and standard deviation of a 47x47 neighbourhood around each pixel (`norm_target_window`).

Masks are drawn at `mask_patch_size` granularity (SimMIM: 32 px squares) and expanded to the model's token
grid (4 px patches for SwinV2, 16 or 14 px for ViT, where mask patch = model patch is the usual choice). In
training they are drawn per sample in the loader workers (`MaskedImageDecoder`, pipeline/data/decoders.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbone import backbone_info


def mask_patch_count(num_mask_patches: int, mask_ratio: float) -> int:
    """Masked mask-patches per image: round(ratio * n), halves rounded up (SimMIM's ceil gives the same for its
    6x6 grid at 0.6, and does not turn 0.6 * 10 = 6.000000000000001 into 7)."""
    return int(math.floor(mask_ratio * num_mask_patches + 0.5))


def random_patch_mask(batch: int, grid_hw: tuple[int, int], mask_ratio: float, mask_patch_size: int,
                      model_patch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool (batch, H_tokens, W_tokens), True = masked. Each image has exactly `mask_patch_count(n, ratio)` of its
    n mask patches masked, each mask patch covering (mask_patch_size / model_patch_size)^2 tokens. Drawn on the
    generator's device (CPU by default)."""
    if mask_patch_size % model_patch_size:
        raise ValueError(f"mask_patch_size={mask_patch_size} must be a multiple of the model patch size "
                         f"{model_patch_size}")
    scale = mask_patch_size // model_patch_size
    h, w = grid_hw
    if h % scale or w % scale:
        raise ValueError(f"the token grid {h}x{w} is not divisible into mask patches of {scale}x{scale} tokens "
                         f"(mask_patch_size={mask_patch_size}, model patch {model_patch_size})")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1]")
    mh, mw = h // scale, w // scale
    count = mask_patch_count(mh * mw, mask_ratio)
    device = generator.device if generator is not None else None
    # the rank of each mask patch in a random order; the `count` lowest ranks are masked
    order = torch.rand(batch, mh * mw, generator=generator, device=device).argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(mh * mw, device=order.device).expand(batch, -1))
    mask = (rank < count).view(batch, mh, mw)
    return mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def pixel_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H_tokens, W_tokens) token mask -> (B, 1, H_tokens * patch, W_tokens * patch) pixel mask (same dtype)."""
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


def local_normalise(images: torch.Tensor, window: int, eps: float = 1e-6) -> torch.Tensor:
    """Each pixel minus the mean, over the std (unbiased), of the window x window neighbourhood around it (per
    channel, the neighbourhood clipped at the border): SimMIM's 'normalised target' for SwinV2."""
    if window % 2 != 1:
        raise ValueError(f"norm_target_window={window} must be odd")
    x = images.float()
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(x, count_include_pad=False, **pool)
    mean_sq = F.avg_pool2d(x * x, count_include_pad=False, **pool)
    ones = torch.ones_like(x[:1, :1])
    count = F.avg_pool2d(ones, count_include_pad=True, **pool) * window * window  # pixels inside the image
    var = ((mean_sq - mean * mean) * count / (count - 1).clamp(min=1)).clamp(min=0)
    return (x - mean) / (var + eps).sqrt()


def simmim_loss(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, patch_size: int,
                norm_target_window: int = 0) -> torch.Tensor:
    """L1 reconstruction loss on masked pixels only (float32 scalar).

    images, reconstruction: (B, C, H, W); mask: bool (B, H/patch, W/patch) token mask, True = masked."""
    target = local_normalise(images, norm_target_window) if norm_target_window else images.float()
    m = pixel_mask(mask, patch_size).to(torch.float32)
    err = (reconstruction.float() - target).abs()
    return (err * m).sum() / (m.sum() + 1e-5) / images.shape[1]




class SimMIM(nn.Module):
    """Encoder (timm ViT or SwinV2, its classifier removed) + mask token + linear pixel decoder.

    forward(images (B,C,H,W), mask bool (B, H/patch, W/patch)) -> {"loss", "reconstruction"}.
    The encoder's parameters keep their names under `encoder.`; `mask_token` and `decoder.0.*` are extra."""

    def __init__(self, encoder: nn.Module, norm_target_window: int = 0):
        super().__init__()
        info = backbone_info(encoder)
        if getattr(encoder, "num_classes", 0) and hasattr(encoder, "reset_classifier"):
            encoder.reset_classifier(0)  # an unused head would get no gradient
        if info.kind == "vit" and not isinstance(getattr(encoder, "patch_drop", nn.Identity()), nn.Identity):
            raise ValueError("SimMIM needs every patch token: build the ViT with patch_drop_rate=0")
        if norm_target_window and norm_target_window % 2 != 1:
            raise ValueError(f"norm_target_window={norm_target_window} must be odd (SimMIM uses 47)")
        self.encoder = encoder
        self.info = info
        self.norm_target_window = norm_target_window
        embed_dim = encoder.patch_embed.proj.out_channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(nn.Conv2d(info.num_features, info.stride ** 2 * info.in_chans, kernel_size=1),
                                     nn.PixelShuffle(info.stride))

    def make_mask(self, batch: int, mask_ratio: float, mask_patch_size: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, *token grid) bool masks for this encoder's input size."""
        return random_patch_mask(batch, self.info.grid_size, mask_ratio, mask_patch_size, self.info.patch_size,
                                 generator)

    def no_weight_decay(self) -> set[str]:
        """Full parameter names kept out of weight decay beyond the usual 1-d / bias rule: the mask token and
        the encoder's own list (ViT: pos_embed, cls_token; SwinV2: cpb_mlp.*, logit_scale)."""
        names = {"mask_token"}
        if hasattr(self.encoder, "no_weight_decay"):
            names |= {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names

    def _replace_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: patch embeddings (B, N, D) or (B, H, W, D); masked positions become the mask token."""
        if x.ndim == 4:
            w = mask.unsqueeze(-1).to(x.dtype)
            token = self.mask_token.to(x.dtype).view(1, 1, 1, -1)
        else:
            w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
            token = self.mask_token.to(x.dtype)
        return x * (1 - w) + token * w

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, num_features, H/stride, W/stride): the final normalised feature map of the masked input."""
        enc, info = self.encoder, self.info
        h, w = images.shape[-2] // info.stride, images.shape[-1] // info.stride
        if mask.shape[1:] != (images.shape[-2] // info.patch_size, images.shape[-1] // info.patch_size):
            raise ValueError(f"mask {tuple(mask.shape)} does not match the token grid of images "
                             f"{tuple(images.shape)} with patch {info.patch_size}")
        x = self._replace_masked(enc.patch_embed(images), mask)
        if info.kind == "vit":  # the rest of timm's VisionTransformer.forward_features
            x = enc._pos_embed(x)
            x = enc.patch_drop(x)
            x = enc.norm_pre(x)
            if getattr(enc, "grad_checkpointing", False) and not torch.jit.is_scripting():
                from timm.models._manipulate import checkpoint_seq

                x = checkpoint_seq(enc.blocks, x)
            else:
                x = enc.blocks(x)
            x = enc.norm(x)
            x = x[:, enc.num_prefix_tokens:]
        else:  # SwinV2: patch_embed -> stages -> norm (stages checkpoint themselves when enabled)
            x = enc.layers(x)
            x = enc.norm(x)
        if x.ndim == 3:  # (B, h*w, C)
            return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return x.permute(0, 3, 1, 2)  # NHWC -> NCHW

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        reconstruction = self.decoder(self.encode(images, mask))
        loss = simmim_loss(images, reconstruction, mask, self.info.patch_size, self.norm_target_window)
        return {"loss": loss, "reconstruction": reconstruction}


@torch.no_grad()
def evaluate_reconstruction(model: SimMIM, shard_pattern: str | list[str], transform, mask_ratio: float, mask_patch_size: int,
                            batch_size: int = 256, max_samples: int = 0, seed: int = 0,
                            key: str = "data.val") -> dict[str, float]:
    """Held-out masked-reconstruction error with masks drawn from `seed` (the same masks at every evaluation):
    {"recon_l1": the SimMIM loss over all samples, "recon_l1_mean_baseline": the same for predicting 0 (the
    mean of a normalised image, or of a normalised target), "samples"}. Rank 0, full model (gather under
    ZeRO-3). kNN / linear probes of MIM features are weak early in training (they can trail a random
    initialisation on the demo data), so this is the signal that pretraining works."""
    from pipeline.data.decoders import EvalSampleDecoder
    from pipeline.data.eval_loader import iterate_decoded
    from pipeline.data.loader import ShardSet, expand_shards

    was_training = model.training
    model.eval()
    param = next(model.parameters())
    shards = ShardSet(expand_shards(shard_pattern, key))
    limit = shards.total if max_samples <= 0 else min(max_samples, shards.total)
    gen = torch.Generator().manual_seed(seed)
    decoder = EvalSampleDecoder(transform, tokenizer=None)  # the images; masks are drawn here, from `gen`
    sums = {"recon_l1": 0.0, "recon_l1_mean_baseline": 0.0}
    count = 0
    for batch in iterate_decoded(shards, decoder, batch_size, range(limit)):
        if "images" not in batch:
            continue
        x = decoder.to_device(batch, param.device, param.dtype)["images"]
        mask = model.make_mask(x.shape[0], mask_ratio, mask_patch_size, gen).to(param.device)
        out = model(x, mask)
        sums["recon_l1"] += out["loss"].item() * x.shape[0]
        zero = torch.zeros_like(out["reconstruction"])
        sums["recon_l1_mean_baseline"] += simmim_loss(x, zero, mask, model.info.patch_size,
                                                      model.norm_target_window).item() * x.shape[0]
        count += x.shape[0]
    model.train(was_training)
    return {k: v / max(count, 1) for k, v in sums.items()} | {"samples": count}
