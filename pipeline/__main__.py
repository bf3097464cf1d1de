"""`python -m pipeline <verb>`: train, eval, export, demo. Each verb validates its inputs before doing work
and exits non-zero with a one-line reason."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class UserError(Exception):
    """Shown as a single line; exit code 2."""


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" and friends
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Starts `nproc` ranks of `python -m pipeline <argv>` under torchrun on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline", *argv]
    import torch

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's accelerator probing and its warning
    return subprocess.call(cmd, env=env)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train.distributed import read_dist_env
    from pipeline.train.loop import run_training, validate_run

    cfg = load_config(args.config, args.overrides)
    env = read_dist_env()
    if not env.launched and args.nproc_per_node > 1:
        validate_run(cfg, args.nproc_per_node)  # fail here, before any process starts
        return _torchrun(args.nproc_per_node, ["train", "--config", args.config, *args.overrides])
    run_training(cfg, env)
    return 0


def _load_for_eval(path: str):
    """(model, eval_transform, tokenizer) from an open_clip directory, a checkpoint or a run directory."""
    import open_clip

    from pipeline.export import load_model_from_checkpoint

    p = Path(path)
    if (p / "open_clip_config.json").is_file():
        model, _, eval_tf = open_clip.create_model_and_transforms(f"local-dir:{p}")
        return model, eval_tf, open_clip.get_tokenizer(f"local-dir:{p}")
    model, _, eval_tf, tokenizer, _ = load_model_from_checkpoint(_checkpoint(path))
    return model, eval_tf, tokenizer


def _checkpoint(path: str) -> Path:
    from pipeline.train.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from pipeline.data.loader import expand_shards
    from pipeline.eval.zero_shot import evaluate, format_results

    expand_shards(args.val, "--val")
    if args.classes and not Path(args.classes).is_file():
        raise UserError(f"--classes: file not found: {args.classes}")
    model, eval_tf, tokenizer = _load_for_eval(args.model)
    results = evaluate(model, eval_tf, tokenizer, args.val, args.classes, args.batch_size)
    print(format_results(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export_open_clip

    out = export_open_clip(_checkpoint(args.checkpoint), args.out)
    print(f"open_clip directory written: {out} (load with open_clip.create_model_and_transforms('local-dir:{out}'))")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    if not Path(args.config).is_file():
        raise UserError(f"--config: file not found: {args.config}")
    run_demo(Path(args.out), Path(args.config), steps=args.steps, nproc=args.nproc_per_node,
             train_samples=args.train_samples)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser("train", help="train a model from a YAML config (run under torchrun, srun, or with "
                                     "--nproc-per-node)", description="Train from a YAML config. Overrides are "
                       "dotted key=value pairs, e.g. train.steps=100 model.name=ViT-B-16.")
    t.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo/clip_tiny.yaml")
    t.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1,
                   help="when not started by a launcher: start this many local ranks with torchrun")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="zero-shot classification and retrieval recall@k on held-out shards")
    e.add_argument("--model", required=True, help="open_clip export dir, checkpoint dir or run dir")
    e.add_argument("--val", required=True, help="held-out shard pattern (braceexpand)")
    e.add_argument("--classes", default="", help="classes.json for zero-shot ({'classes': [...], 'templates': [...]})")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--out", default="", help="also write the results as JSON here")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="checkpoint (any ZeRO stage) -> open_clip directory")
    x.add_argument("--checkpoint", required=True, help="checkpoint dir (step_XXXXXXXX) or run dir (its newest)")
    x.add_argument("--out", required=True, help="output directory (replaced atomically)")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="generate the demo data, train CLIP on 2 ranks, evaluate, export")
    d.add_argument("--out", default="runs/demo", help="where data, checkpoints, metrics and export go")
    d.add_argument("--config", default=str(REPO / "configs" / "demo" / "clip_tiny.yaml"),
                   help="the run config (e.g. configs/siglip/tiny_demo.yaml for the sigmoid loss)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    d.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=2, help="ranks to train with")
    d.add_argument("--train-samples", type=int, default=20000, help="size of the generated training split")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from pipeline.config import ConfigError
    from pipeline.data.loader import DataError
    from pipeline.models.clip import ModelNameError

    try:
        return args.func(args)
    except (UserError, ConfigError, DataError, ModelNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
