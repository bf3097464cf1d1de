"""Adversarial and unlucky inputs against `python -m pipeline shard`.

Threat model: the tables, folders and tars given to `shard` come from anywhere. A bad row may fail (counted by
reason, with its source line), but it may not take other rows with it, stop the job, leave a half-written
shard behind, or pull files from outside the input into the shards (a symlink in a folder).
"""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from pipeline.__main__ import main
from pipeline.data.loader import ShardSet, expand_shards
from pipeline.data.shard_index import index_path, load_or_build_index
from pipeline.shard.options import ShardOptions
from pipeline.shard.run import run_shard

REPO = Path(__file__).resolve().parents[2]


def _jpeg(seed: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 80)).save(buf, format="JPEG")
    return buf.getvalue()


def _images(root: Path, n: int) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "img" / f"{i}.jpg").write_bytes(_jpeg(i))


def _run(inputs, output, **kw) -> dict:
    kw.setdefault("workers", 0)
    return run_shard(ShardOptions(inputs=[str(i) for i in inputs], output=str(output), **kw))


def _samples(pattern: str) -> dict[str, dict[str, bytes]]:
    shards = ShardSet(expand_shards(pattern))
    return dict(shards.read(i) for i in range(shards.total))


def _failures(out: Path) -> list[dict]:
    return pq.read_table(out / "failures.parquet").to_pylist()


# ------------------------------------------------------------------------------ CSV quoting (item 4)

def test_one_stray_quote_costs_its_own_row_not_every_row_after_it(tmp_path):
    _images(tmp_path, 6)
    text = ("image,caption\n"
            "img/0.jpg,first\n"
            'img/1.jpg,"a stray quote that never closes\n'     # line 3: the bad row
            "img/2.jpg,third\n"
            'img/3.jpg,"a caption, with a comma"\n'
            'img/4.jpg,"a caption\non two lines"\n'            # valid CSV: a quoted field spans lines
            "img/5.jpg,last\n")
    (tmp_path / "rows.csv").write_text(text)
    summary = _run([tmp_path / "rows.csv"], tmp_path / "out")
    assert summary["rows"] == 6 and summary["samples"] == 5 and summary["failures"] == {"bad_row": 1}
    [failure] = _failures(tmp_path / "out")
    assert failure["source"].endswith("rows.csv:3") and "does not close" in failure["detail"]
    captions = sorted(s["txt"].decode() for s in _samples(summary["pattern"]).values())
    assert captions == sorted(["first", "third", "a caption, with a comma", "a caption\non two lines", "last"])


def test_a_stray_quote_that_closes_further_down_is_a_bad_row_too(tmp_path):
    _images(tmp_path, 4)
    # the stray quote on line 2 would run to the opening quote of line 3 and swallow line 3's start
    text = ('image,caption\nimg/0.jpg,"stray\nimg/1.jpg,"quoted, fine"\nimg/2.jpg,plain\nimg/3.jpg,end\n')
    (tmp_path / "rows.csv").write_text(text)
    summary = _run([tmp_path / "rows.csv"], tmp_path / "out")
    assert summary["samples"] == 3 and summary["failures"] == {"bad_row": 1}
    [failure] = _failures(tmp_path / "out")
    assert failure["source"].endswith("rows.csv:2") and "does not close properly" in failure["detail"]
    assert sorted(s["txt"] for s in _samples(summary["pattern"]).values()) == [b"end", b"plain", b"quoted, fine"]


# ------------------------------------------------------------------------------ caption limit (item 9)

def test_captions_over_the_limit_fail_in_tables_and_sidecars(tmp_path):
    _images(tmp_path, 3)
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([["img/0.jpg", "short"], ["img/1.jpg", "long " * 200_000], ["img/2.jpg", "y" * 16384]])
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.jpg").write_bytes(_jpeg(1))
    (tree / "a.txt").write_text("z" * 10_000_000)
    summary = _run([tmp_path / "rows.csv", tree], tmp_path / "out")
    assert summary["samples"] == 2 and summary["failures"] == {"caption_too_long": 2}
    assert sorted(len(s["txt"]) for s in _samples(summary["pattern"]).values()) == [5, 16384]
    tight = _run([tmp_path / "rows.csv"], tmp_path / "out2", max_caption_bytes=5)
    assert tight["samples"] == 1 and tight["failures"] == {"caption_too_long": 2}


# ------------------------------------------------------------------------------ keys (item 10)

def test_a_key_with_a_nul_byte_fails_its_row_and_a_rerun_works(tmp_path, capsys):
    _images(tmp_path, 3)
    rows = [{"image": "img/0.jpg", "caption": "a", "id": "good0"},
            {"image": "img/1.jpg", "caption": "b", "id": "bad\x00key"},
            {"image": "img/2.jpg", "caption": "c", "id": "good2"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["shard", "--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "out"), "--key-col", "id",
            "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["failures"] == {"bad_key": 1}
    assert sorted(_samples(summary["pattern"])) == ["good0", "good2"]
    assert main(argv) == 0  # the rerun of a finished job
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["samples"] == 2


# ------------------------------------------------------------------------------ full disk (item 10)

def test_a_full_disk_is_one_line_leaves_no_tmp_shard_and_the_rerun_completes(tmp_path):
    """Writes past 60 kB fail as on a full disk (RLIMIT_FSIZE, SIGXFSZ ignored): the first shard fills up."""
    (tmp_path / "img").mkdir()
    import numpy as np
    rng = np.random.default_rng(0)
    for i in range(12):  # noise compresses badly: ~11 kB per JPEG, 137 kB in one shard
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        (tmp_path / "img" / f"{i}.jpg").write_bytes(buf.getvalue())
    (tmp_path / "rows.csv").write_text("image,caption\n" + "".join(f"img/{i}.jpg,c{i}\n" for i in range(12)))
    out = tmp_path / "out"
    args = ["shard", "--input", str(tmp_path / "rows.csv"), "--output", str(out), "--workers", "0",
            "--samples-per-shard", "100", "--no-progress"]
    limited = ("import resource, signal, sys\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))\n"
               "from pipeline.__main__ import main\n"
               f"sys.exit(main({args!r}))\n")
    proc = subprocess.run([sys.executable, "-c", limited], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: shard: File too large") and proc.stderr.count("\n") == 1, proc.stderr
    assert "rerun the same command" in proc.stderr
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 12 and len(_samples(summary["pattern"])) == 12


# ------------------------------------------------------------------------------ symlinks (item 11)

def test_symlinks_in_a_folder_input_are_not_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the contents of a file outside the input")
    outside_image = tmp_path / "outside.jpg"
    outside_image.write_bytes(_jpeg(5))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.jpg").write_bytes(_jpeg(1))
    (tree / "a.txt").write_text("a real caption")
    (tree / "leak.jpg").write_bytes(_jpeg(2))
    os.symlink(secret, tree / "leak.txt")                 # a caption that is a link out of the tree
    os.symlink(outside_image, tree / "pic.jpg")           # an image that is one
    (tree / "pic.txt").write_text("caption of a linked image")
    os.symlink(tmp_path, tree / "loop")                   # a directory link: not walked
    summary = _run([tree], tmp_path / "out")
    samples = _samples(summary["pattern"])
    assert list(samples) == ["a"]
    assert summary["failures"] == {"missing_caption": 1, "missing_image": 1}
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "out").glob("*.tar"))
    assert b"outside the input" not in on_disk


# ------------------------------------------------------------------------------ indexes written by shard

def test_shard_indexes_carry_the_tar_fingerprint_and_are_used_as_written(tmp_path):
    from pipeline.data.shard_index import META_FINGERPRINT

    _images(tmp_path, 3)
    (tmp_path / "rows.csv").write_text("image,caption\n" + "".join(f"img/{i}.jpg,c{i}\n" for i in range(3)))
    summary = _run([tmp_path / "rows.csv"], tmp_path / "out")
    tar = Path(expand_shards(summary["pattern"])[0])
    written = index_path(tar).read_bytes()
    assert META_FINGERPRINT in pq.read_schema(index_path(tar)).metadata
    os.utime(tar, (tar.stat().st_mtime + 100,) * 2)  # a newer tar (a copy, a touch): its index still fits
    assert load_or_build_index(tar).num_rows == 3
    assert index_path(tar).read_bytes() == written  # not rebuilt: the width/height/sha256 columns stay
