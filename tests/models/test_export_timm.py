"""export_timm: state dict + timm name + kwargs -> config.json + model.safetensors that timm alone loads."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from pipeline.export_timm import export_timm
from pipeline.models.swinv2 import create_swinv2
from test_swinv2 import randomize_

NAME = "swinv2_tiny_window8_256"
ATOL = 1e-5


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    return randomize_(create_swinv2(NAME, img_size=64, num_classes=10)).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_with_head_loads_in_timm_three_ways(ours, x, tmp_path):
    out = export_timm(ours, tmp_path / "t", NAME, ours.model_args)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == NAME and config["num_classes"] == 10 and config["num_features"] == 768
    assert config["model_args"] == {"img_size": 64, "num_classes": 10}
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 64, 64] and pcfg["num_classes"] == 10
    assert pcfg["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN) and pcfg["std"] == list(timm.data.IMAGENET_DEFAULT_STD)
    assert not (tmp_path / "t.partial").exists()
    with torch.no_grad():
        expected = ours(x)
        # 1. timm's local-dir source (config.json's model_args)
        m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert type(m).__module__.startswith("timm.") and m.pretrained_cfg["input_size"] == (3, 64, 64)
        torch.testing.assert_close(m(x), expected, rtol=0, atol=ATOL)
        # 2. the file as a pretrained_cfg overlay (num_classes differs from the architecture's 1000: say so)
        m = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                                                 num_classes=10),
                              **config["model_args"]).eval()
        torch.testing.assert_close(m(x), expected, rtol=0, atol=ATOL)
        # 3. a strict load_state_dict
        m = timm.create_model(NAME, pretrained=False, **config["model_args"]).eval()
        m.load_state_dict(load_file(out / "model.safetensors"), strict=True)
        torch.testing.assert_close(m(x), expected, rtol=0, atol=ATOL)


def test_state_dict_input_and_plain_file_overlay(ours, x, tmp_path):
    """From a bare state dict; the architecture's own head size, so the overlay needs only the file."""
    torch.manual_seed(0)
    model = randomize_(create_swinv2(NAME, img_size=64)).eval()  # 1000 classes
    out = export_timm(model.state_dict(), tmp_path / "t", NAME, {"img_size": 64})
    m = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                          img_size=64).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x), rtol=0, atol=ATOL)


def test_without_head(ours, x, tmp_path):
    out = export_timm(ours, tmp_path / "t", NAME, ours.model_args, with_head=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["model_args"]["num_classes"] == 0
    state = load_file(out / "model.safetensors")
    assert not any(k.startswith("head.") for k in state)
    m = timm.create_model(NAME, pretrained=False, **config["model_args"]).eval()
    m.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   rtol=0, atol=ATOL)
        m2 = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    assert ours.num_classes == 10 and "head.fc.weight" in ours.state_dict()  # the model itself is untouched


def test_mismatch_is_refused_before_writing(ours, tmp_path):
    with pytest.raises(ValueError, match="unexpected"):
        export_timm(ours, tmp_path / "t", NAME, {"img_size": 64, "depths": (2, 2, 2, 2)})
    with pytest.raises(ValueError, match="shapes differ"):
        export_timm(ours, tmp_path / "t", NAME, {"img_size": 64, "num_classes": 11})
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()


def test_model_agnostic_vit(tmp_path):
    """Nothing SwinV2-specific: a timm ViT's own state dict round-trips the same way."""
    kwargs = {"img_size": 32, "depth": 2, "num_classes": 5}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    out = export_timm(vit, tmp_path / "vit", "vit_tiny_patch16_224", kwargs)
    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), vit(x), rtol=0, atol=0)
