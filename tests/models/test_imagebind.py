import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.loader import BadSample
from pipeline.data.modalities import decode_depth, depth_to_disparity
from pipeline.data.modality_transforms import DepthTransform
from pipeline.models.imagebind import (IMAGEBIND_HUGE, MODALITIES, EncoderConfig, ModalityEncoder,
                                       build_imagebind, encoder_config, export_encoder, export_imagebind, load_encoder,
                                       load_imagebind, tiny_config)
from pipeline.objectives.clip_loss import clip_loss

EMBED = 128  # clip-tiny


def example_input(cfg: EncoderConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = cfg.input_size if cfg.modality == "imu" else [cfg.in_channels, *cfg.input_size]
    return torch.randn(batch, *shape, generator=g)


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return build_imagebind("clip-tiny", {m: tiny_config(m, EMBED) for m in MODALITIES})


def test_shapes_per_modality(built):
    model, _, eval_tf, tokenizer = built
    model.eval()
    images = torch.randn(2, 3, 48, 48)
    scales = {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}
    for m in MODALITIES:
        cfg = model.encoders[m].config
        out = model(images, m, example_input(cfg))
        assert out["image_features"].shape == out["modality_features"].shape == (2, EMBED)
        torch.testing.assert_close(out["modality_features"].norm(dim=-1), torch.ones(2))
        assert out["logit_scale"].shape == () and out["logit_scale"].item() == pytest.approx(scales[m])
        clips = torch.stack([example_input(cfg, seed=s) for s in range(3)], dim=1)  # (B, clips, ...)
        assert model.encode_modality(m, clips).shape == (2, EMBED)
        with pytest.raises(ValueError, match="expects"):
            model.encode_modality(m, example_input(cfg)[..., :-1])
    assert model.encoders["audio"].config.num_patches == 5 * 9
    assert IMAGEBIND_HUGE["audio"].grid == (12, 19) and IMAGEBIND_HUGE["imu"].num_patches == 250
    assert model.encode_text(tokenizer(["a red circle"])).shape == (1, EMBED)


def test_frozen_towers_bitwise_unchanged_after_training(built):
    model, _, _, _ = built
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    enc_before = {k: v.clone() for k, v in model.encoders["audio"].state_dict().items()}
    model.train()
    assert not model.clip.training and model.encoders["audio"].training
    assert all(not p.requires_grad for p in model.clip.parameters())
    # every parameter handed to the optimizer (frozen ones too): AdamW must skip those without gradients
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 48, 48, generator=g)
    audio = torch.randn(8, 1, 64, 100, generator=g)
    losses = []
    for _ in range(5):
        out = model(images, "audio", audio)
        assert not out["image_features"].requires_grad
        loss = clip_loss(out["image_features"], out["modality_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.clip.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, enc_before[k]) for k, v in model.encoders["audio"].state_dict().items())
    model.eval()


def test_unfrozen_towers_get_their_own_lr_scale():
    torch.manual_seed(0)
    model, _, _, _ = build_imagebind("clip-tiny", {"depth": tiny_config("depth", EMBED)}, freeze_towers=False)
    model.train()
    assert model.clip.training
    groups = model.parameter_groups(lr=1e-3, weight_decay=0.1, tower_lr_scale=0.1)
    tower_ids = {id(p) for p in model.clip.parameters()}
    grouped = [id(p) for grp in groups for p in grp["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    for grp in groups:
        in_tower = {id(p) in tower_ids for p in grp["params"]}
        assert len(in_tower) == 1
        assert grp["lr"] == pytest.approx(1e-4 if in_tower.pop() else 1e-3)
    decayed = {id(p) for grp in groups if grp["weight_decay"] > 0 for p in grp["params"]}
    enc = model.encoders["depth"]
    assert id(enc.pos_embed) not in decayed and id(enc.stem.weight) in decayed
    before = model.clip.visual.conv1.weight.clone()
    opt = torch.optim.AdamW(groups)
    out = model(torch.randn(4, 3, 48, 48), "depth", torch.randn(4, 1, 48, 48))
    clip_loss(out["image_features"], out["modality_features"], out["logit_scale"]).backward()
    opt.step()
    assert not torch.equal(before, model.clip.visual.conv1.weight)


def test_embed_dim_mismatch_is_refused():
    with pytest.raises(ValueError, match="embed_dim"):
        build_imagebind("clip-tiny", {"audio": tiny_config("audio", 64)})
    assert encoder_config("depth", 1024, "huge") == IMAGEBIND_HUGE["depth"]
    assert encoder_config("audio", 64, "tiny", layers=2).layers == 2
    with pytest.raises(ValueError, match="preset"):
        encoder_config("audio", 64, "giant")
    with pytest.raises(ValueError, match="unknown encoder config keys"):
        EncoderConfig.from_dict({"modality": "audio", "widht": 3})


def test_encoder_export_load_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = ModalityEncoder(tiny_config("imu", EMBED, logit_scale_learnable=True, logit_scale=7.0)).eval()
    with torch.no_grad():
        enc.log_logit_scale.fill_(2.5)
    x = example_input(enc.config)
    export_encoder(enc, tmp_path / "imu")
    assert sorted(p.name for p in (tmp_path / "imu").iterdir()) == [".pipeline-export", "config.json", "model.safetensors"]
    loaded = load_encoder(tmp_path / "imu")
    assert loaded.config == enc.config and isinstance(loaded.log_logit_scale, torch.nn.Parameter)
    assert torch.equal(loaded(x), enc(x)) and torch.equal(loaded.logit_scale(), enc.logit_scale())


def test_model_export_load_round_trip(built, tmp_path):
    import open_clip

    model, _, _, tokenizer = built
    model.eval()
    out = export_imagebind(model, tmp_path / "ib")
    assert {p.name for p in out.iterdir()} == {".pipeline-export", "imagebind.json", "towers", *MODALITIES}
    loaded, _, _, _ = load_imagebind(out)
    images, tokens = torch.randn(2, 3, 48, 48), tokenizer(["a red circle", "a blue star"])
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
    for m in MODALITIES:
        x = example_input(model.encoders[m].config)
        assert torch.equal(loaded.encode_modality(m, x), model.encode_modality(m, x))
    # the towers directory is plain open_clip
    towers, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'towers'}")
    towers.eval()
    torch.testing.assert_close(towers.encode_image(images, normalize=True), model.encode_image(images))


def test_real_stereo_depth_smoke(tmp_path):
    """Middlebury 'motorcycle' (scikit-image ships it, 1/4 resolution): ground-truth disparity -> metric depth
    as a 16-bit millimetre PNG -> decode_depth -> disparity -> the depth encoder."""
    skdata = pytest.importorskip("skimage.data")
    _, _, disp = skdata.stereo_motorcycle()
    focal, baseline_mm, doffs = 994.978, 193.001, 31.086  # calibration of the downsampled pair (its docstring)
    valid = np.isfinite(disp)
    assert 0.01 < 1 - valid.mean() < 0.5  # real data: some pixels have no ground truth
    depth_mm = np.where(valid, focal * baseline_mm / (np.where(valid, disp, 0) + doffs), 0)
    buf = io.BytesIO()
    Image.fromarray(np.round(depth_mm).astype(np.uint16)).save(buf, format="PNG")
    depth = decode_depth(buf.getvalue(), "depth.png")
    assert depth.value.shape == disp.shape and depth.conversions == ()
    assert (depth.value == 0).sum() == (~valid).sum()
    assert 1.5 < depth.value[valid].min() and depth.value[valid].max() < 5.5  # metres
    back = depth_to_disparity(depth.value, focal * baseline_mm / 1000).numpy() - doffs
    assert np.abs(back[valid] - disp[valid]).max() < 0.05  # pixels: only the 1 mm quantisation is lost
    raw_npy = io.BytesIO()
    depth_m = np.where(valid, focal * baseline_mm / 1000 / (np.where(valid, disp, 0) + doffs), np.inf)
    np.save(raw_npy, depth_m.astype(np.float32))
    with pytest.raises(BadSample, match="bad_depth"):  # inf where the ground truth is missing
        decode_depth(raw_npy.getvalue(), "depth.npy")
    filled = decode_depth(raw_npy.getvalue(), "depth.npy", nonfinite="missing")
    assert filled.conversions == ("depth_nonfinite_to_missing",) and (filled.value == 0).sum() == (~valid).sum()

    torch.manual_seed(0)
    enc = ModalityEncoder(tiny_config("depth", EMBED)).eval()
    x = DepthTransform(size=48, focal_baseline=focal * baseline_mm / 1000, train=False)(depth.value)
    assert x.shape == (1, 48, 48) and torch.isfinite(x).all() and (x != 0).float().mean() > 0.5
    emb = enc(x[None])
    assert emb.shape == (1, EMBED) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1))
