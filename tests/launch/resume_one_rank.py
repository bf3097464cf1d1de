"""Run as a script (one process, or under a launcher): load a checkpoint written by another number of ranks with
pipeline.train.checkpoint.load_checkpoint, check what was restored, train one more step; print a JSON report.

    python tests/launch/resume_one_rank.py CHECKPOINT_DIR
"""
import json
import sys
from pathlib import Path

import torch

from pipeline.config import load_config, resolve_batch
from pipeline.models.clip import create_clip, promote_scalar_params
from pipeline.objectives.clip_loss import clip_loss
from pipeline.train.checkpoint import checkpoint_meta, checkpoint_world_size, load_checkpoint
from pipeline.train.distributed import close_process_group, init_process_group, read_dist_env
from pipeline.train.engine import build_engine


def main(ckpt: Path) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # the writer's resolved config (same global batch on these ranks), with a longer schedule: the checkpoint is
    # the writer's last step, where the cosine schedule reaches lr 0
    cfg = load_config(ckpt / "config.yaml", [f"train.steps={2 * checkpoint_meta(ckpt)['step']}"])
    env = read_dist_env()
    init_process_group(env, "gloo")
    resolve_batch(cfg, env.world_size)
    torch.manual_seed(1234)  # other weights than the checkpoint's: loading must replace them all
    model, *_ = create_clip(cfg.model.name)
    promote_scalar_params(model)
    engine, _, _ = build_engine(model, cfg, env.world_size, checkpoint_zero_stage=checkpoint_meta(ckpt)["zero_stage"])
    state = load_checkpoint(engine, ckpt)

    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    param_diff, moments, universal = 0.0, [], ckpt / "universal" / "zero"
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        param_diff = max(param_diff, (full.reshape(reference[name].shape) - reference[name]).abs().max().item())
        for key in ("exp_avg", "exp_avg_sq"):
            m = safe_get_full_optimizer_state(p, key)
            saved = torch.load(universal / name / f"{key}.pt", weights_only=False)["param"]
            moments.append(((m.reshape(saved.shape) - saved).abs().max().item(), saved.abs().max().item()))
    opt_steps = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})

    # more optimizer steps on a random batch
    size, ctx = model.visual.image_size[0], 24
    g = torch.Generator().manual_seed(env.rank)
    images = torch.randn(cfg.train.batch_size, 3, size, size, generator=g)
    texts = torch.randint(1, 1000, (cfg.train.batch_size, ctx), generator=g)
    before = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    for _ in range(2):  # the first step runs at the checkpoint's lr (0 at the end of the writer's schedule)
        out = engine(images, texts)
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"], cfg.loss.logit_scale_max)
        engine.backward(loss)
        engine.step()
    changed = sum(int(not torch.equal(before[n], safe_get_full_fp32_param(p)))
                  for n, p in engine.module.named_parameters())
    report = {"rank": env.rank, "world_size": env.world_size, "saved_world_size": checkpoint_world_size(ckpt),
              "state_world_size": state["world_size"], "step": state["step"], "keys": sorted(state),
              "param_diff": param_diff, "moment_diff": max(d for d, _ in moments),
              "moment_max": max(m for _, m in moments), "optimizer_steps": opt_steps,
              "global_steps_after": engine.global_steps, "loss": loss.item(), "changed": changed,
              "params": len(before), "lr": engine.get_lr()[0]}
    close_process_group()  # as the verbs leave: a rank exiting with its gloo group alive can abort
    return report


if __name__ == "__main__":
    print("REPORT " + json.dumps(main(Path(sys.argv[1]))), flush=True)
