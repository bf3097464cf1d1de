"""model.pretrained: every accepted file / directory layout loads the same weights; hub names, tags, wrong
architectures and pickled objects are refused with one line; LiT locking and patch dropout on the model."""
import json

import pytest
import torch

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.models.clip import ModelNameError, check_model_name, create_clip, promote_scalar_params
from pipeline.models.pretrained import check_clip_pretrained, load_clip_pretrained, read_state_dict
from pipeline.tasks.contrastive import ContrastiveTask, lock_towers
from pipeline.train.engine import param_groups


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    model, *_ = create_clip("clip-tiny")
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fresh():
    torch.manual_seed(2)
    model, *_ = create_clip("clip-tiny")
    return model


def _assert_loaded(model, source):
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), k


def test_layouts_load_the_same_weights(source, tmp_path):
    from safetensors.torch import save_file

    files = {
        "plain.pt": source,
        "wrapped.pt": {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in source.items()}},
        "timm_style.pth": {"model": source},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file(source, str(tmp_path / "weights.safetensors"))
    oc_dir = tmp_path / "oc"
    oc_dir.mkdir()
    save_file(source, str(oc_dir / "open_clip_model.safetensors"))
    (oc_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    bin_dir = tmp_path / "hub_clone"
    bin_dir.mkdir()
    torch.save(source, bin_dir / "open_clip_pytorch_model.bin")
    for p in [*(tmp_path / n for n in files), tmp_path / "weights.safetensors", oc_dir, f"local-dir:{bin_dir}"]:
        model = _fresh()
        assert not torch.equal(model.state_dict()["text_projection"], source["text_projection"])
        load_clip_pretrained(model, "clip-tiny", str(p))
        _assert_loaded(model, source)
        check_clip_pretrained("clip-tiny", str(p))  # the pre-launch check on the meta device agrees


def test_promoted_scalars_and_siglip_bias(source, tmp_path):
    model = _fresh()
    promote_scalar_params(model)  # logit_scale (1,) as DeepSpeed sees it; the file has ()
    torch.save(source, tmp_path / "w.pt")
    load_clip_pretrained(model, "clip-tiny", str(tmp_path / "w.pt"))
    assert model.logit_scale.shape == (1,) and torch.equal(model.logit_scale.reshape(()), source["logit_scale"])
    with pytest.raises(ConfigError, match=r"1 missing \(e.g. logit_bias\)"):  # a CLIP file into a SigLIP model
        check_clip_pretrained("clip-tiny", str(tmp_path / "w.pt"), loss_name="siglip")


def test_architecture_mismatch_is_one_line(source, tmp_path):
    torch.save(source, tmp_path / "w.pt")
    with pytest.raises(ConfigError) as e:
        check_clip_pretrained("ViT-B-32", str(tmp_path / "w.pt"))
    msg = str(e.value)
    assert "\n" not in msg and "does not fit model.name=ViT-B-32" in msg and "shape differs" in msg
    partial = {k: v for k, v in source.items() if k != "visual.proj"}
    partial["extra.weight"] = torch.zeros(2)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=r"1 missing \(e.g. visual.proj\); 1 unexpected \(e.g. extra.weight\)"):
        load_clip_pretrained(_fresh(), "clip-tiny", str(tmp_path / "partial.pt"))


@pytest.mark.parametrize("value, match", [
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "names a remote model; nothing downloads"),
    ("https://example.com/w.pt", "names a remote model"),
    ("laion2b_s34b_b79k", "open_clip pretrained tag would download"),
    ("/nonexistent/w.pt", "not found"),
])
def test_nothing_downloads(value, match):
    with pytest.raises(ConfigError, match=match) as e:
        read_state_dict(value)
    assert "local-dir" in str(e.value) or "not found" in str(e.value) or "--local-dir" in str(e.value)


def test_model_name_routes_to_pretrained(tmp_path):
    with pytest.raises(ModelNameError, match="fetch the repository once .* model.pretrained=DIR"):
        check_model_name("hf-hub:timm/ViT-B-16-SigLIP")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"pipeline": {"model_name": "clip-tiny"}}))
    with pytest.raises(ModelNameError, match=rf"e.g. clip-tiny\) and set model.pretrained={tmp_path}"):
        check_model_name(f"local-dir:{tmp_path}")


def test_weights_only_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="holds pickled Python objects besides tensors .*open.*never unpickled"):
        read_state_dict(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "openai_style.pt")
    with pytest.raises(ConfigError, match="is a TorchScript archive .* convert it once"):
        read_state_dict(str(tmp_path / "openai_style.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read .* as a weights file"):
        read_state_dict(str(tmp_path / "junk.pt"))


def test_config_keys(tmp_path):
    cfg = load_config(None, ["model.init_from=/x"])
    assert cfg.model.pretrained == "/x" and cfg.model.init_from == ""  # the old name is an alias
    for overrides, match in [
        (["model.init_from=/x", "model.pretrained=/y"], "disagree"),
        (["model.lock_image_unlocked_groups=1"], "need model.lock_image=true"),
        (["model.lock_text_unlocked_layers=1"], "needs model.lock_text=true"),
        (["model.patch_dropout=1.0"], r"must be in \[0, 1\)"),
        (["task=supervised", "model.name=demo_vit", "model.lock_image=true"], "apply to task=clip only"),
        (["train.ema_decay=1"], r"must be in \[0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)
    cfg = load_config(None, ["model.name=clip-swinv2-tiny", "model.patch_dropout=0.5"])
    with pytest.raises(ConfigError, match="open_clip's own ViT image towers"):
        ContrastiveTask.check(cfg)
    cfg = load_config(None, ["model.name=ViT-B-32", f"model.pretrained={tmp_path}"])
    with pytest.raises(ConfigError, match="directory with no weights"):
        ContrastiveTask.check(cfg)


def test_lock_towers_leave_frozen_parts_out_of_the_optimizer():
    model = _fresh()
    cfg = RunConfig()
    cfg.model.lock_image = True
    lock_towers(model, cfg)
    promote_scalar_params(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and not any(n.startswith("visual.") for n in trained) and "logit_scale" in trained
    in_optimizer = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trained}

    model = _fresh()
    cfg.model.lock_image_unlocked_groups = 2  # open_clip's groups: ..., [last block, ln_post], proj
    cfg.model.lock_text, cfg.model.lock_text_unlocked_layers = True, 1  # ..., [text_projection]
    lock_towers(model, cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias", "text_projection",
                       "logit_scale", *(n for n, _ in model.named_parameters() if n.startswith("visual.transformer.resblocks.3."))}


def test_patch_dropout_drops_patches_in_training_only():
    torch.manual_seed(0)
    model, *_ = create_clip("clip-tiny", patch_dropout=0.5)
    tokens = []
    model.visual.transformer.register_forward_hook(lambda m, args, out: tokens.append(args[0].shape[1]))
    images = torch.randn(2, 3, 48, 48)
    model.train()
    model.encode_image(images)
    model.eval()
    model.encode_image(images)
    assert tokens == [1 + 18, 1 + 36]  # 6 x 6 patches of 8 px: half kept in training, plus the class token


def test_backbone_pretrained_from_timm_files(tmp_path):
    """Same key for backbones: a timm checkpoint file or directory initialises the ViT; another architecture is
    one ConfigError line."""
    from safetensors.torch import save_file

    from pipeline.models.backbone import create_backbone
    from pipeline.tasks.backbone import _init_weights

    torch.manual_seed(3)
    source = create_backbone("demo_vit").state_dict()
    timm_dir = tmp_path / "timm_dir"
    timm_dir.mkdir()
    save_file(source, str(timm_dir / "model.safetensors"))
    (timm_dir / "config.json").write_text("{}")
    torch.save({"state_dict": source}, tmp_path / "vit.pth")
    for path in (timm_dir, tmp_path / "vit.pth"):
        torch.manual_seed(4)
        model = create_backbone("demo_vit")
        _init_weights(model, str(path))
        _assert_loaded(model, source)
    with pytest.raises(ConfigError, match="pretrained weights do not fit the backbone") as e:
        _init_weights(create_backbone("demo_vit", depth=2), str(tmp_path / "vit.pth"))
    assert "\n" not in str(e.value) and str(e.value).startswith("model.pretrained=")


def test_cli_refuses_a_wrong_architecture_before_launching(demo_data, source, tmp_path):
    from conftest import DEMO_CONFIG, run_pipeline, train_overrides

    torch.save({"state_dict": source}, tmp_path / "tiny.pt")
    proc = run_pipeline("train", "--config", DEMO_CONFIG, "--nproc-per-node", "2",
                        *train_overrides(demo_data, tmp_path / "run", **{"model.name": "ViT-B-32",
                                                                          "model.pretrained": tmp_path / "tiny.pt"}),
                        check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model.pretrained={tmp_path / 'tiny.pt'} does not fit "
                                                   f"model.name=ViT-B-32: "), proc.stderr
    assert "torch.distributed" not in proc.stderr and not (tmp_path / "run").exists()
