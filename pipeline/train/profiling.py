"""`train.profile_steps: [a, b]`: a torch profiler trace of optimizer steps a..b (1-based, inclusive), written
as a Chrome trace (chrome://tracing, https://ui.perfetto.dev) to out_dir/profile/rank_XXXXX_steps_a-b.json by
the ranks in `train.profile_ranks` (rank 0 by default). The loop tells it where each step begins and ends."""
from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, steps: list[int], out_dir: Path, rank: int, ranks: list[int]):
        self.first, self.last = (steps[0], steps[1]) if steps and rank in ranks else (0, -1)
        self.path = out_dir / "profile" / f"rank_{rank:05d}_steps_{self.first}-{self.last}.json"
        self._prof = None

    def step_begins(self, step: int) -> None:
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self._prof.__enter__()

    def step_ends(self, step: int) -> None:
        if self._prof is not None and step == self.last:
            self.close()

    def close(self) -> None:
        """Writes the trace (also when the run ends inside the profiled steps)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        prof.export_chrome_trace(str(partial))
        partial.replace(self.path)  # a trace file is complete or absent
        print(f"profile of steps {self.first}-{self.last} written to {self.path}", flush=True)
