"""What a run reports (rank 0 only): per-step JSONL, TensorBoard events, a progress bar, a PNG of the curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, progress: bool):
        self.path = out_dir / "metrics.jsonl"
        self._truncate_after(start_step)  # a resumed run rewrites what came after its checkpoint
        self._file = open(self.path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step",
                         dynamic_ncols=True, mininterval=1.0)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) == len(lines):
            return
        print(f"{self.path}: {len(lines) - len(kept)} records after step {step} dropped (the run continues from "
              f"step {step} and writes them again)", flush=True)
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, record["step"])
        self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                              sps=f"{record.get('samples_per_s', 0):.0f}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
        self._tb.close()
        self._file.close()
        plot_metrics(self.path, self.path.with_name("metrics.png"))


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
