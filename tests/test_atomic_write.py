import pytest

from pipeline.atomic_write import write_atomic


@pytest.mark.parametrize("fsync", [False, True])
def test_text_bytes_and_callback_replace_the_file(tmp_path, fsync):
    path = tmp_path / "f"
    path.write_text("old")
    write_atomic(path, "new é", fsync=fsync)
    assert path.read_text(encoding="utf-8") == "new é"
    write_atomic(path, b"\x00\x01", fsync=fsync)
    assert path.read_bytes() == b"\x00\x01"
    write_atomic(path, lambda tmp: tmp.write_text("from a callback"), fsync=fsync)
    assert path.read_text() == "from a callback"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail, tmp_suffix=".123.tmp")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_the_temporary_name_is_the_callers(tmp_path):
    seen = []
    write_atomic(tmp_path / "m.json", lambda tmp: (seen.append(tmp.name), tmp.write_text("{}")), tmp_suffix=".42.tmp")
    assert seen == ["m.json.42.tmp"]
