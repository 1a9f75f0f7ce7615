"""Atomic writes: the whole new file or the old one, the rename made durable, errors in one line."""

import errno
import os
import stat

import pytest

from plait import atomic
from plait.atomic import WriteError, atomic_write, atomic_write_text, temp_files


def test_the_file_is_fsynced_replaced_then_its_directory_fsynced(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "sub" / "eval.json"
    assert atomic_write_text(target, "{}") == target
    assert events == ["fsync file", "replace", "fsync dir"]
    assert target.read_text() == "{}" and temp_files(target.parent) == []


def test_a_platform_that_cannot_open_directories_still_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_directories(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied")  # as on Windows
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_directories)
    atomic_write(tmp_path / "w.bin", lambda handle: handle.write(b"\x00\x01"))
    assert (tmp_path / "w.bin").read_bytes() == b"\x00\x01"


def test_disk_full_mid_file_keeps_the_old_bytes_leaves_no_temp_file_and_says_so_in_one_line(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_write(target, lambda handle: handle.write(b"old checkpoint " * 100))
    old = target.read_bytes()

    def half_then_full(handle):
        handle.write(b"new" * 500)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as caught:
        atomic_write(target, half_then_full)
    error = caught.value
    assert isinstance(error, OSError) and isinstance(error, ValueError) and error.errno == errno.ENOSPC
    assert str(error) == f"could not write {target}: No space left on device (the previous checkpoint.pt is unchanged)"
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ENOSPC
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_new_file_that_fails_is_not_created_and_an_interrupt_passes_through(tmp_path, monkeypatch):
    def denied(handle):
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(WriteError, match=r"could not write .*new.json: Permission denied \(new.json was not created\)"):
        atomic_write(tmp_path / "new.json", denied)
    assert list(tmp_path.iterdir()) == []

    def interrupted(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.json", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_temp_files_lists_only_what_interrupted_atomic_writes_leave(tmp_path):
    for name in (".checkpoint.pt.tmp-a1b2", ".model.safetensors.tmp-zz", "keep.tmp", ".hidden", "metrics.jsonl"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in temp_files(tmp_path)] == [".checkpoint.pt.tmp-a1b2", ".model.safetensors.tmp-zz"]
    assert temp_files(tmp_path / "missing") == []
    assert atomic.TEMP_MARK == ".tmp-"


def test_a_new_file_gets_the_mode_open_would_give_and_a_replaced_file_keeps_its_mode(tmp_path):
    """mkstemp makes 0600 files; an output file must be as readable as one written with open()."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o600
        assert atomic.current_umask() == 0o077
        os.chmod(tmp_path / "a.json", 0o640)
        atomic_write_text(tmp_path / "a.json", "[]")  # replacing keeps the file's own mode, whatever the umask
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640 and (tmp_path / "a.json").read_text() == "[]"
    finally:
        os.umask(old)


def test_every_file_plait_writes_goes_through_atomic_write():
    """A scan of the package: every write (write_text, write_bytes, open for writing, np.save,
    torch.save, savefig) is inside a lambda handed to atomic_write, except the documented append
    to metrics.jsonl (a resume drops a torn last line)."""
    import ast
    from pathlib import Path

    import plait

    writers = {"write_text", "write_bytes", "savez", "savez_compressed", "savefig", "to_csv"}
    offenders = []
    root = Path(plait.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if path.name == "atomic.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def inside_lambda(node) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, ast.Lambda):
                    return True
            return False

        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            opened = name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str) and set(a.value) & set("wax")
                                            for a in node.args[1:2])
            saved = (name == "save" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                     and func.value.id in ("np", "torch"))
            if name in writers or opened or saved:
                if inside_lambda(node):
                    continue
                where = f"{path.relative_to(root)}:{node.lineno}"
                if where.startswith("training/metrics.py:") and opened:  # metrics.jsonl is appended to (MetricsLog.append)
                    continue
                offenders.append(where)
    assert offenders == []


def test_a_temp_dir_keeps_temporary_files_in_one_folder(tmp_path):
    target = tmp_path / "images" / "8" / "ab" / "key.npy"
    seen = []

    def write(handle):
        seen.extend(p.name for p in (tmp_path / "tmp").iterdir())
        handle.write(b"x")

    atomic_write(target, write, temp_dir=tmp_path / "tmp")
    assert len(seen) == 1 and seen[0].startswith(".key.npy.tmp-") and not any(target.parent.glob(".*"))
    assert target.read_bytes() == b"x" and list((tmp_path / "tmp").iterdir()) == []
