"""`python -m pipeline demo`: the whole path on the built-in data, in one command. Each task's class picks its
demo (`run_demo`, pipeline/tasks/registry.py):

- CLIP: generate shards -> train on N ranks (torchrun, DeepSpeed, gloo on CPU) -> evaluate -> export to open_clip
  -> reload the export with plain open_clip and evaluate it again (the numbers must agree).
- any other task on the image demo data (backbones): generate shards -> train -> evaluate -> its export.
- ImageBind: multimodal data -> binding against the CLIP demo's towers -> emergent zero-shot -> encoder export.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.launcher import launch_torchrun


def train(config: Path, overrides: list[str], nproc: int) -> None:
    """`python -m pipeline train --config CONFIG OVERRIDES` on `nproc` local ranks (one: in this process)."""
    argv = ["train", "--config", str(config), *overrides]
    print(f"[demo] training on {nproc} ranks: python -m pipeline " + " ".join(argv), flush=True)
    if nproc > 1:
        code = launch_torchrun(nproc, argv)
        if code != 0:
            raise UserError(f"training failed with exit code {code}")
        return
    from pipeline.config import load_config
    from pipeline.train.distributed import read_dist_env
    from pipeline.train.loop import run_training

    run_training(load_config(config, overrides), read_dist_env())


def _image_demo_data(out: Path, steps: int | None, train_samples: int | None) -> tuple[dict, list[str]]:
    """The shapes-and-colours image demo set (pipeline/demo_data/shapes.py) and the overrides pointing at it."""
    from pipeline.demo_data.shapes import write_demo_dataset

    print(f"[demo] writing the demo dataset to {out / 'data'}", flush=True)
    paths = write_demo_dataset(out / "data", train_samples=20000 if train_samples is None else train_samples)
    overrides = [f"data.train={paths['train']}", f"data.val={paths['val']}", f"data.classes={paths['classes']}",
                 f"train.out_dir={out}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    return paths, overrides


def run_task_demo(out: Path, config: Path, steps: int | None = None, nproc: int = 2,
                  train_samples: int | None = None) -> dict:
    """Image demo data -> training -> the task's export; returns the run's final evaluation (eval.json)."""
    from pipeline.tasks.registry import export_checkpoint

    t0 = time.time()
    _, overrides = _image_demo_data(out, steps, train_samples)
    train(config, overrides, nproc)
    export_dir = export_checkpoint(out, out / "export")
    print(f"[demo] done in {time.time() - t0:.0f} s; exported to {export_dir}", flush=True)
    return json.loads((out / "eval.json").read_text())


def run_clip_demo(out: Path, config: Path, steps: int | None = None, nproc: int = 2,
                  train_samples: int | None = None) -> dict:
    import open_clip

    from pipeline.eval.zero_shot import evaluate, format_results
    from pipeline.export import export_open_clip, open_clip_export_kwargs

    t0 = time.time()
    paths, overrides = _image_demo_data(out, steps, train_samples)
    train(config, overrides, nproc)
    export_dir = export_open_clip(out, out / "export")
    print(f"[demo] exported to {export_dir}; reloading it with open_clip alone", flush=True)
    model, _, eval_tf = open_clip.create_model_and_transforms(f"local-dir:{export_dir}",
                                                         **open_clip_export_kwargs(export_dir))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    results = evaluate(model, eval_tf, tokenizer, paths["val"], paths["classes"])
    (out / "export_eval.json").write_text(json.dumps(results, indent=2))
    print(f"[demo] open_clip export: {format_results(results)}", flush=True)
    print(f"[demo] done in {time.time() - t0:.0f} s: metrics {out / 'metrics.jsonl'}, plot {out / 'metrics.png'}, "
          f"TensorBoard {out / 'tensorboard'}, checkpoints {out / 'checkpoints'}, export {export_dir}", flush=True)
    return results


def run_imagebind_demo(out: Path, config: Path, steps: int | None = None, nproc: int = 2,
                       train_samples: int | None = None) -> dict:
    """The binding demo: multimodal data -> encoders trained against the frozen towers of the CLIP demo's export
    -> emergent text -> X zero-shot -> encoder export. A config with one `data.train` source writes one set whose
    samples carry audio + depth (`write_multimodal_demo_dataset`); with several, one paired set per configured
    modality (`write_disjoint_demo_datasets`, `train_samples` / 2 each)."""
    from pipeline.config import load_config
    from pipeline.demo_data.multimodal import write_disjoint_demo_datasets, write_multimodal_demo_dataset
    from pipeline.tasks.registry import export_checkpoint

    t0 = time.time()
    train_samples = 6000 if train_samples is None else train_samples
    cfg = load_config(config)
    towers = Path(cfg.imagebind.towers)
    if not (towers / "open_clip_config.json").is_file():
        raise UserError(f"imagebind.towers={towers} is not an open_clip export; run the CLIP demo first "
                        f"(bash launch/demo.sh writes runs/demo/export)")
    if "::" in cfg.data.train:
        print(f"[demo] writing one paired set per modality ({', '.join(cfg.imagebind.modalities)}) to "
              f"{out / 'data'}", flush=True)
        paths = write_disjoint_demo_datasets(out / "data", train_samples=train_samples // 2, val_samples=250,
                                             modalities=tuple(cfg.imagebind.modalities))
    else:
        print(f"[demo] writing the multimodal demo dataset (image + audio + depth) to {out / 'data'}", flush=True)
        paths = write_multimodal_demo_dataset(out / "data", train_samples=train_samples, val_samples=500,
                                              samples_per_shard=1000)
    overrides = [f"data.train={paths['train']}", f"data.val={paths['val']}", f"data.classes={paths['classes']}",
                 f"train.out_dir={out}", *([f"train.steps={steps}"] if steps is not None else [])]
    train(config, overrides, nproc)
    results = json.loads((out / "eval.json").read_text())
    export_dir = export_checkpoint(out, out / "export")
    mods = cfg.imagebind.modalities
    print(f"[demo] done in {time.time() - t0:.0f} s; encoders exported to {export_dir} (no "
          f"{' / '.join('text-' + m for m in mods)} pair was trained on; chance is "
          f"1/{results.get('classes', '?')})", flush=True)
    return results
