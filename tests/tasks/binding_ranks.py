"""Run under torchrun (any number of ranks dividing 8): one ImageBind step through a real DeepSpeed engine on a
fixed global batch of 8 samples whose modalities are disjoint; rank 0's slice carries no depth sample, and no
sample carries thermal. Prints `REPORT {json}`: the loss averaged over the ranks, the per-modality losses and
every encoder gradient as DeepSpeed reduced it (rank 0 writes them to OUT.pt).

    torchrun --nproc_per_node 2 tests/tasks/binding_ranks.py OUT.pt ZERO_STAGE
"""
import json
import sys

import torch
import torch.distributed as dist

from pipeline.config import RunConfig, resolve_batch
from pipeline.demo_data.multimodal import render_multimodal_sample
from pipeline.tasks.imagebind import ImageBindTask
from pipeline.train.distributed import close_process_group, init_process_group, read_dist_env
from pipeline.train.engine import build_engine, compute_dtype

# per sample of the global batch: the members it keeps (all carry jpg + txt)
CARRIES = ["wav", "wav", "wav", "wav",  # rank 0 of 2: audio only
           "depth.png", "wav depth.png", "depth.png", "wav"]


def global_samples() -> list[dict]:
    out = []
    for i, keep in enumerate(CARRIES):
        raw = {k: (v.encode() if isinstance(v, str) else v) for k, v in render_multimodal_sample(7, "train", i).items()}
        out.append({k: v for k, v in raw.items() if k in ("jpg", "txt", "cls") or k in keep.split()})
    return out


def main(out_path: str, zero_stage: int) -> None:
    from deepspeed.utils import safe_get_full_grad

    env = read_dist_env()
    init_process_group(env, "gloo")
    cfg = RunConfig(task="imagebind")
    cfg.imagebind.towers, cfg.imagebind.modalities = "clip-tiny", ["audio", "depth", "thermal"]
    cfg.train.global_batch_size, cfg.train.zero_stage, cfg.train.warmup_steps = len(CARRIES), zero_stage, 1
    resolve_batch(cfg, env.world_size)
    torch.manual_seed(0)
    task = ImageBindTask(cfg)
    engine, _, plain = build_engine(task.model, cfg, env.world_size, task.param_groups())

    per_rank = len(CARRIES) // env.world_size
    samples = []
    for i, raw in enumerate(global_samples()[env.rank * per_rank:(env.rank + 1) * per_rank]):
        torch.manual_seed(100 + env.rank * per_rank + i)  # the same crops and clips as in any other split
        samples.append(task.decoder.sample(raw))
    batch = task.decoder.collate(samples)

    loss, stats = task.loss(engine, task.decoder.to_device(batch, engine.device, compute_dtype(engine)))
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()
             if name.startswith("encoders.")}
    if plain is not None:
        plain.before_step()
    engine.step()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    report = {"world_size": env.world_size, "loss": mean_loss.item() / env.world_size,
              "local_depth": int(batch["depth_rows"].numel()) if "depth_rows" in batch else 0,
              **{k: float(v) for k, v in stats.items()}}
    if env.rank == 0:
        torch.save(grads, out_path)
        print("REPORT " + json.dumps(report), flush=True)
    close_process_group()  # as the verbs leave: a rank exiting with its gloo group alive can abort


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
