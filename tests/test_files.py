"""colm.files: whole files or none."""

from __future__ import annotations

import numpy as np
import pytest

from colm.files import atomic_write, write_text_atomic


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"  # the folder is created
    assert write_text_atomic(path, "one") == path
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_error_inside_keeps_the_old_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="stop"), atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("stop")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_binary_mode_round_trips_numpy(tmp_path):
    path = tmp_path / "e.npy"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with atomic_write(path, "wb") as f:
        np.save(f, x)
    np.testing.assert_array_equal(np.load(path), x)


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must be"), atomic_write(tmp_path / "x", "a"):
        pass
