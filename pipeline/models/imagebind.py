"""ImageBind-style binding: encoders for audio / depth / thermal / IMU trained to the embedding space of a frozen
CLIP image tower, so that text prompts (through the frozen text tower) classify the new modality zero-shot.

Layout of one modality encoder (`ModalityEncoder`), as in ImageBind (Girdhar et al., 2023):

- preprocessor: a patch stem, a LayerNorm over the patch embeddings, a learnable cls token and a learnable
  position embedding. audio: the (1, n_mels, frames) log-mel spectrogram patchified like an image by a
  Conv2d with kernel 16 and stride 10 (overlapping patches; 128 x 204 -> 12 x 19 = 228 patches); depth /
  thermal: a single-channel image through a Conv2d patch embedding (kernel = stride = 16); IMU: the (6, T)
  signal cut into windows of 8 steps, each flattened (6 x 8 = 48 values) through a Linear (2000 -> 250 patches);
  stems have no bias.
- trunk: pre-norm transformer blocks (multi-head attention with learnable bias_k / bias_v as ImageBind uses for
  these modalities, MLP with GELU, stochastic depth growing linearly to `drop_path` over the blocks);
- head: LayerNorm (eps 1e-6) -> the cls token -> Dropout (IMU: 0.5) -> Linear to the shared `embed_dim`, no bias;
- postprocessor: L2 normalisation and a logit scale. ImageBind multiplies the normalised embedding by a *fixed*
  scale (LearnableLogitScaling(learnable=False)): audio 20, depth 5, thermal 10, IMU 5 (the text tower's is
  learnable); the image embedding is only normalised. Here the encoder returns the normalised embedding and
  exposes the scale separately (`logit_scale()`: exp(log scale), clamped at `logit_scale_max`, a buffer when
  fixed, a shape-(1,) parameter when `logit_scale_learnable`), so the contrastive loss is
  InfoNCE(scale * <image, modality>) in both directions, e.g. `pipeline.objectives.clip_loss.clip_loss`.

Inputs with one extra leading dimension, (B, clips, ...), are several clips of one sample (audio evaluation):
their normalised embeddings are averaged and normalised again (ImageBind averages the scaled embeddings and
does not renormalise; for ranking the difference is only a per-sample scale).

`IMAGEBIND_HUGE` holds ImageBind-Huge's sizes (embed dim 1024 to match OpenCLIP ViT-H-14); `tiny_config` small
ones for the demo and tests.

Export: `export_imagebind(model, out)` writes `out/imagebind.json`, the open_clip directory of the towers in
`out/towers/` (open_clip_config.json + open_clip_model.safetensors, loadable with
`open_clip.create_model_and_transforms("local-dir:out/towers")`), and one directory per modality
(`out/audio/config.json` + `out/audio/model.safetensors`, see `export_encoder` / `load_encoder`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.export_target import export_directory

MODALITIES = ("audio", "depth", "thermal", "imu")
ENCODER_FORMAT = "pipeline.imagebind.encoder"
MODEL_FORMAT = "pipeline.imagebind"


@dataclass
class EncoderConfig:
    """One modality encoder. `input_size`: audio (n_mels, frames); depth / thermal (H, W); imu (6, steps)."""
    modality: str = "audio"
    embed_dim: int = 1024  # the shared space: must equal the CLIP towers' embed dim
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    input_size: list[int] = field(default_factory=lambda: [128, 204])
    in_channels: int = 1  # image-like inputs; the IMU takes input_size[0] channels
    patch_size: int = 16  # conv kernel (audio / depth / thermal) or IMU window length
    patch_stride: int = 10  # conv stride; ignored for the IMU (windows do not overlap)
    add_bias_kv: bool = True
    pre_transformer_ln: bool = False
    head_dropout: float = 0.0
    logit_scale: float = 20.0
    logit_scale_learnable: bool = False
    logit_scale_max: float = 100.0

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r} is not one of {', '.join(MODALITIES)}")
        if self.width % self.heads:
            raise ValueError(f"{self.modality}: width {self.width} is not divisible by heads {self.heads}")
        self.input_size = list(self.input_size)
        if len(self.input_size) != 2:
            raise ValueError(f"{self.modality}: input_size must have 2 entries")
        if self.modality == "imu" and self.input_size[1] % self.patch_size:
            raise ValueError(f"imu: steps {self.input_size[1]} must be a multiple of patch_size {self.patch_size}")
        if self.logit_scale <= 0:
            raise ValueError(f"{self.modality}: logit_scale must be > 0")

    @property
    def grid(self) -> tuple[int, int]:
        if self.modality == "imu":
            return 1, self.input_size[1] // self.patch_size
        k, s = self.patch_size, self.patch_stride
        return tuple((n - k) // s + 1 for n in self.input_size)

    @property
    def num_patches(self) -> int:
        a, b = self.grid
        return a * b

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown encoder config keys {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)


IMAGEBIND_HUGE = {
    "audio": EncoderConfig("audio", 1024, 768, 12, 12, 4.0, 0.1, [128, 204], 1, 16, 10, logit_scale=20.0),
    "depth": EncoderConfig("depth", 1024, 384, 12, 8, 4.0, 0.0, [224, 224], 1, 16, 16, logit_scale=5.0),
    "thermal": EncoderConfig("thermal", 1024, 768, 12, 12, 4.0, 0.0, [224, 224], 1, 16, 16, logit_scale=10.0),
    "imu": EncoderConfig("imu", 1024, 512, 6, 8, 4.0, 0.7, [6, 2000], 6, 8, 8, head_dropout=0.5, logit_scale=5.0),
}


def tiny_config(modality: str, embed_dim: int, **overrides) -> EncoderConfig:
    """ImageBind's per-modality layout at demo size (width 128, 4 layers, 4 heads): audio 64 mel bins x 100
    frames (1 s clips), depth / thermal 48 x 48 maps with 8 px patches, IMU 6 x 400 steps."""
    base = dataclasses.asdict(IMAGEBIND_HUGE[modality])
    base.update(embed_dim=embed_dim, width=128, layers=4, heads=4, drop_path=0.0)
    base.update({"audio": dict(input_size=[64, 100], patch_size=16, patch_stride=10),
                 "depth": dict(input_size=[48, 48], patch_size=8, patch_stride=8),
                 "thermal": dict(input_size=[48, 48], patch_size=8, patch_stride=8),
                 "imu": dict(input_size=[6, 400], patch_size=8, patch_stride=8)}[modality])
    base.update(overrides)
    return EncoderConfig(**base)


def encoder_config(modality: str, embed_dim: int, preset: str = "tiny", **overrides) -> EncoderConfig:
    """A preset ("tiny": `tiny_config`, "huge": `IMAGEBIND_HUGE`) with the towers' embed dim and overrides
    (any `EncoderConfig` field, e.g. width=256, layers=6, input_size=[128, 204])."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    if preset == "tiny":
        return tiny_config(modality, embed_dim, **overrides)
    if preset == "huge":
        return EncoderConfig(**{**dataclasses.asdict(IMAGEBIND_HUGE[modality]), "embed_dim": embed_dim, **overrides})
    raise ValueError(f"encoder preset {preset!r} is not one of tiny, huge")


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float, add_bias_kv: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ModalityEncoder(nn.Module):
    """Preprocessor -> trunk -> head -> postprocessor of one modality; `forward(x)` -> (B, embed_dim)
    L2-normalised. Input: audio (B, 1, n_mels, frames); depth / thermal (B, 1, H, W); imu (B, 6, steps);
    optionally with a clips dimension after B (embeddings averaged)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        if c.modality == "imu":
            self.stem = nn.Linear(c.input_size[0] * c.patch_size, c.width, bias=False)
        else:
            self.stem = nn.Conv2d(c.in_channels, c.width, kernel_size=c.patch_size, stride=c.patch_stride, bias=False)
        self.stem_norm = nn.LayerNorm(c.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.num_patches, c.width))
        self.pre_norm = nn.LayerNorm(c.width, eps=1e-6) if c.pre_transformer_ln else nn.Identity()
        rates = [c.drop_path * i / max(1, c.layers - 1) for i in range(c.layers)]
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio, r, c.add_bias_kv) for r in rates)
        self.head = nn.Sequential(nn.LayerNorm(c.width, eps=1e-6), SelectCls(), nn.Dropout(c.head_dropout),
                                  nn.Linear(c.width, c.embed_dim, bias=False))
        log_scale = torch.full((1,), math.log(c.logit_scale))
        if c.logit_scale_learnable:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def logit_scale(self) -> torch.Tensor:
        """0-d exp(log scale), clamped at `logit_scale_max` (gradient 0 beyond it when learnable)."""
        return self.log_logit_scale.exp().clamp(max=self.config.logit_scale_max).reshape(())

    @property
    def input_ndim(self) -> int:
        return 3 if self.config.modality == "imu" else 4

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> (B, patches, width) embeddings (before the cls token)."""
        c = self.config
        if c.modality == "imu":
            b, ch, t = x.shape
            windows = x.unfold(-1, c.patch_size, c.patch_size)  # (B, 6, n, k)
            return self.stem(windows.permute(0, 2, 1, 3).reshape(b, t // c.patch_size, ch * c.patch_size))
        return self.stem(x).flatten(2).transpose(1, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, embed_dim), not normalised."""
        c = self.config
        expected = [c.input_size[0], c.input_size[1]] if c.modality == "imu" else [c.in_channels, *c.input_size]
        if list(x.shape[1:]) != expected:
            raise ValueError(f"{c.modality} encoder expects (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        tokens = self.stem_norm(self.patchify(x))
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = self.pre_norm(tokens + self.pos_embed.to(tokens.dtype))
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.head(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == self.input_ndim + 1:  # (B, clips, ...): average the clips' normalised embeddings
            b, n = x.shape[:2]
            emb = F.normalize(self.features(x.flatten(0, 1)), dim=-1).reshape(b, n, -1).mean(1)
            return F.normalize(emb, dim=-1)
        return F.normalize(self.features(x), dim=-1)


class SelectCls(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


# ------------------------------------------------------------------------------------------ the bound model

def _embed_dim(clip_model: nn.Module) -> int:
    if getattr(clip_model, "text_projection", None) is not None:
        proj = clip_model.text_projection
        return proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
    return int(clip_model.visual.output_dim)


class ImageBindModel(nn.Module):
    """An open_clip CLIP model (its image and text towers) plus a ModuleDict of modality encoders.

    With `freeze_towers` (the default, as ImageBind): the towers' parameters have requires_grad False, the
    towers stay in eval mode whatever `train()` is called with (dropout and any norm statistics cannot move),
    and their features are computed under `torch.no_grad()`. Without it, the towers train too;
    `parameter_groups` gives them their own learning-rate scale."""

    def __init__(self, clip_model: nn.Module, encoders: dict[str, ModalityEncoder], freeze_towers: bool = True,
                 tower_config: dict | None = None):
        super().__init__()
        self.clip = clip_model
        self.encoders = nn.ModuleDict(encoders)
        self.freeze_towers = freeze_towers
        self.tower_config = tower_config  # {"model_cfg", "preprocess_cfg"} of open_clip, for export
        dim = _embed_dim(clip_model)
        for name, enc in self.encoders.items():
            if enc.config.modality != name:
                raise ValueError(f"encoder {name!r} is configured for modality {enc.config.modality!r}")
            if enc.config.embed_dim != dim:
                raise ValueError(f"{name} encoder embed_dim {enc.config.embed_dim} != the towers' embed dim {dim}")
        if freeze_towers:
            for p in self.clip.parameters():
                p.requires_grad_(False)
            self.clip.eval()

    def train(self, mode: bool = True) -> "ImageBindModel":
        super().train(mode)
        if self.freeze_towers:
            self.clip.eval()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:  # a rank with no pair of a modality (open_clip's towers reject an empty batch)
            empty = images.new_zeros((0, _embed_dim(self.clip)))
            if self.freeze_towers:
                return empty
            # trained towers: the same autograd path as on the ranks with pairs (their gathers' backward is a
            # collective) and a zero gradient for every tower parameter
            return empty + sum(p.sum() for p in self.clip.visual.parameters() if p.requires_grad) * 0.0
        if self.freeze_towers:
            with torch.no_grad():
                return self.clip.encode_image(images, normalize=True).detach()
        return self.clip.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.freeze_towers:
            with torch.no_grad():
                return self.clip.encode_text(tokens, normalize=normalize).detach()
        return self.clip.encode_text(tokens, normalize=normalize)

    def encode_modality(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        if modality not in self.encoders:
            raise KeyError(f"no {modality!r} encoder; this model has {', '.join(self.encoders) or 'none'}")
        return self.encoders[modality](inputs)

    def forward(self, images: torch.Tensor, modality: str, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"image_features", "modality_features" (both L2-normalised, (B, embed_dim)), "logit_scale" (0-d)}."""
        return {"image_features": self.encode_image(images),
                "modality_features": self.encode_modality(modality, inputs),
                "logit_scale": self.encoders[modality].logit_scale()}

    def parameter_groups(self, lr: float, weight_decay: float, tower_lr_scale: float = 0.1) -> list[dict]:
        """AdamW groups: encoders (decay / no decay) at `lr`; unfrozen towers at `lr * tower_lr_scale`
        (frozen towers are left out). Norms, biases, gains, cls / position tokens and logit scales get no
        weight decay. Each group carries "lr" and "lr_scale"."""
        groups: dict[tuple[float, bool], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            scale = tower_lr_scale if name.startswith("clip.") else 1.0
            no_decay = (p.ndim < 2 or name.endswith(".bias") or "norm" in name or "ln_" in name
                        or "logit_" in name or "cls_token" in name or "pos_embed" in name or "bias_k" in name
                        or "bias_v" in name or name.endswith("positional_embedding") or "class_embedding" in name)
            groups.setdefault((scale, no_decay), []).append(p)
        return [{"params": ps, "lr": lr * scale, "lr_scale": scale, "weight_decay": 0.0 if nd else weight_decay}
                for (scale, nd), ps in groups.items()]


# ------------------------------------------------------------------------------------------ building, I/O

def _open_clip_dir_config(path: Path) -> dict:
    return json.loads((path / "open_clip_config.json").read_text())


def build_imagebind(towers: str, encoders: dict[str, EncoderConfig], freeze_towers: bool = True):
    """(model, train_transform, eval_transform, tokenizer). `towers`: an open_clip directory (as written by
    `pipeline export`; with or without the 'local-dir:' prefix) whose weights are loaded, or an open_clip model
    name (e.g. 'clip-tiny', random weights; for tests)."""
    import open_clip

    from pipeline.models.clip import create_clip

    path = Path(towers.removeprefix("local-dir:"))
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        clip_model, train_tf, eval_tf = open_clip.create_model_and_transforms(f"local-dir:{path}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        cfg = _open_clip_dir_config(path)
        tower_config = {"model_cfg": cfg["model_cfg"], "preprocess_cfg": cfg.get("preprocess_cfg", {})}
    else:
        clip_model, train_tf, eval_tf, tokenizer = create_clip(towers)
        pp = clip_model.visual.preprocess_cfg
        tower_config = {"model_cfg": open_clip.get_model_config(towers),
                        "preprocess_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}}
    mods = {name: ModalityEncoder(cfg) for name, cfg in encoders.items()}
    return ImageBindModel(clip_model, mods, freeze_towers, tower_config), train_tf, eval_tf, tokenizer


def export_encoder(encoder: ModalityEncoder, out_dir: str | Path) -> Path:
    """Writes `out_dir/config.json` ({"format", "config": EncoderConfig fields}) and `out_dir/model.safetensors`
    (the encoder's state dict, fp32). Built aside and renamed when complete
    (pipeline/export_target.py)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with export_directory(out, ENCODER_FORMAT) as tmp:
        state = {k: v.detach().float().contiguous().cpu() for k, v in encoder.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"format": ENCODER_FORMAT, "version": 1,
                                                     "config": dataclasses.asdict(encoder.config)}, indent=2))
    return out


def load_encoder(path: str | Path) -> ModalityEncoder:
    """The encoder `export_encoder` wrote (strict load)."""
    from safetensors.torch import load_file

    p = Path(path)
    meta = json.loads((p / "config.json").read_text())
    if meta.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{p / 'config.json'} is not a {ENCODER_FORMAT} config")
    enc = ModalityEncoder(EncoderConfig.from_dict(meta["config"]))
    enc.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    return enc.eval()


def export_towers(model: ImageBindModel, out_dir: str | Path) -> Path:
    """The CLIP towers as an open_clip directory (open_clip_config.json + open_clip_model.safetensors)."""
    from safetensors.torch import save_file

    if not model.tower_config:
        raise ValueError("the model has no open_clip tower config (build it with build_imagebind)")
    out = Path(out_dir)
    state = {}
    for k, v in model.clip.state_dict().items():
        v = v.detach().float().contiguous().cpu()
        if k in ("logit_scale", "logit_bias") and v.numel() == 1:
            v = v.reshape(())  # undo promote_scalar_params: open_clip's own parameters are 0-d
        state[k] = v
    with export_directory(out, "open_clip") as tmp:
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(json.dumps(model.tower_config, indent=2))
    return out


def export_imagebind(model: ImageBindModel, out_dir: str | Path) -> Path:
    """out/imagebind.json + out/towers/ (open_clip directory) + out/<modality>/ per encoder."""
    out = Path(out_dir)
    with export_directory(out, MODEL_FORMAT) as tmp:
        export_towers(model, tmp / "towers")
        for name, enc in model.encoders.items():
            export_encoder(enc, tmp / name)
        (tmp / "imagebind.json").write_text(json.dumps({
            "format": MODEL_FORMAT, "version": 1, "towers": "towers", "freeze_towers": model.freeze_towers,
            "modalities": {name: name for name in model.encoders}}, indent=2))
    return out


def load_imagebind(path: str | Path, freeze_towers: bool | None = None):
    """(model, train_transform, eval_transform, tokenizer) from an `export_imagebind` directory."""
    p = Path(path)
    meta = json.loads((p / "imagebind.json").read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{p / 'imagebind.json'} is not a {MODEL_FORMAT} manifest")
    model, train_tf, eval_tf, tokenizer = build_imagebind(str(p / meta["towers"]), {},
                                                          meta["freeze_towers"] if freeze_towers is None else freeze_towers)
    for name, sub in meta["modalities"].items():
        enc = load_encoder(p / sub)
        if enc.config.embed_dim != _embed_dim(model.clip):
            raise ValueError(f"{name} encoder embed_dim {enc.config.embed_dim} != the towers' {_embed_dim(model.clip)}")
        model.encoders[name] = enc
    return model.eval(), train_tf, eval_tf, tokenizer
