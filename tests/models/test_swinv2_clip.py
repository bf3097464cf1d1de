"""SwinV2 as a CLIP image tower: open_clip's timm trunk swapped for ours (same state dict), trained by the
pipeline, exported, and reloaded by plain open_clip + timm (no code of ours) with equal embeddings."""
import json

import open_clip
import pytest
import timm
import torch

from conftest import REPO, run_pipeline, train_overrides
from pipeline.export import open_clip_export_kwargs
from pipeline.models.clip import clip_step_flops, create_clip, load_state_dict_reshaped
from pipeline.models.swinv2 import SwinTransformerV2
from test_swinv2 import randomize_

MODEL = "clip-swinv2-tiny"
CONFIG = REPO / "configs" / "demo" / "clip_swinv2_tiny.yaml"


def test_create_clip_swaps_the_timm_trunk_keeping_open_clips_state_dict():
    torch.manual_seed(0)
    ours, _, eval_tf, tokenizer = create_clip(MODEL, activation_checkpointing=True)
    trunk = ours.visual.trunk
    assert isinstance(trunk, SwinTransformerV2) and all(s.grad_checkpointing for s in trunk.layers)
    assert trunk.patch_embed.img_size == (64, 64) and trunk.num_classes == 0
    assert trunk.stage_windows()[0] == [((4, 4), (0, 0)), ((4, 4), (2, 2))]  # timm's window for 64 px
    randomize_(ours.visual)

    # plain open_clip builds timm's trunk; force_image_size resizes it as our tower was built
    plain, _, _ = open_clip.create_model_and_transforms(MODEL, force_image_size=64)
    assert type(plain.visual.trunk).__module__.startswith("timm.")
    assert list(plain.state_dict()) == list(ours.state_dict())
    plain.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), plain.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours.encode_image(x), plain.encode_image(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert a.abs().max() > 0.1
    from pipeline.train.flops import forward_flops

    assert clip_step_flops(ours) > 3 * forward_flops(trunk, torch.empty(1, 3, 64, 64, device="meta")) > 1e8


def _check_export(run, export, val, step):
    """Plain open_clip loads the export (with the force_image_size the export records) and gives the embeddings
    of our model with the checkpoint's weights; the image trunk alone loads in plain timm."""
    from pipeline.data.eval_loader import iterate_eval_samples
    from pipeline.data.loader import ShardSet, expand_shards

    kwargs = open_clip_export_kwargs(export)
    assert kwargs == {"force_image_size": 64}
    model, _, eval_tf = open_clip.create_model_and_transforms(f"local-dir:{export}", **kwargs)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    assert type(model.visual.trunk).__module__.startswith("timm.")

    ours, _, our_tf, our_tok = create_clip(MODEL)
    module = torch.load(run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    load_state_dict_reshaped(ours, module)
    images, captions, _ = next(iterate_eval_samples(ShardSet(expand_shards(val)), eval_tf, 16))
    model.eval(), ours.eval()
    with torch.no_grad():
        exported = model.encode_image(images, normalize=True), model.encode_text(tokenizer(captions), normalize=True)
        expected = ours.encode_image(images, normalize=True), ours.encode_text(our_tok(captions), normalize=True)
    for a, b in zip(exported, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    trunk_dir = export / "timm_image_trunk"
    config = json.loads((trunk_dir / "config.json").read_text())
    assert config["architecture"] == "swinv2_tiny_window16_256" and config["num_classes"] == 0
    assert config["model_args"]["img_size"] == [64, 64]
    assert config["pretrained_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    trunk = timm.create_model(f"local-dir:{trunk_dir}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(trunk(images), ours.visual.trunk(images), rtol=0, atol=1e-6)


def test_one_rank_train_export_reload(demo_data, tmp_path):
    """The fast variant: 2 steps on 1 rank."""
    run = tmp_path / "run"
    run_pipeline("train", "--config", CONFIG, "--nproc-per-node", "1",
                 *train_overrides(demo_data, run, **{"train.steps": 2, "train.batch_size": 8, "train.ckpt_every": 0,
                                                     "train.warmup_steps": 1, "train.eval_at_end": "false"}))
    proc = run_pipeline("export", "--checkpoint", run, "--out", tmp_path / "export")
    assert "open_clip directory written" in proc.stdout
    _check_export(run, tmp_path / "export", demo_data["val"], 2)


@pytest.mark.slow
def test_two_rank_train_eval_export_reload(demo_data, tmp_path):
    """The demo config as configured (ZeRO-1, 2 ranks), 4 steps, evaluation at the end."""
    run = tmp_path / "run"
    run_pipeline("train", "--config", CONFIG, "--nproc-per-node", "2",
                 *train_overrides(demo_data, run, **{"train.steps": 4, "train.batch_size": 8, "train.ckpt_every": 2}))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(0 < r["loss"] < 10 for r in records)
    assert all(r["tflops_per_s"] > 0 for r in records)
    assert json.loads((run / "eval.json").read_text())["samples"] == 80
    run_pipeline("export", "--checkpoint", run, "--out", tmp_path / "export")
    _check_export(run, tmp_path / "export", demo_data["val"], 4)
