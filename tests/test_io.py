"""Atomic writes: a crash mid-write leaves the old file and no temporary files."""

import pytest

from featurekit._io import atomic_write, atomic_write_text


def test_failed_write_leaves_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def half_then_crash(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
