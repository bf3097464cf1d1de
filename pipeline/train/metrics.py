"""What a run reports (rank 0 only), to the sinks of `train.report_to`: `jsonl` (out_dir/metrics.jsonl per log
step, out_dir/eval.jsonl per evaluation, and a PNG of the curves at the end), `tensorboard` (out_dir/tensorboard/),
`wandb` (when installed; offline with WANDB_MODE=offline). On a terminal a tqdm bar shows progress; elsewhere
(SLURM's log files, a pipe) each log step prints one plain line with step, loss, lr, samples/s, data-wait and ETA.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from pipeline.atomic_write import write_atomic


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _truncate_after(path: Path, step: int) -> None:
    """A resumed run rewrites what came after its checkpoint."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return
    print(f"{path}: {len(lines) - len(kept)} records after step {step} dropped (the run continues from "
          f"step {step} and writes them again)", flush=True)
    write_atomic(path, "".join(line + "\n" for line in kept))  # a kill mid-rewrite keeps the old file


class JsonlSink:
    def __init__(self, out_dir: Path, start_step: int):
        self.path, self.eval_path = out_dir / "metrics.jsonl", out_dir / "eval.jsonl"
        for path in (self.path, self.eval_path):
            _truncate_after(path, start_step)
        self._file, self._eval_file = open(self.path, "a"), open(self.eval_path, "a")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_eval(self, step: int, results: dict) -> None:
        self._eval_file.write(json.dumps({"step": step, **results}) + "\n")
        self._eval_file.flush()

    def close(self) -> None:
        self._file.close()
        self._eval_file.close()
        plot_metrics(self.path, self.path.with_name("metrics.png"))


class TensorBoardSink:
    def __init__(self, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict) -> None:
        for k, v in _numbers(record).items():
            self._tb.add_scalar(k, v, record["step"])

    def log_eval(self, step: int, results: dict) -> None:
        for k, v in _numbers(results).items():
            self._tb.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        self._tb.close()


class WandbSink:
    """One wandb run per out_dir: its id is kept in out_dir/wandb_run_id, so a resumed run continues it."""

    def __init__(self, out_dir: Path, project: str, config: dict | None):
        import wandb

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=project, name=out_dir.resolve().name, id=run_id, resume="allow",
                               dir=str(out_dir), config=config)

    def log(self, record: dict) -> None:
        self._run.log(_numbers(record), step=record["step"])

    def log_eval(self, step: int, results: dict) -> None:
        self._run.log({f"eval/{k}": v for k, v in _numbers(results).items()}, step=step)

    def close(self) -> None:
        self._run.finish()


def format_log_line(record: dict, total_steps: int) -> str:
    """`step 20/500 | loss 3.2145 | lr 1.00e-03 | 412.3 samples/s | data-wait 3.1% | ETA 0:03:12`; the ETA is
    the remaining steps at the window's step time."""
    eta = (total_steps - record["step"]) * record.get("step_time_ms", 0.0) / 1000
    return (f"step {record['step']}/{total_steps} | loss {record.get('loss', float('nan')):.4f} | "
            f"lr {record.get('lr', 0.0):.2e} | {record.get('samples_per_s', 0.0):.1f} samples/s | "
            f"data-wait {100 * record.get('data_wait_frac', 0.0):.1f}% | "
            f"ETA {datetime.timedelta(seconds=round(max(eta, 0.0)))}")


class MetricsLog:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, progress: bool,
                 report_to: list[str] = ("jsonl", "tensorboard"), wandb_project: str = "pipeline",
                 config: dict | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self._sinks = []
        if "jsonl" in report_to:
            self._sinks.append(JsonlSink(out_dir, start_step))
        if "tensorboard" in report_to:
            self._sinks.append(TensorBoardSink(out_dir, start_step))
        if "wandb" in report_to:
            self._sinks.append(WandbSink(out_dir, wandb_project, config))
        bar = progress and sys.stderr.isatty()  # tqdm draws on stderr; carriage returns only make sense there
        self._lines = not bar
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not bar, unit="step",
                         dynamic_ncols=True, mininterval=1.0)

    def log(self, record: dict) -> None:
        for sink in self._sinks:
            sink.log(record)
        if self._lines:
            print(format_log_line(record, self.total_steps), flush=True)
        self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                              sps=f"{record.get('samples_per_s', 0):.0f}", refresh=False)

    def log_eval(self, step: int, results: dict) -> None:
        for sink in self._sinks:
            sink.log_eval(step, results)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
        for sink in self._sinks:
            sink.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(jsonl: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(jsonl) if "loss" in r]
    if not records:
        return
    keys = ["loss", "lr", "logit_scale", "logit_bias", "samples_per_s", "data_wait_frac", "grad_norm"]
    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(4 * ((len(keys) + 1) // 2), 6), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
