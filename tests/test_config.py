import pytest
import yaml

from conftest import DEMO_CONFIG, run_pipeline, train_overrides
from pipeline.config import ConfigError, load_config, resolve_batch


def test_demo_config_loads_with_typed_overrides():
    cfg = load_config(DEMO_CONFIG, ["train.lr=1e-3", "train.steps=7", "train.zero_stage=3", "train.betas=[0.8,0.9]"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.train.zero_stage == 3 and cfg.train.betas == [0.8, 0.9]


@pytest.mark.parametrize("override, fragment", [
    ("train.stepz=5", "unknown key 'train.stepz' (did you mean train.steps?); valid keys: train.out_dir"),
    ("trian.steps=5", "unknown key 'trian'"),
    ("train.steps=many", "train.steps='many' has the wrong type; expected int"),
    ("train.zero_stage=4", "train.zero_stage=4 is not valid; choose one of 0, 1, 2, 3"),
    ("train.precision=fp8", "choose one of auto, fp32, bf16, fp16"),
    ("train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("train.betas=[0.9]", "train.betas=[0.9] must be two numbers"),
    ("steps", "override 'steps' must look like key=value"),
    ("loss.siglip_init_scale=0", "loss.siglip_init_scale=0.0 must be > 0"),
    ("loss.siglip_bias_lr_scale=-1", "loss.siglip_bias_lr_scale=-1.0 must be > 0"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_CONFIG, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_global_batch_must_divide_across_ranks():
    cfg = load_config(None, ["train.global_batch_size=100", "train.grad_accum=2"])
    resolve_batch(cfg, world_size=2)
    assert cfg.train.batch_size == 25
    cfg = load_config(None, ["train.global_batch_size=100"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size=100 is not divisible across ranks: "
                                          r"world_size \(3\)"):
        resolve_batch(cfg, world_size=3)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"nme": "clip-tiny"}}))
    with pytest.raises(ConfigError, match="unknown key 'model.nme' .*valid keys: model.name"):
        load_config(p)


@pytest.mark.parametrize("extra, fragment", [
    ({"train.zero_stag": 1}, "error: unknown key 'train.zero_stag'"),
    ({"train.global_batch_size": 33}, "error: train.global_batch_size=33 is not divisible across ranks"),
    ({"data.train": "/nonexistent/shard-{000..003}.tar"}, "error: data.train: 4 of 4 shards not found"),
    ({"model.name": "ViT-B-61"}, "error: model.name='ViT-B-61' is not an open_clip model config; close matches"),
    ({"train.precision": "bf16"}, "error: train.precision=bf16 needs a GPU"),
])
def test_cli_rejects_bad_config_before_launching(demo_data, tmp_path, extra, fragment):
    proc = run_pipeline("train", "--config", DEMO_CONFIG, "--nproc-per-node", "2",
                        *train_overrides(demo_data, tmp_path / "run", **extra), check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(fragment), proc.stderr
    assert "torch.distributed" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", sorted((DEMO_CONFIG.parents[1]).glob("*/*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_names_a_real_model(path):
    from pipeline.models.backbone import resolve_backbone
    from pipeline.models.clip import check_model_name
    from pipeline.models.imagebind import MODALITIES

    cfg = load_config(path)
    if cfg.task in ("supervised", "simmim"):
        resolve_backbone(cfg.model.name, **cfg.model.kwargs)
    elif cfg.task == "imagebind":  # its towers are another run's export
        assert cfg.imagebind.modalities and set(cfg.imagebind.modalities) <= set(MODALITIES)
    else:
        check_model_name(cfg.model.name)
    resolve_batch(cfg, world_size=8)
    assert cfg.train.global_batch_size == cfg.train.batch_size * 8 * cfg.train.grad_accum
