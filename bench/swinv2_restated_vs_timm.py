"""pipeline/models/swinv2.py built from timm's classes (this checkout) against the version that restated timm's
SwinV2 (706 lines, read from git commit 82cb2c5): same weights, same input, the reference attention on the CPU,
forward+backward per step, interleaved rounds (the order alternates), and the new/old time ratio of adjacent runs,
which a shared machine's load drift affects least. Also prints the largest logit difference (0: the same ops).

    python bench/swinv2_restated_vs_timm.py [--rounds 20] [--threads 1]

Needs the git history (the old module is read with `git show`). Results (2026-12-01, 2-core machine shared at load
~18-20, two runs): 1.00x (quartiles 0.95-1.08x) and 0.98x (0.93-1.05x), logits equal; quoted in
pipeline/models/swinv2.py's docstring.
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "82cb2c5"


def load_old_module():
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:pipeline/models/swinv2.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "swinv2_restated.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("swinv2_restated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3, help="forward+backward steps per round and model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline.models.swinv2 import create_swinv2

    torch.set_num_threads(args.threads)
    # maps 18, 9, 5, 3 with window 8: padded maps, shifted windows and windows clamped to the map
    kw = dict(img_size=72, embed_dim=48, depths=(2, 2, 2, 2), num_classes=10, drop_path_rate=0.0)
    torch.manual_seed(0)
    new = create_swinv2("swinv2_tiny_window8_256", **kw).train()
    old = load_old_module().create_swinv2("swinv2_tiny_window8_256", **kw).train()
    with torch.no_grad():
        for p in new.parameters():
            p.normal_(0, 0.05)  # timm's init zeroes the post-norms: every block would be the identity
    old.load_state_dict(new.state_dict(), strict=True)
    x = torch.randn(8, 3, 72, 72, generator=torch.Generator().manual_seed(1))

    def step(model):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()

    with torch.no_grad():
        print(f"max |new - old| logits: {(new(x) - old(x)).abs().max().item():.3g}")
    models = {f"old (restated, {OLD_COMMIT})": old, "new (timm classes)": new}
    for m in models.values():
        step(m)  # warm-up
    times = {name: [] for name in models}
    for r in range(args.rounds):
        for name in (list(models) if r % 2 == 0 else list(reversed(list(models)))):
            start = time.perf_counter()
            for _ in range(args.steps):
                step(models[name])
            times[name].append((time.perf_counter() - start) / args.steps)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts) * 1e3:.1f} ms/step, min {min(ts) * 1e3:.1f} ms "
              f"({args.rounds} rounds x {args.steps} steps, {args.threads} thread(s))")
    ratios = [n / o for o, n in zip(*times.values())]
    q = statistics.quantiles(ratios, n=4)
    print(f"new/old per round (adjacent runs): median {statistics.median(ratios):.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}")


if __name__ == "__main__":
    main()
