import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.data import pipe_command, remote
from pipeline.data.loader import DataError, ShardSet
from pipeline.data.remote import PipeSource, fetch_pipe, is_pipe, resolve_sources
from pipeline.data.shard_index import INDEX_SCHEMA, index_path, scan_tar
from pipeline.shard.writer import ShardWriter


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two small shards with their indexes (1.5 MB and 0.2 MB of caption + payload members)."""
    out = tmp_path_factory.mktemp("remote_src")
    with ShardWriter(out, prefix="train", samples_per_shard=24) as w:
        for i in range(28):
            w.write(f"{i:06d}", {"txt": f"caption {i}", "bin": os.urandom(60_000 + i)})
    return w.shards


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that have not exited: neither zombies (Z) nor being reaped (X; an
    orphaned zombie may be reaped by init while we look)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


@pytest.fixture
def command_groups(monkeypatch) -> list[int]:
    """The process group ids of the commands fetched during the test (each shell leads a group of its own),
    known from the moment it is started: a pid the shell writes itself may not be written yet when a fetch
    is cancelled on a busy machine."""
    groups = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            groups.append(self.pid)

    monkeypatch.setattr(pipe_command.subprocess, "Popen", RecordingPopen)
    return groups


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp")) if cache.exists() else []


def test_names_and_index_command():
    s = PipeSource("pipe:aws s3 cp s3://bucket/laion/train-000001.tar -")
    assert is_pipe(s.url) and not is_pipe("data/train-000001.tar")
    assert s.command == "aws s3 cp s3://bucket/laion/train-000001.tar -"
    assert s.cache_name.endswith("-train-000001.tar") and len(s.cache_name) == 16 + 1 + len("train-000001.tar")
    assert s.index_command == "aws s3 cp s3://bucket/laion/train-000001.index.parquet -"
    assert PipeSource("pipe:aws s3 cp s3://other/laion/train-000001.tar -").cache_name != s.cache_name
    q = PipeSource("pipe:curl -sfL 'https://host/x/train-7.tar?sig=ab' | cat")
    assert q.cache_name.endswith("-train-7.tar")
    assert q.index_command == "curl -sfL 'https://host/x/train-7.index.parquet?sig=ab' | cat"
    assert PipeSource("pipe:make-shard --id 3").index_command is None
    assert PipeSource("pipe:make-shard --id 3").cache_name.endswith("-shard.tar")
    with pytest.raises(DataError):
        PipeSource("pipe:  ")


def test_cat_gives_identical_copy_and_uses_the_sidecar_index(shards, tmp_path, monkeypatch):
    src = tmp_path / "remote" / "train-000000.tar"  # a copy we may delete
    src.parent.mkdir()
    shutil.copy(shards[0], src)
    shutil.copy(index_path(shards[0]), index_path(src))
    cache = tmp_path / "cache"
    monkeypatch.setattr(remote, "scan_tar", lambda p: pytest.fail("the index should have been fetched"))
    got = fetch_pipe(f"pipe:cat {src}", cache, timeout_s=30, stall_timeout_s=5)
    assert got.parent == cache and got.name.endswith("-train-000000.tar")
    assert got.read_bytes() == src.read_bytes()
    assert index_path(got).read_bytes() == index_path(src).read_bytes()  # the fetched sidecar, not a rebuilt one
    assert index_path(got).stat().st_mtime >= got.stat().st_mtime  # load_or_build_index will not rebuild it
    assert leftovers(cache) == []
    shutil.rmtree(src.parent)  # cached: returned without running the command again
    assert fetch_pipe(f"pipe:cat {src}", cache, timeout_s=30, stall_timeout_s=5) == got
    assert ShardSet([str(got)]).total == 24


def test_index_is_built_when_the_sidecar_is_missing_or_wrong(shards, tmp_path):
    lone = tmp_path / "remote" / "train-000005.tar"
    lone.parent.mkdir()
    shutil.copy(shards[1], lone)  # no index beside it
    got = fetch_pipe(f"pipe:cat {lone}", tmp_path / "cache", timeout_s=30, stall_timeout_s=5)
    assert pq.read_table(index_path(got), schema=INDEX_SCHEMA).equals(scan_tar(shards[1]))
    # an index that does not fit the tar (the big shard's, beside the small one) is replaced by a built one
    shutil.copy(index_path(shards[0]), index_path(lone))
    got2 = fetch_pipe(f"pipe:cat -- {lone}", tmp_path / "cache", timeout_s=30, stall_timeout_s=5)
    assert got2 != got
    assert pq.read_table(index_path(got2), schema=INDEX_SCHEMA).equals(scan_tar(shards[1]))
    s = ShardSet([str(got2)])
    assert s.total == 4 and s.read(3)[1]["txt"] == b"caption 27"
    # an index whose byte ranges lie inside the tar but name other samples (the small shard's, beside a copy
    # of the big one) is caught by the tar headers it points at
    big = tmp_path / "remote" / "train-000006.tar"
    shutil.copy(shards[0], big)
    shutil.copy(index_path(shards[1]), index_path(big))
    got3 = fetch_pipe(f"pipe:cat {big}", tmp_path / "cache", timeout_s=30, stall_timeout_s=5)
    assert ShardSet([str(got3)]).total == 24


def test_stall_is_killed_with_its_process_group(shards, tmp_path, command_groups):
    cache = tmp_path / "cache"
    url = f"pipe:sleep 30; cat {shards[0]}"
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        fetch_pipe(url, cache, timeout_s=60, stall_timeout_s=1)
    assert time.monotonic() - start < 4
    msg = str(e.value)
    assert "\n" not in msg and "sleep 30" in msg and "no data for 1s" in msg, msg
    assert len(command_groups) == 1 and live_group_members(command_groups[0]) == []
    assert leftovers(cache) == [] and not PipeSource(url).cached_path(cache).exists()


def test_stall_after_some_data_and_total_timeout(shards, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"no data for 1s \(1000 bytes so far\)"):
        fetch_pipe(f"pipe:head -c 1000 {shards[0]}; sleep 30", cache, timeout_s=60, stall_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(DataError, match="took longer than 1.5s"):  # trickles: never stalls, never ends
        fetch_pipe("pipe:while true; do echo x; sleep 0.1; done", cache, timeout_s=1.5, stall_timeout_s=1)
    assert time.monotonic() - start < 4
    assert leftovers(cache) == []


def test_failing_commands_name_the_command_and_quote_stderr(tmp_path):
    cache = tmp_path / "cache"
    missing = tmp_path / "nope" / "train-000009.tar"
    with pytest.raises(DataError) as e:
        fetch_pipe(f"pipe:cat {missing}", cache, timeout_s=10, stall_timeout_s=5)
    msg = str(e.value)
    assert "\n" not in msg and f"pipe:cat {missing}" in msg and "exited with status 1" in msg
    assert "No such file or directory" in msg, msg
    with pytest.raises(DataError, match=r"pipe:false: exited with status 1$"):
        fetch_pipe("pipe:false", cache, timeout_s=10, stall_timeout_s=5)
    with pytest.raises(DataError, match="not a readable tar|no samples"):
        fetch_pipe("pipe:echo this is not a tar", cache, timeout_s=10, stall_timeout_s=5)
    with pytest.raises(DataError, match="wrote nothing"):
        fetch_pipe("pipe:true", cache, timeout_s=10, stall_timeout_s=5)
    assert leftovers(cache) == [] and [p for p in cache.iterdir() if not p.name.startswith(".")] == []


def test_exception_mid_stream_leaves_no_partial_file(shards, tmp_path, monkeypatch, command_groups):
    cache = tmp_path / "cache"
    url = f"pipe:cat {shards[0]}; sleep 30"
    calls = []

    def failing_write(out, data):
        calls.append(len(data))
        out.write(data)
        if len(calls) == 1:
            raise RuntimeError("interrupted mid-stream")

    monkeypatch.setattr(pipe_command, "_write", failing_write)
    with pytest.raises(RuntimeError, match="interrupted"):
        fetch_pipe(url, cache, timeout_s=30, stall_timeout_s=5)
    assert len(command_groups) == 1 and live_group_members(command_groups[0]) == []
    final = PipeSource(url).cached_path(cache)
    assert not final.exists() and not index_path(final).exists() and leftovers(cache) == []


def test_resolve_sources_keeps_order_and_mixes_local_and_pipe(shards, tmp_path):
    a, b = map(str, shards)
    got = resolve_sources([f"pipe:cat {a}", b, f"file:{a}", f"pipe:cat {b}", f"pipe:cat {a}"], tmp_path / "c",
                          timeout_s=30, stall_timeout_s=5, prefetch=2)
    assert got[1] == b and got[2] == a and got[0] == got[4] and got[0] != got[3]
    assert [Path(p).read_bytes() for p in got] == [Path(p).read_bytes() for p in (a, b, a, b, a)]
    s = ShardSet(got)
    assert s.counts.tolist() == [24, 4, 24, 4, 24]
    assert resolve_sources([a, b], cache_dir="") == [a, b]  # nothing to fetch, no cache needed
    with pytest.raises(DataError, match="no cache directory"):
        resolve_sources([f"pipe:cat {a}"], cache_dir="")


def test_resolve_sources_first_failure_cancels_the_rest(shards, tmp_path, command_groups):
    slow = f"pipe:sleep 30; cat {shards[0]}"
    start = time.monotonic()
    with pytest.raises(DataError, match="pipe:cat /nonexistent/train-000001.tar: exited"):
        resolve_sources([slow, "pipe:cat /nonexistent/train-000001.tar"], tmp_path / "c",
                        timeout_s=60, stall_timeout_s=20, prefetch=2)
    assert time.monotonic() - start < 5  # not the 20 s stall of the first one
    assert command_groups and [g for g in command_groups if live_group_members(g)] == []
    assert leftovers(tmp_path / "c") == []


def test_concurrent_fetches_of_one_shard_run_the_command_once(shards, tmp_path):
    counter = tmp_path / "runs"
    url = f"pipe:echo x >> {counter}; sleep 0.5; cat {shards[1]}"  # the index command also appends one line
    results, errors = [], []

    def fetch():
        try:
            results.append(fetch_pipe(url, tmp_path / "c", timeout_s=30, stall_timeout_s=5))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert counter.read_text().count("x") == 2  # one tar fetch + one index fetch
