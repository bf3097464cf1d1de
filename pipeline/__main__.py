"""`python -m pipeline <verb>`: train, eval, export, demo. Each verb validates its inputs before doing work
and exits non-zero with a one-line reason."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.launcher import launch_torchrun

REPO = Path(__file__).resolve().parents[1]


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" and friends
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train.distributed import read_dist_env
    from pipeline.train.loop import PREEMPTED_MARKER, run_training, validate_run
    from pipeline.train.preemption import PREEMPTION_EXIT_CODE

    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be >= 1, not {args.nproc_per_node}")
    cfg = load_config(args.config, args.overrides)
    env = read_dist_env()
    if not env.launched and args.nproc_per_node > 1:
        validate_run(cfg, args.nproc_per_node, check_resume_files=True)  # fail here, before any process starts
        rc = launch_torchrun(args.nproc_per_node, ["train", "--config", args.config, *args.overrides])
        if rc and (Path(cfg.train.out_dir) / PREEMPTED_MARKER).is_file():
            return PREEMPTION_EXIT_CODE  # torchrun reports any worker exit as 1; the ranks exited 75
        return rc
    run_training(cfg, env)
    return 0


def _checkpoint(path: str) -> Path:
    from pipeline.train.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    """An open_clip directory: zero-shot and retrieval on --val. A checkpoint or run directory: the evaluation of
    the task its config names, on --val or else the run's own data.val."""
    import json

    import torch

    from pipeline.data.loader import expand_shards
    from pipeline.eval.class_prompts import load_class_prompts
    from pipeline.train.distributed import init_process_group, read_dist_env

    if args.val:
        expand_shards(args.val, "--val")
    if args.classes:
        load_class_prompts(args.classes, "--classes")
    if ((args.batch_size is not None and args.batch_size <= 0) or (args.workers is not None and args.workers < 0)
            or args.nproc_per_node <= 0):
        raise UserError("--batch-size and --nproc-per-node must be > 0, --workers >= 0")
    env = read_dist_env()
    open_clip_dir = (Path(args.model) / "open_clip_config.json").is_file()
    if open_clip_dir:
        if not args.val:
            raise UserError(f"--val: {args.model} is an open_clip directory, which names no held-out data; give "
                            f"the shards to evaluate on")
        task_cls = cfg = ckpt = None
    else:
        from pipeline.config import load_config
        from pipeline.tasks.registry import checkpoint_task

        ckpt = _checkpoint(args.model)
        task_cls = checkpoint_task(ckpt)
        cfg = load_config(ckpt / "config.yaml", _eval_overrides(args))
        missing = [key for key in task_cls.eval_data_keys if not _config_value(cfg, key)]
        if missing:
            raise UserError(f"{ckpt}: its config (task={cfg.task}) has no {' / '.join(missing)} to evaluate on; "
                            f"give --val SHARDS or set {missing[0]} in {ckpt / 'config.yaml'}")
        if (args.nproc_per_node > 1 or env.world_size > 1) and not task_cls.evaluates_on_all_ranks:
            raise UserError(f"--nproc-per-node: task={cfg.task} evaluates in one process; run it without "
                            f"--nproc-per-node or a launcher")
    if not env.launched and args.nproc_per_node > 1:
        return launch_torchrun(args.nproc_per_node, ["eval", "--model", args.model, *_eval_options(args)])
    use_cuda = torch.cuda.is_available()
    if env.launched:
        if use_cuda:
            torch.cuda.set_device(env.local_rank)
        init_process_group(env, "nccl" if use_cuda else "gloo")
    if open_clip_dir:
        results = _evaluate_open_clip_dir(Path(args.model), args, use_cuda)
        if env.rank == 0:
            from pipeline.eval.zero_shot import format_results

            print(format_results(results), flush=True)
    else:
        task = task_cls.from_checkpoint(ckpt, cfg=cfg)
        model = task.model.cuda() if use_cuda else task.model
        results = task.evaluate(model)  # prints the task's own summary line(s) on rank 0
    if env.rank == 0 and args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    """The eval verb's options as overrides of the checkpoint's config: --val replaces the run's held-out data
    (and its classes with --classes, none when not given), --batch-size / --workers its eval settings."""
    overrides = []
    if args.val:
        overrides += [f"data.val={args.val}", f"data.classes={args.classes or ''}"]
    elif args.classes:
        overrides.append(f"data.classes={args.classes}")
    if args.batch_size is not None:
        overrides.append(f"eval.batch_size={args.batch_size}")
    if args.workers is not None:
        overrides.append(f"data.workers={args.workers}")
    return overrides


def _eval_options(args: argparse.Namespace) -> list[str]:
    """The options each rank started by --nproc-per-node gets (the ones given here)."""
    given = {"--val": args.val, "--classes": args.classes, "--batch-size": args.batch_size,
             "--workers": args.workers, "--out": args.out}
    return [part for flag, value in given.items() if value not in (None, "") for part in (flag, str(value))]


def _config_value(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _evaluate_open_clip_dir(path: Path, args: argparse.Namespace, use_cuda: bool) -> dict:
    """Zero-shot classification and retrieval of an open_clip directory (an export of ours, or any other)."""
    import open_clip

    from pipeline.eval.zero_shot import evaluate
    from pipeline.export import open_clip_export_kwargs

    model, _, eval_tf = open_clip.create_model_and_transforms(f"local-dir:{path}", **open_clip_export_kwargs(path))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    if use_cuda:
        model.cuda()
    return evaluate(model, eval_tf, tokenizer, args.val, args.classes or "",
                    256 if args.batch_size is None else args.batch_size,
                    workers=2 if args.workers is None else args.workers, classes_key="--classes")


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export_target import ExportTargetError, check_export_target
    from pipeline.tasks.registry import checkpoint_task
    from pipeline.train.ema import EMA_FILE

    ckpt = _checkpoint(args.checkpoint)
    if args.ema and not (ckpt / EMA_FILE).is_file():
        raise UserError(f"--ema: {ckpt} holds no weight EMA (train with train.ema_decay > 0, e.g. 0.9998)")
    task_cls = checkpoint_task(ckpt)
    try:
        check_export_target(args.out, ckpt)  # before any work; checked again when the export is in place
        out = task_cls.export(ckpt, args.out, ema=args.ema)
    except ExportTargetError as e:
        raise UserError(f"--out: {e}") from None
    print(task_cls.export_written(out))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from pipeline.config import load_config
    from pipeline.plan import gpus_from_args, plan_run
    from pipeline.plan_report import format_plan

    from pipeline.tasks.registry import task_class

    cfg = load_config(args.config, args.overrides)
    gpus = gpus_from_args(args.gpus, args.nodes, args.gpus_per_node)
    plan = plan_run(cfg, gpus, gpu_mem_gb=args.gpu_mem_gb, mfu=args.mfu, peak_tflops=args.peak_tflops,
                    overhead_gb=args.overhead_gb, fused_attention=not args.unfused_attention,
                    model=task_class(cfg.task).plan_model(cfg))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.tasks.registry import task_class

    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be >= 1, not {args.nproc_per_node}")
    if not Path(args.config).is_file():
        raise UserError(f"--config: file not found: {args.config}")
    task_class(load_config(args.config).task).run_demo(Path(args.out), Path(args.config), steps=args.steps,
                                                       nproc=args.nproc_per_node, train_samples=args.train_samples)
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from pipeline.shard.images import ENCODE_FORMATS, ImageSettings
    from pipeline.shard.options import ShardOptions, parse_size
    from pipeline.shard.rows import Columns
    from pipeline.shard.run import format_summary, run_shard

    resize_mode = args.resize_mode or ("keep_ratio" if args.image_size else "none")
    if resize_mode != "none" and not args.image_size:
        raise UserError(f"--resize-mode {resize_mode} needs --image-size")
    if args.image_size is not None and args.image_size <= 0:
        raise UserError(f"--image-size must be > 0, not {args.image_size}")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100, not {args.quality}")
    if args.max_pixels <= 0:
        raise UserError(f"--max-pixels must be > 0, not {args.max_pixels}")
    encode = args.encode_format or ("jpg" if resize_mode != "none" else "keep")
    assert encode in ENCODE_FORMATS
    keep = None if args.keep_cols is None else [c for c in args.keep_cols.split(",") if c and c != "none"]
    try:
        opts = ShardOptions(
            inputs=args.input, output=args.output, input_format=args.format,
            columns=Columns(args.image_col, args.caption_col, args.key_col, args.label_col, args.audio_col,
                            args.depth_col, keep, args.thermal_col, args.imu_col),
            image_root=args.image_root, samples_per_shard=args.samples_per_shard,
            max_shard_bytes=parse_size(args.max_shard_bytes) if args.max_shard_bytes else None,
            prefix=args.prefix, workers=(os.cpu_count() or 1) if args.workers is None else args.workers,
            image=ImageSettings(args.image_size, resize_mode, not args.no_upscale, encode, args.quality,
                                not args.no_validate, args.max_pixels),
            max_caption_bytes=args.max_caption_bytes, dedup_image=args.dedup_image, val_fraction=args.val_fraction,
            max_failure_rate=args.max_failure_rate,
            overwrite=args.overwrite, progress=sys.stderr.isatty() if args.progress is None else args.progress)
        summary = run_shard(opts)
    except OSError as e:  # a full disk, a read-only output, an input gone mid-run: complete shards are kept
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"shard: {e.strerror or e}{where}; complete shards are kept: rerun the same command "
                        f"to continue") from None
    print(format_summary(summary))
    if summary["rows"] == 0:
        raise UserError(f"the inputs hold no rows: {', '.join(args.input)}")
    if summary["failure_rate"] > opts.max_failure_rate:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(summary["failures"].items(), key=lambda kv: -kv[1]))
        print(f"error: {summary['failed']} of {summary['rows']} rows failed ({summary['failure_rate']:.1%} > "
              f"--max-failure-rate {opts.max_failure_rate:g}): {reasons}; see {Path(args.output) / 'failures.parquet'}",
              file=sys.stderr)
        return 1
    return 0


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad command-line input is one `error:` line and exit code 2, for every verb (subparsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog.removeprefix('python -m pipeline ')}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m pipeline", description=__doc__)
    # `deepspeed --module pipeline train ...` runs `python -m pipeline --local_rank=N train ...`: accepted and
    # ignored (LOCAL_RANK in the environment says the same and is what is read)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser("train", help="train a model from a YAML config (run under torchrun, srun, or with "
                                     "--nproc-per-node)", description="Train from a YAML config. Overrides are "
                       "dotted key=value pairs, e.g. train.steps=100 model.name=ViT-B-16.")
    t.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo/clip_tiny.yaml")
    t.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1,
                   help="when not started by a launcher: start this many local ranks with torchrun")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # as above,
    # where a launcher appends it after the verb's arguments
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    t.set_defaults(func=cmd_train)

    from pipeline.train.device_peak import PLAN_DEVICE, PLAN_PEAK_TFLOPS  # no torch: a plain table

    pl = sub.add_parser("plan", help="memory per GPU at ZeRO 0-3 and step time of a config on N GPUs (no GPU needed)",
                        description="Estimate, per GPU: parameters, gradients and AdamW states at ZeRO 0-3, "
                        "activations with and without activation checkpointing at the config's batch, FLOPs per "
                        "sample and the step time at a given MFU. The formulas are in pipeline/plan.py.")
    pl.add_argument("--config", required=True, help="YAML run config, e.g. configs/clip/vit_h14.yaml")
    pl.add_argument("--gpus", type=int, default=None, help="data-parallel ranks (GPUs) in all")
    pl.add_argument("--nodes", type=int, default=None, help="nodes (instead of --gpus; with --gpus-per-node)")
    pl.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node with --nodes (default 8)")
    pl.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time (default 0.4)")
    pl.add_argument("--peak-tflops", type=float, default=PLAN_PEAK_TFLOPS,
                    help=f"peak dense TFLOP/s per GPU at the run's precision (default {PLAN_PEAK_TFLOPS:g}: the "
                    f"{PLAN_DEVICE}'s bf16 datasheet figure, pipeline.train.device_peak.DEVICE_PEAK_TFLOPS)")
    pl.add_argument("--overhead-gb", type=float, default=4.0,
                    help="fixed GiB per GPU for CUDA context, communication buffers and fragmentation (default 4)")
    pl.add_argument("--unfused-attention", action="store_true",
                    help="count the attention probabilities (s^2 per head) as kept activations")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.grad_accum=2")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("eval", help="evaluate a checkpoint of any task (its own evaluation), or an open_clip "
                       "directory (zero-shot classification and retrieval recall@k), on held-out shards",
                       description="A checkpoint or run directory is evaluated as its task evaluates during "
                       "training (clip: zero-shot and retrieval; supervised / simmim: classifier, kNN, linear "
                       "probe, reconstruction; imagebind: emergent zero-shot per modality), on --val or else "
                       "the run's data.val. An open_clip directory needs --val.")
    e.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="checkpoint dir (step_XXXXXXXX), run dir (its newest checkpoint) or open_clip export dir")
    e.add_argument("--val", default="", help="held-out shard pattern (braceexpand); default: the run's data.val")
    e.add_argument("--classes", default=None, help="zero-shot classes: 'imagenet' (names and templates from "
                   "open_clip), a JSON list of class names, or a JSON {'classes': [...], 'templates': [...]}; "
                   "default: the run's data.classes (none with --val)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="default: the run's eval.batch_size (256 for an open_clip directory)")
    e.add_argument("--workers", type=int, default=None,
                   help="loader processes per rank decoding the images (default: the run's data.workers; 2)")
    e.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1,
                   help="spread the evaluation over this many local ranks (started with torchrun)")
    e.add_argument("--out", default="", help="also write the results as JSON here")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="checkpoint (any ZeRO stage) -> the task's format: open_clip directory "
                       "(clip), timm directory (supervised, simmim), ImageBind encoders (imagebind)")
    x.add_argument("--checkpoint", required=True, help="checkpoint dir (step_XXXXXXXX) or run dir (its newest)")
    x.add_argument("--out", required=True, help="output directory: new, empty, or a previous export (replaced "
                   "atomically); anything else is refused")
    x.add_argument("--ema", action="store_true", help="the weight EMA (train.ema_decay) instead of the raw weights")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="generate the demo data, train on 2 ranks (CLIP by default), evaluate, export")
    d.add_argument("--out", default="runs/demo", help="where data, checkpoints, metrics and export go")
    d.add_argument("--config", default=str(REPO / "configs" / "demo" / "clip_tiny.yaml"),
                   help="the run config (e.g. configs/siglip/tiny_demo.yaml for the sigmoid loss)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    d.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=2, help="ranks to train with")
    d.add_argument("--train-samples", type=int, default=None,
                   help="size of the generated training split (default: 20000; ImageBind's demo: 6000)")
    d.set_defaults(func=cmd_demo)

    h = sub.add_parser("shard", help="parquet/CSV/JSONL tables, image folders or tars -> indexed WebDataset shards",
                       description="Turn raw image-text data into WebDataset shards with a parquet index, per-shard "
                       "stats, a failures list and OUTPUT/summary.json. Rerun the same command to resume.")
    h.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="a table (.parquet, .csv, .tsv, .jsonl, optionally .gz), a folder of images with .txt/.json "
                        "sidecars, or a .tar; braces and globs expand; repeat for more")
    h.add_argument("--output", required=True, help="output directory (resumed when it holds the same job)")
    h.add_argument("--format", default="auto", choices=["auto", "parquet", "csv", "tsv", "jsonl", "folder", "tar"],
                   help="input format (default: from the file name)")
    h.add_argument("--image-col", help="image column: a local path or the image bytes (default: guessed)")
    h.add_argument("--caption-col", help="caption column (default: guessed; 'none' for data without captions)")
    h.add_argument("--key-col", help="sample key column (default: the row number)")
    h.add_argument("--label-col", help="class id column, stored as .cls")
    h.add_argument("--audio-col", help="audio column (.wav/.flac path or bytes), stored as .wav/.flac")
    h.add_argument("--depth-col", help="depth column (16-bit .png or .npy path or bytes), stored as .depth.png/.depth.npy")
    h.add_argument("--thermal-col", help="thermal column (grey .png/.jpg or .npy path or bytes), stored as .thermal.*")
    h.add_argument("--imu-col", help="IMU column ((T, 6) .npy path or bytes), stored as .imu.npy")
    h.add_argument("--keep-cols", help="comma-separated columns copied into .json (default: all others; 'none')")
    h.add_argument("--image-root", help="directory relative image paths start from (default: the table's)")
    h.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per shard (the last may be short)")
    h.add_argument("--max-shard-bytes", help="also cut shards at this size, e.g. 1GB")
    h.add_argument("--prefix", help="shard name prefix (default: shard, or train/val with --val-fraction)")
    h.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count; 0: in-process)")
    h.add_argument("--image-size", type=int, help="resize target in pixels (enables --resize-mode keep_ratio)")
    h.add_argument("--resize-mode", choices=["none", "keep_ratio", "keep_ratio_largest", "center_crop", "pad"],
                   help="keep_ratio: shorter side = size; keep_ratio_largest: longer side = size; center_crop: "
                        "square crop; pad: longer side = size, padded to a square")
    h.add_argument("--no-upscale", action="store_true", help="do not enlarge images smaller than --image-size")
    h.add_argument("--encode-format", choices=["keep", "jpg", "webp", "png"],
                   help="stored image format (default: jpg when resizing, else keep the source's)")
    h.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality when re-encoding")
    h.add_argument("--no-validate", action="store_true", help="skip the decode test of images stored unchanged")
    h.add_argument("--max-pixels", type=int, default=12_000 * 12_000, help="refuse larger images (decompression bombs)")
    h.add_argument("--max-caption-bytes", type=int, default=16384,
                   help="refuse longer captions (caption_too_long); the loader's data.max_caption_bytes default")
    h.add_argument("--dedup-image", action="store_true", help="also drop rows whose stored image repeats an earlier one")
    h.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction (by a hash of the key) into OUTPUT/val; the rest goes to OUTPUT/train")
    h.add_argument("--max-failure-rate", type=float, default=0.5, help="exit non-zero when more rows than this fail")
    h.add_argument("--overwrite", action="store_true", help="start again in an OUTPUT holding another shard job")
    h.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    h.set_defaults(func=cmd_shard)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from pipeline.train.distributed import close_process_group

    try:
        rc = args.func(args)
    except UserError as e:  # ConfigError, CheckpointError, DataError, ...: pipeline/errors.py
        print(f"error: {e}", file=sys.stderr)
        close_process_group(barrier=False)  # this rank stops here; its peers learn it from their collectives
        return 2
    except KeyboardInterrupt:
        return 130
    close_process_group()  # after a verb that ran on several ranks (train, eval under torchrun)
    return rc


if __name__ == "__main__":
    sys.exit(main())
