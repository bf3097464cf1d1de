"""Run as a script (one process, or under torchrun): one optimizer step of the contrastive task with
train.grad_accum micro-batches through a real DeepSpeed engine, the way the training loop does it
(pipeline.tasks.step_losses -> engine.backward -> engine.step); saves the step's loss (mean over micro-batches
and ranks), the full gradient of every parameter at the accumulation boundary and the engine's step counters.

    python tests/train/accumulation_step.py OUT.pt key=value ...   (config overrides, e.g. loss.name=siglip)

The samples are a function of their global position (`step_samples`), so a single-process reference can
rebuild the whole step's batch.
"""
import sys

import torch
import torch.distributed as dist

from pipeline.config import load_config, resolve_batch
from pipeline.tasks import step_losses
from pipeline.tasks.registry import build_task
from pipeline.train.distributed import init_process_group, read_dist_env
from pipeline.train.engine import build_engine, compute_dtype

BASE = ["model.name=clip-tiny", "train.precision=fp32", "train.grad_clip=0", "train.steps=10",
        "train.warmup_steps=1"]


def step_samples(first: int, n: int, image_size: int, context: int) -> dict:
    """Samples first .. first + n - 1 of the step: uint8 images as the loader gives them, token ids with an
    end-of-text token (the largest id, where open_clip pools) at a varying position."""
    images, texts = [], []
    for i in range(first, first + n):
        g = torch.Generator().manual_seed(1000 + i)
        images.append(torch.randint(0, 256, (3, image_size, image_size), generator=g, dtype=torch.uint8))
        t = torch.zeros(context, dtype=torch.long)
        length = 3 + i % (context - 4)
        t[0], t[1:length] = 49406, torch.randint(1, 49000, (length - 1,), generator=g)
        t[length] = 49407
        texts.append(t)
    return {"images": torch.stack(images), "texts": torch.stack(texts)}


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config(None, BASE + overrides)
    env = read_dist_env()
    init_process_group(env, "gloo")
    resolve_batch(cfg, env.world_size)
    torch.manual_seed(cfg.train.seed)  # as the loop: the same initial weights on every rank
    task = build_task(cfg)
    engine, _, plain = build_engine(task.model, cfg, env.world_size, task.param_groups())
    b, accum = cfg.train.batch_size, cfg.train.grad_accum
    model = engine.module
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    context = task.tokenizer.context_length
    # this rank's micro-batch j holds samples (rank * accum + j) * b ..: the whole step is samples 0 .. global - 1
    batches = [step_samples((env.rank * accum + j) * b, b, size, context) for j in range(accum)]

    from deepspeed.utils import safe_get_full_grad

    losses, grads = [], None
    on_device = (task.decoder.to_device(b, engine.device, compute_dtype(engine)) for b in batches)  # as the loop
    for loss, _ in step_losses(task, engine, on_device, engine.device):
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            grads = {name: safe_get_full_grad(p).detach().clone() for name, p in model.named_parameters()}
            if plain is not None:
                plain.before_step()
        engine.step()
        losses.append(loss.detach())
    mean_loss = torch.stack(losses).mean()
    if dist.get_world_size() > 1:
        dist.all_reduce(mean_loss)
    mean_loss /= dist.get_world_size()
    if env.rank == 0:
        torch.save({"loss": mean_loss, "grads": grads, "micro_losses": torch.stack(losses),
                    "global_steps": engine.global_steps, "micro_steps": engine.micro_steps}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
