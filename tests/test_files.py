"""The shared file helpers: atomic outputs with per-writer temporaries, whole-line appends, JSON keys."""

import json
import os

import pytest

from ds_dualparal.files import (
    DuplicateKeyError,
    OutputError,
    append_line,
    atomic_output,
    free_port,
    no_duplicate_keys,
)


def test_two_writers_of_one_output_get_their_own_temporaries(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(FileExistsError, match="appeared while it was written"):
        with atomic_output(path) as first:
            first.write_bytes(b"first")
            with atomic_output(path) as second:
                assert first != second and first.parent == second.parent == tmp_path
                assert first.name.startswith(".v.mp4.") and first.name.endswith(".partial")
                second.write_bytes(b"second")
                assert first.read_bytes() == b"first"  # a live writer's temporary is not touched
            assert path.read_bytes() == b"second"
    # the first writer, without overwrite, does not replace what the second finished
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "l.safetensors") as partial:
            partial.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_dead_writers_temporary_is_removed_and_the_mode_is_the_usual_one(tmp_path):
    stale = tmp_path / ".v.mp4.abc123.partial"
    stale.write_bytes(b"left by a killed run")
    with atomic_output(tmp_path / "v.mp4") as partial:
        assert not stale.exists()
        partial.write_bytes(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_folder_output_appears_whole(tmp_path):
    path = tmp_path / "frames"
    path.mkdir()  # empty: made beforehand, not an output to keep
    with atomic_output(path, folder=True) as partial:
        (partial / "frame_000000.png").write_bytes(b"png")
        assert list(path.iterdir()) == []
    assert [p.name for p in path.iterdir()] == ["frame_000000.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


def test_an_unwritable_place_is_one_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"cannot write {blocker}/v.mp4: ") as info:
        with atomic_output(blocker / "v.mp4"):
            pass
    assert "\n" not in str(info.value)


def test_append_line_starts_a_new_line_after_a_torn_one(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    append_line(manifest, '{"a": 1}')
    with open(manifest, "a") as f:
        f.write('{"b": ')  # a crash while appending
    append_line(manifest, '{"c": 3}')
    assert manifest.read_text().splitlines() == ['{"a": 1}', '{"b": ', '{"c": 3}']
    os.mkdir(tmp_path / "folder")
    with pytest.raises(OSError):
        append_line(tmp_path / "folder", "{}")


def test_duplicate_keys_and_free_port():
    with pytest.raises(DuplicateKeyError, match="duplicate key 'a'") as info:
        json.loads('{"a": 1, "b": {"a": 2}, "a": 3}', object_pairs_hook=no_duplicate_keys)
    assert info.value.key == "a"
    assert json.loads('{"a": {"a": 1}}', object_pairs_hook=no_duplicate_keys) == {"a": {"a": 1}}
    assert 0 < free_port() < 65536
