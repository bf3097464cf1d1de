"""`python -m pipeline shard`: planted faults counted by reason, read-back by webdataset and our loader, kill -9 +
rerun identical to an uninterrupted run, every input format, image processing, splits, dedup, CLI errors."""
import csv
import gzip
import hashlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.__main__ import main
from pipeline.data.decoders import decode_caption, image_member
from pipeline.data.image_decode import decode_image
from pipeline.data.loader import ShardSet, expand_shards
from pipeline.data.shard_index import index_path, load_or_build_index
from pipeline.shard.images import ImageFailure, ImageSettings, process_image
from pipeline.shard.options import ShardOptions
from pipeline.shard.rows import Columns
from pipeline.shard.run import run_shard
from pipeline.shard.samples import sanitize_key

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- test inputs

def _photo(seed: int, w: int, h: int) -> Image.Image:
    """A smooth picture with some noise: compresses like a photo, decodes like one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (1 + seed % 3) + y) % 256, (y * 2 + seed * 7) % 256, (x + 2 * y + seed * 13) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90, **kw)
    return b.getvalue()


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def _bad_crc_png(img: Image.Image) -> bytes:
    """A PNG whose pixel data is intact but whose IDAT checksum is wrong (PIL's plain decode does not notice)."""
    data = bytearray(_png(img))
    i = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[i - 4:i])
    data[i + 4 + length] ^= 0xFF
    return bytes(data)


def _wav(seconds: float = 0.05, rate: int = 8000) -> bytes:
    b = io.BytesIO()
    with wave.open(b, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(np.arange(int(rate * seconds)) / 5) * 3000).astype("<i2").tobytes())
    return b.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=False)
    return b.getvalue()


# reason -> number of planted rows; every other row is good
PLANTED = {"missing_file": 2, "bad_image": 4, "empty_file": 1, "bad_caption": 2, "empty_caption": 1,
           "duplicate_key": 2, "image_too_large": 1}
N_GOOD = 40


def make_planted_csv(root: Path) -> tuple[Path, dict[str, str]]:
    """A CSV over a folder of images with every kind of fault planted; returns (csv, {good key: caption})."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rows, good = [], {}
    for i in range(N_GOOD):
        name = f"g{i:03d}." + ("png" if i % 5 == 0 else "jpg")
        img = _photo(i, 60 + (i * 7) % 50, 40 + (i * 11) % 60)
        (img_dir / name).write_bytes(_png(img) if name.endswith("png") else _jpeg(img))
        key, caption = f"k{i:03d}", f"a picture number {i}, café"
        rows.append((f"images/{name}", caption, key))
        good[key] = caption
    full = _jpeg(_photo(99, 120, 90))
    (img_dir / "trunc1.jpg").write_bytes(full[:len(full) // 2])
    (img_dir / "trunc2.jpg").write_bytes(full[:len(full) - 200])
    (img_dir / "badcrc.png").write_bytes(_bad_crc_png(_photo(98, 50, 40)))
    (img_dir / "text.jpg").write_bytes(b"this is not an image at all\n")
    (img_dir / "empty.jpg").write_bytes(b"")
    Image.new("1", (20000, 20000)).save(img_dir / "huge.png")  # 400 Mpixel, 48 kB on disk
    (img_dir / "ok.jpg").write_bytes(_jpeg(_photo(97, 64, 48)))
    bad_utf8 = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # latin-1 bytes in a UTF-8 file
    faults = [
        ("images/nope1.jpg", "missing one", "f-missing1"), ("/nonexistent/dir/x.jpg", "missing two", "f-missing2"),
        ("images/trunc1.jpg", "truncated jpeg", "f-trunc1"), ("images/trunc2.jpg", "truncated jpeg", "f-trunc2"),
        ("images/badcrc.png", "bad crc png", "f-crc"), ("images/text.jpg", "text file", "f-text"),
        ("images/empty.jpg", "zero bytes", "f-empty"),
        ("images/ok.jpg", bad_utf8, "f-utf8a"), ("images/ok.jpg", "\udcff\udcfe", "f-utf8b"),
        ("images/ok.jpg", "   ", "f-emptycap"),
        ("images/ok.jpg", "dup of k003", "k003"), ("images/g010.png", "dup of k010", "k010"),
        ("images/huge.png", "a bomb", "f-huge"),
    ]
    # interleave the faults with the good rows so they land in different shards
    for j, fault in enumerate(faults):
        rows.insert(3 * j + 2, fault)
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["filepath", "caption", "id"])
    w.writerows(rows)
    path = root / "rows.csv"
    path.write_bytes(text.getvalue().encode("utf-8", "surrogateescape"))
    return path, good


def _opts(inputs, output, **kw) -> ShardOptions:
    kw.setdefault("workers", 0)
    return ShardOptions(inputs=[str(i) for i in inputs], output=str(output), **kw)


def _read_all(pattern: str) -> dict[str, dict[str, bytes]]:
    """Every sample of the shards through our loader's reader: {key: {ext: bytes}}, in order."""
    shards = ShardSet(expand_shards(pattern))
    out = {}
    for sid in range(shards.total):
        key, raw = shards.read(sid)
        assert key not in out
        out[key] = raw
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    csv_path, good = make_planted_csv(root)
    out = root / "out"
    code = main(["shard", "--input", str(csv_path), "--output", str(out), "--key-col", "id", "--samples-per-shard",
                 "7", "--workers", "2", "--no-progress"])
    assert code == 0
    return {"csv": csv_path, "good": good, "out": out, "summary": json.loads((out / "summary.json").read_text())}


# ------------------------------------------------------------------------------------------- acceptance

def test_planted_faults_are_counted_by_reason_and_good_rows_kept_once(planted):
    s, good = planted["summary"], planted["good"]
    assert s["failures"] == PLANTED
    assert s["rows"] == N_GOOD + sum(PLANTED.values()) and s["samples"] == N_GOOD
    assert s["failed"] == sum(PLANTED.values())
    samples = _read_all(s["pattern"])
    assert sorted(samples) == sorted(good)  # every good row exactly once (dict keys, and _read_all refuses repeats)
    for key, raw in samples.items():
        assert raw["txt"].decode() == good[key]
    # the failures parquet lists each bad row with its reason
    failures = pq.read_table(planted["out"] / "failures.parquet").to_pylist()
    by_key = {f["key"]: f for f in failures if f["reason"] != "duplicate_key"}
    assert {f["reason"] for f in failures if f["key"] == "k003"} == {"duplicate_key"}
    assert by_key["f-trunc1"]["reason"] == "bad_image" and "truncated" in by_key["f-trunc1"]["detail"]
    assert by_key["f-crc"]["reason"] == "bad_image" and "checksum" in by_key["f-crc"]["detail"]
    assert by_key["f-huge"]["reason"] == "image_too_large"
    assert by_key["f-missing1"]["source"].endswith("rows.csv:" + str(by_key["f-missing1"]["row"] + 2))  # + header
    assert len(failures) == s["failed"] and [f["row"] for f in failures] == sorted(f["row"] for f in failures)
    # per-shard stats add up to the summary
    stats = [json.loads(p.read_text()) for p in sorted(planted["out"].glob("shard-*.stats.json"))]
    assert len(stats) == s["shards"] and sum(x["rows"] for x in stats) == s["rows"]
    assert [x["row_begin"] for x in stats[1:]] == [x["row_end"] for x in stats[:-1]]
    assert all(x["samples"] == 7 for x in stats[:-1]) and 0 < stats[-1]["samples"] <= 7


def test_webdataset_and_our_loader_read_the_same_samples(planted):
    pattern = planted["summary"]["pattern"]
    ours = _read_all(pattern)
    theirs = list(wds.WebDataset(pattern, shardshuffle=False))
    assert [x["__key__"] for x in theirs] == list(ours)
    for x in theirs:
        assert {k: v for k, v in x.items() if not k.startswith("__")} == ours[x["__key__"]]
    shards = expand_shards(pattern)
    manifest = json.loads((planted["out"] / "manifest.json").read_text())  # beside summary.json
    assert manifest["shards"] == [Path(p).name for p in shards]
    assert manifest["samples"] == [pq.ParquetFile(index_path(p)).metadata.num_rows for p in shards]
    assert manifest["bytes"] == [Path(p).stat().st_size for p in shards]
    assert manifest["indexes"] == [index_path(p).name for p in shards]
    assert sum(manifest["samples"]) == planted["summary"]["samples"]
    for shard in shards:
        index = pq.read_table(index_path(shard)).to_pylist()
        assert load_or_build_index(shard).column("key").to_pylist() == [r["key"] for r in index]
        for r in index:
            raw = ours[r["key"]]
            ext = "png" if "png" in raw else "jpg"
            assert r["sha256"] == hashlib.sha256(raw[ext]).hexdigest()
            img = decode_image(image_member(raw))
            assert decode_caption(raw)  # every sample keeps its caption
            assert (r["width"], r["height"]) == img.size
            meta = json.loads(raw["json"])
            assert (meta["width"], meta["height"], meta["key"]) == (*img.size, r["key"])


def _shard_cmd(csv_path, out, workers):
    return [sys.executable, "-m", "pipeline", "shard", "--input", str(csv_path), "--output", str(out),
            "--key-col", "id", "--samples-per-shard", "10", "--image-size", "48", "--resize-mode", "center_crop",
            "--workers", str(workers), "--no-progress"]


def _descendants(pid: int) -> set[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return set()
    return {int(c) for c in children}.union(*(_descendants(int(c)) for c in children))


def _kill_after(cmd, out: Path, complete_shards: int) -> int:
    """Starts `cmd`, SIGKILLs it once `complete_shards` shards exist; returns how many existed at the kill.
    Its worker processes must then go away by themselves."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob("shard-*.tar"))) >= complete_shards:
                workers = _descendants(proc.pid)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    if sys.platform == "linux":
        assert workers, "no worker processes seen"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.05)
        left = [w for w in workers if Path(f"/proc/{w}").exists()]
        for w in left:
            os.kill(w, signal.SIGKILL)
        assert not left, "worker processes outlived their killed parent"
    return len(list(out.glob("shard-*.tar")))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("summary.json", "shard_job.json")}


def test_kill9_and_rerun_gives_the_shards_of_an_uninterrupted_run(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    csv_path, good = make_planted_csv(root)
    # more rows, larger pictures: enough work that a kill lands mid-run
    with open(csv_path, "a", newline="") as f:
        w = csv.writer(f)
        for i in range(360):
            name = f"images/m{i:03d}.jpg"
            (root / name).write_bytes(_jpeg(_photo(1000 + i, 320, 240)))
            w.writerow([name, f"more {i}", f"m{i:03d}"])
    reference = tmp_path / "reference"
    run_shard(_opts([csv_path], reference, columns=Columns(key="id"), samples_per_shard=10,
                    image=ImageSettings(size=48, resize_mode="center_crop", encode_format="jpg"), workers=0))
    expected = _files(reference)
    n_shards = json.loads((reference / "summary.json").read_text())["shards"]
    assert n_shards >= 40

    out = tmp_path / "killed"
    rng = random.Random()  # a different kill point every run; the message names it
    killed_at = [_kill_after(_shard_cmd(csv_path, out, workers=2), out, rng.randint(2, n_shards // 3))]
    # kill the resumed run too, after it has written at least one shard of its own
    killed_at.append(_kill_after(_shard_cmd(csv_path, out, workers=2), out,
                                 rng.randint(killed_at[0] + 1, n_shards * 2 // 3)))
    assert not (out / "summary.json").exists()
    proc = subprocess.run(_shard_cmd(csv_path, out, workers=1), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    got = _files(out)
    assert sorted(got) == sorted(expected), f"killed after {killed_at} shards"
    for name in expected:
        assert got[name] == expected[name], f"{name} differs (killed after {killed_at} shards)"
    assert not list(out.rglob("*.tmp"))
    s = json.loads((out / "summary.json").read_text())
    assert s["failures"] == PLANTED and s["samples"] == N_GOOD + 360
    assert s["this_run"]["rows_processed"] < s["rows"]  # the last run resumed rather than redoing everything


def test_output_does_not_depend_on_the_worker_count(planted, tmp_path):
    run_shard(_opts([planted["csv"]], tmp_path / "w0", columns=Columns(key="id"), samples_per_shard=7, workers=0))
    a, b = _files(tmp_path / "w0"), _files(planted["out"])
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)


def test_rerun_of_a_finished_job_changes_nothing_and_other_settings_are_refused(planted, capsys):
    out = planted["out"]
    before = _files(out)
    args = ["shard", "--input", str(planted["csv"]), "--output", str(out), "--key-col", "id", "--no-progress"]
    assert main(args + ["--samples-per-shard", "7", "--workers", "0"]) == 0
    assert _files(out) == before
    assert json.loads((out / "summary.json").read_text())["this_run"]["rows_processed"] == 0
    capsys.readouterr()
    assert main(args + ["--samples-per-shard", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "samples_per_shard" in err and "\n" not in err


# ------------------------------------------------------------------------------------------- input formats

def test_parquet_with_image_bytes_extra_columns_and_modalities(tmp_path):
    imgs = [_jpeg(_photo(i, 40, 30)) for i in range(6)]
    depth16 = io.BytesIO()
    Image.fromarray(np.arange(30 * 40, dtype=np.uint16).reshape(30, 40)).save(depth16, "PNG")
    table = pa.table({
        "jpg": imgs,
        "text": [f"caption {i}" for i in range(6)],
        "uid": [f"u{i}" for i in range(6)],
        "label": ["3", "1", "4", "1", "x", "9"],  # "x" is a bad label
        "audio": [_wav()] * 5 + [b"not audio"],
        "depth": [depth16.getvalue(), _npy(np.ones((30, 40), np.float32)), None, None, None, None],
        "score": [0.5, 1.5, float("nan"), 2.0, 3.0, 4.0],
        "url": [f"http://example.com/{i}.jpg" for i in range(6)],
    }, schema=pa.schema([("jpg", pa.binary()), ("text", pa.string()), ("uid", pa.string()), ("label", pa.string()),
                         ("audio", pa.binary()), ("depth", pa.binary()), ("score", pa.float64()), ("url", pa.string())]))
    src = tmp_path / "data.parquet"
    pq.write_table(table, src)
    summary = run_shard(_opts([src], tmp_path / "out", columns=Columns(key="uid", label="label", audio="audio",
                                                                        depth="depth")))
    assert summary["failures"] == {"bad_label": 1, "bad_audio": 1}
    samples = _read_all(summary["pattern"])
    assert list(samples) == ["u0", "u1", "u2", "u3"]
    assert samples["u0"]["jpg"] == imgs[0]  # stored unchanged: no resize asked for
    assert samples["u0"]["cls"] == b"3" and samples["u0"]["wav"] == _wav()
    assert samples["u0"]["depth.png"] == depth16.getvalue() and "depth.npy" in samples["u1"]
    assert "depth.png" not in samples["u2"]
    meta = json.loads(samples["u2"]["json"])
    assert meta["score"] is None and meta["url"] == "http://example.com/2.jpg" and "jpg" not in meta
    # plain webdataset groups the multi-part extension the same way
    wsample = next(iter(wds.WebDataset(summary["pattern"], shardshuffle=False)))
    assert wsample["depth.png"] == depth16.getvalue()


def test_thermal_and_imu_columns_become_members_the_trainer_decodes(tmp_path):
    from pipeline.data.modalities import decode_modality

    thermal8 = io.BytesIO()
    Image.fromarray(np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)).save(thermal8, "PNG")
    imu = _npy(np.zeros((50, 6), np.float32))
    table = pa.table({"image": [_jpeg(_photo(i, 20, 20)) for i in range(4)], "caption": ["c"] * 4,
                      "heat": [thermal8.getvalue(), _jpeg(_photo(9, 20, 20)), None, None],
                      "motion": [None, None, imu, b"not npy"]})
    src = tmp_path / "d.parquet"
    pq.write_table(table, src)
    summary = run_shard(_opts([src], tmp_path / "out", columns=Columns(thermal="heat", imu="motion")))
    assert summary["failures"] == {"bad_imu": 1}
    samples = list(_read_all(summary["pattern"]).values())
    assert samples[0]["thermal.png"] == thermal8.getvalue() and "thermal.jpg" in samples[1]
    assert samples[2]["imu.npy"] == imu and "imu.npy" not in samples[0] and "thermal.png" not in samples[2]
    assert "heat" not in json.loads(samples[0]["json"])  # a modality column is a member, not metadata
    assert decode_modality(samples[0], "thermal").value.shape == (30, 40)
    assert decode_modality(samples[2], "imu").value.shape == (50, 6)


def test_object_npy_is_refused_without_unpickling(tmp_path):
    bad = io.BytesIO()
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [_jpeg(_photo(0, 20, 20))], "caption": ["c"], "depth": [bad.getvalue()]}), src)
    summary = run_shard(_opts([src], tmp_path / "out", columns=Columns(depth="depth")))
    assert summary["failures"] == {"bad_depth": 1}


def test_jsonl_gz_and_tsv_inputs_with_relative_paths_and_bad_lines(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(_photo(i, 30, 30)))
    lines = [json.dumps({"image": f"img/{i}.jpg", "caption": f"c{i}", "meta": {"i": i}}).encode() for i in range(3)]
    lines.insert(1, b"{not json")
    lines.append(b'{"image": "img/3.jpg", "caption": "bad \xff utf8"}')
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n\n")
    (tmp_path / "b.tsv").write_text("image\tcaption\nimg/0.jpg\tfrom tsv\nfile://" + str(tmp_path / "img/1.jpg")
                                    + "\tabsolute\n")
    summary = run_shard(_opts([tmp_path / "a.jsonl.gz", tmp_path / "b.tsv"], tmp_path / "out", samples_per_shard=2))
    assert summary["rows"] == 7 and summary["failures"] == {"bad_row": 1, "bad_caption": 1}
    samples = _read_all(summary["pattern"])
    # keys number the rows across inputs, in input order
    assert list(samples) == ["000000000", "000000002", "000000003", "000000005", "000000006"]
    assert samples["000000005"]["txt"] == b"from tsv" and samples["000000006"]["txt"] == b"absolute"
    assert json.loads(samples["000000002"]["json"])["meta"] == {"i": 1}


def test_folder_tree_with_sidecars(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b.dir").mkdir(parents=True)
    (tree / "x1.jpg").write_bytes(_jpeg(_photo(1, 30, 20)))
    (tree / "x1.txt").write_text("caption from txt")
    (tree / "x1.cls").write_text("7")
    (tree / "x1.wav").write_bytes(_wav())
    (tree / "x1.depth.npy").write_bytes(_npy(np.zeros((20, 30), np.uint16)))
    (tree / "x1.pickle").write_bytes(b"\x80\x04K\x01.")  # not allow-listed: dropped
    (tree / "a" / "x2.png").write_bytes(_png(_photo(2, 30, 20)))
    (tree / "a" / "x2.json").write_text(json.dumps({"caption": "caption from json", "source": "web"}))
    (tree / "a" / "b.dir" / "x3.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPgarbage")
    (tree / "a" / "b.dir" / "x3.txt").write_text("broken webp")
    (tree / "a" / "nocap.jpg").write_bytes(_jpeg(_photo(3, 30, 20)))
    (tree / "00000_stats.json").write_text("{}")  # img2dataset's bookkeeping: not a sample
    (tree / "00000.parquet").write_bytes(b"PAR1")
    summary = run_shard(_opts([tree], tmp_path / "out"))
    assert summary["rows"] == 4 and summary["failures"] == {"bad_image": 1, "missing_caption": 1}
    samples = _read_all(summary["pattern"])
    assert list(samples) == ["x1", "a/x2"]  # sorted walk: files of a directory before its subdirectories
    assert set(samples["x1"]) == {"jpg", "txt", "cls", "wav", "depth.npy", "json"}
    assert samples["x1"]["cls"] == b"7"
    assert samples["a/x2"]["txt"] == b"caption from json" and json.loads(samples["a/x2"]["json"])["source"] == "web"


def test_reshard_existing_tars_keeps_every_sample(planted, tmp_path):
    pattern = planted["summary"]["pattern"]
    before = _read_all(pattern)
    summary = run_shard(_opts([pattern], tmp_path / "out", samples_per_shard=15, max_failure_rate=0.0))
    assert summary["failures"] == {} and summary["samples"] == len(before)
    assert [json.loads((tmp_path / "out" / f"shard-{i:06d}.stats.json").read_text())["samples"]
            for i in range(summary["shards"])] == [15, 15, 10]
    after = _read_all(summary["pattern"])
    assert after == before  # same keys, same order, byte-identical members


def test_url_rows_are_refused_per_row(tmp_path):
    src = tmp_path / "u.csv"
    (tmp_path / "a.jpg").write_bytes(_jpeg(_photo(0, 20, 20)))
    src.write_text("url,caption\nhttps://example.com/a.jpg,remote\na.jpg,local\n")
    summary = run_shard(_opts([src], tmp_path / "out", columns=Columns(image="url")))
    assert summary["failures"] == {"unsupported_url": 1} and summary["samples"] == 1


# ------------------------------------------------------------------------------------------- image processing

@pytest.mark.parametrize("mode, size, expected", [
    ("keep_ratio", 32, (48, 32)), ("keep_ratio_largest", 32, (32, 21)), ("center_crop", 32, (32, 32)),
    ("pad", 32, (32, 32)), ("keep_ratio", 120, (180, 120)),
])
def test_resize_modes(mode, size, expected):
    src = _jpeg(_photo(0, 300, 200))
    out = process_image(src, ImageSettings(size=size, resize_mode=mode, encode_format="jpg"))
    img = Image.open(io.BytesIO(out.data))
    assert img.size == expected == (out.width, out.height) and out.ext == "jpg"
    assert (out.original_width, out.original_height) == (300, 200)


def test_pad_keeps_the_picture_centred_and_no_upscale_keeps_small_images():
    out = process_image(_png(Image.new("RGB", (40, 20), (255, 0, 0))),
                        ImageSettings(size=40, resize_mode="pad", encode_format="png"))
    img = np.asarray(Image.open(io.BytesIO(out.data)))
    assert img.shape == (40, 40, 3) and tuple(img[20, 20]) == (255, 0, 0) and tuple(img[2, 20]) == (0, 0, 0)
    small = _jpeg(_photo(0, 30, 20))
    kept = process_image(small, ImageSettings(size=64, resize_mode="keep_ratio", upscale=False))
    assert kept.data == small and (kept.width, kept.height) == (30, 20)  # nothing to do: stored unchanged


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    src = _jpeg(_photo(0, 60, 40), exif=exif.tobytes())
    kept = process_image(src, ImageSettings())  # even without a resize: the stored pixels must be upright
    assert (kept.width, kept.height) == (40, 60) and Image.open(io.BytesIO(kept.data)).size == (40, 60)
    assert Image.open(io.BytesIO(kept.data)).getexif().get(0x0112) is None
    resized = process_image(src, ImageSettings(size=20, resize_mode="keep_ratio_largest"))
    assert (resized.width, resized.height) == (13, 20)


def test_webp_reencode_quality_and_format_passthrough():
    src = _jpeg(_photo(0, 100, 80))
    hi = process_image(src, ImageSettings(encode_format="webp", quality=90))
    lo = process_image(src, ImageSettings(encode_format="webp", quality=20))
    assert hi.ext == lo.ext == "webp" and len(lo.data) < len(hi.data)
    assert Image.open(io.BytesIO(hi.data)).format == "WEBP"
    gif = io.BytesIO()
    _photo(0, 20, 20).convert("P").save(gif, "GIF")
    assert process_image(gif.getvalue(), ImageSettings()).ext == "jpg"  # loaders read jpg/png/webp only


def test_decompression_bomb_refused_under_an_explicit_cap():
    src = _png(Image.new("L", (300, 300)))
    with pytest.raises(ImageFailure) as e:
        process_image(src, ImageSettings(max_pixels=300 * 299))
    assert e.value.reason == "image_too_large"
    assert process_image(src, ImageSettings(max_pixels=300 * 300)).width == 300


def test_sanitize_key():
    assert sanitize_key("a/b/c.jpg") == "a/b/c_jpg"
    assert sanitize_key("./x/../y") == "x/y"
    assert sanitize_key("  ") is None and sanitize_key("bad\udcff") is None


# ------------------------------------------------------------------------------------------- layout options

def _mixed_table(tmp_path, n=60, dup_every=0):
    imgs = [_jpeg(_photo(i if not dup_every or i % dup_every else 0, 24, 24)) for i in range(n)]
    src = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"image": imgs, "caption": [f"c{i}" for i in range(n)],
                             "key": [f"key{i}" for i in range(n)]}), src)
    return src


def test_val_split_is_deterministic_by_key_hash(tmp_path):
    src = _mixed_table(tmp_path)
    kw = dict(columns=Columns(key="key"), val_fraction=0.25, samples_per_shard=10)
    s = run_shard(_opts([src], tmp_path / "a", **kw))
    assert set(s["splits"]) == {"train", "val"}
    train, val = _read_all(s["patterns"]["train"]), _read_all(s["patterns"]["val"])
    assert not set(train) & set(val) and len(train) + len(val) == 60 == s["samples"]
    assert 5 <= len(val) <= 25
    assert json.loads((tmp_path / "a" / "val" / "summary.json").read_text())["samples"] == len(val)
    for split, keys in (("train", train), ("val", val)):  # one manifest per split directory
        assert sum(json.loads((tmp_path / "a" / split / "manifest.json").read_text())["samples"]) == len(keys)
    assert s["patterns"]["val"].endswith("val/val-{000000..%06d}.tar" % (s["splits"]["val"]["shards"] - 1))
    # a different row order (and another input file) sends every key to the same split
    shuffled = pq.read_table(src).take(list(reversed(range(60))))
    pq.write_table(shuffled, tmp_path / "reversed.parquet")
    s2 = run_shard(_opts([tmp_path / "reversed.parquet"], tmp_path / "b", **kw))
    assert set(_read_all(s2["patterns"]["val"])) == set(val)


def test_dedup_by_image_hash(tmp_path):
    src = _mixed_table(tmp_path, n=30, dup_every=10)  # rows 10 and 20 repeat row 0's picture
    s = run_shard(_opts([src], tmp_path / "out", columns=Columns(key="key"), dedup_image=True))
    assert s["failures"] == {"duplicate_image": 2}
    failures = pq.read_table(tmp_path / "out" / "failures.parquet").to_pylist()
    assert [f["key"] for f in failures] == ["key10", "key20"] and "key0" in failures[0]["detail"]


def test_resume_with_split_and_image_dedup_redoes_only_the_missing_shards(tmp_path):
    """A previous run that stopped at different points in train and val (final tar missing, stray .tmp and
    stats left behind): the rerun keeps the complete shards and ends with the reference output."""
    src = _mixed_table(tmp_path, n=80, dup_every=7)
    kw = dict(columns=Columns(key="key"), val_fraction=0.3, samples_per_shard=6, dedup_image=True)
    ref = run_shard(_opts([src], tmp_path / "ref", **kw))
    assert ref["failures"] == {"duplicate_image": 11}
    expected = _files(tmp_path / "ref")
    out = tmp_path / "out"
    run_shard(_opts([src], out, **kw))
    (out / "summary.json").unlink()
    kept = {"train": 3, "val": 1}
    for split, n in kept.items():
        for tar in sorted((out / split).glob(f"{split}-*.tar"))[n:]:
            if tar.name.endswith(f"{n + 1:06d}.tar"):
                tar.rename(tar.with_name(tar.name + ".tmp"))  # as if killed while writing it
            else:
                tar.unlink()
    s = run_shard(_opts([src], out, **kw, workers=2))
    assert s["this_run"]["rows_processed"] < 80 and not list(out.rglob("*.tmp"))
    got = _files(out)
    assert sorted(got) == sorted(expected) and all(got[k] == expected[k] for k in got)
    same = lambda summary: {split: {k: v for k, v in x.items() if k != "pattern"} for split, x in summary["splits"].items()}
    assert s["failures"] == ref["failures"] and same(s) == same(ref)


def test_byte_cap_cuts_shards(tmp_path):
    src = _mixed_table(tmp_path)
    s = run_shard(_opts([src], tmp_path / "out", max_shard_bytes=20_000))
    sizes = [p.stat().st_size for p in sorted((tmp_path / "out").glob("shard-*.tar"))]
    assert len(sizes) == s["shards"] > 3 and max(sizes) <= 20_000
    assert len(_read_all(s["pattern"])) == 60


# ------------------------------------------------------------------------------------------- CLI

def test_failure_rate_over_the_threshold_exits_non_zero_with_the_summary(planted, tmp_path, capsys):
    args = ["shard", "--input", str(planted["csv"]), "--output", str(tmp_path / "out"), "--key-col", "id",
            "--workers", "0", "--no-progress"]
    assert main(args + ["--max-failure-rate", "0.1"]) == 1
    captured = capsys.readouterr()
    assert "failures by reason" in captured.out and "missing_file" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 13 of 53 rows failed")
    assert (tmp_path / "out" / "summary.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--input", "{tmp}/missing.csv"], "not found"),
    (["--input", "{tmp}/data.xyz"], "cannot tell the format"),
    (["--input", "{tmp}/data.csv", "--format", "xml"], "invalid choice"),
    (["--input", "{tmp}/data.csv", "--samples-per-shard", "0"], "--samples-per-shard must be > 0"),
    (["--input", "{tmp}/data.csv", "--workers", "two"], "invalid int value"),
    (["--input", "{tmp}/data.csv", "--image-col", "nope"], "--image-col 'nope' is not a column"),
    (["--input", "{tmp}/data.csv", "--resize-mode", "pad"], "needs --image-size"),
    (["--input", "{tmp}/data.csv", "--val-fraction", "1.5"], "--val-fraction"),
    (["--input", "{tmp}/data.csv", "--max-shard-bytes", "lots"], "not a size"),
    (["--input", "{tmp}/data.csv", "--quality", "0"], "--quality"),
    ([], "required: --input"),
    (["--input", "{tmp}/data.csv", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_cli_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    (tmp_path / "data.csv").write_text("image,caption\na.jpg,x\n")
    (tmp_path / "data.xyz").write_text("")
    argv = ["shard", "--output", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in extra]]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_output_holding_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "data.csv").write_text("image,caption\na.jpg,x\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    assert main(["shard", "--input", str(tmp_path / "data.csv"), "--output", str(tmp_path / "out"),
                 "--overwrite"]) == 2
    assert "not written by `shard`" in capsys.readouterr().err
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- webdataset 0.2.x

READ_BACK = """
import hashlib, json, sys
import webdataset as wds
out = []
for s in wds.WebDataset(sys.argv[1]):
    out.append([s["__key__"], {k: hashlib.sha256(v).hexdigest() for k, v in s.items() if not k.startswith("__")}])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_webdataset_0_2_reads_the_same_samples(planted):
    venv = REPO / "runs" / "venv-webdataset-0.2"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "webdataset>=0.2,<0.3"], check=True, timeout=600)
    version = subprocess.run([str(python), "-c", "import webdataset; print(webdataset.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("0.2."), version
    proc = subprocess.run([str(python), "-c", READ_BACK, planted["summary"]["pattern"]], capture_output=True,
                          text=True, check=True, timeout=300)
    theirs = json.loads(proc.stdout)
    ours = _read_all(planted["summary"]["pattern"])
    assert [k for k, _ in theirs] == list(ours)
    for key, digests in theirs:
        assert digests == {ext: hashlib.sha256(v).hexdigest() for ext, v in ours[key].items()}
