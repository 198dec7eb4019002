"""The files this project writes (fileio): one temp-file rule, whose names no user's file has and whose
stale leftovers are removed only for the file being written; no write replaces what is not a regular
file of ours to replace (a device, a FIFO, a link to one, a folder, a read-only file); a full disk
names the file; a name too long fails before the work."""
import contextlib
import os
import re
import shutil
import stat
import subprocess

import pytest
import torch

import data
import errors
import fileio

MARK = fileio.TMP_MARK


def dead_pid():
    """A pid no process has now (the largest free one: never this test's or its parent's)."""
    return next(p for p in range(fileio.PID_MAX, 1, -1) if not fileio.pid_alive(p))


def test_only_stale_temps_of_the_file_written_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    ours = [f".report.json.{dead}{MARK}", f".bn_fc.onnx.{dead}{MARK}.onnx"]  # a killed writer's, of these outputs
    kept = ["holiday.2019.tmp.jpg", "notes.12345.tmp", f"x.{'9' * 20}.tmp", f"report.json.{dead}.tmp",
            "report.json.tmp",
            f".report.json.{'9' * 20}{MARK}",  # no process has that pid: not a name this project writes
            f".report.json.{alive}{MARK}",     # a running writer's
            f".other.json.{dead}{MARK}"]       # a stale temp of an output not written now
    for name in ours + kept:
        (tmp_path / name).write_bytes(b"x")
    fileio.check_out_dir(str(tmp_path), "--out")  # checking a folder removes nothing
    assert sorted(os.listdir(tmp_path)) == sorted(ours + kept)
    fileio.save_json({"a": 1}, str(tmp_path / "report.json"))
    with fileio.staged(str(tmp_path / "bn_fc.onnx"), ".onnx") as tmp:
        fileio.write_synced(tmp, lambda f: f.write(b"onnx"))
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["report.json", "bn_fc.onnx"])


def test_every_name_that_fits_can_be_written(tmp_path):
    """A 255-byte name leaves no room for a pid and a mark: its temp file is named by its hash."""
    long = tmp_path / ("a" * 250 + ".json")
    stale = tmp_path / os.path.basename(fileio.tmp_path(str(long), pid=dead_pid()))
    stale.write_bytes(b"x")
    fileio.save_json({"a": 1}, str(long))
    assert sorted(os.listdir(tmp_path)) == [long.name]
    with pytest.raises(errors.UserError, match=r"file name too long \(256 bytes; the limit is 255\)"):
        fileio.check_out_file(str(tmp_path / ("a" * 251 + ".json")), "--json")


@pytest.fixture
def odd_files(tmp_path):
    """name -> what the refusal says, for what may stand at an output's name."""
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/null", tmp_path / "to-null")
    os.symlink("/proc/self/fd/1", tmp_path / "to-stdout")
    (tmp_path / "folder").mkdir()
    os.symlink("folder", tmp_path / "to-folder")
    (tmp_path / "ro").write_text("keep me")
    os.chmod(tmp_path / "ro", 0o444)
    odd = {"fifo": "is a FIFO, not a regular file", "to-null": "is a symbolic link to /dev/null (in /dev)",
           "to-stdout": "is a symbolic link to /proc/self/fd/1 (in /proc)", "folder": "is a folder, not a file",
           "to-folder": "is a symbolic link to a folder", "ro": "is read-only: refusing to replace it"}
    with contextlib.suppress(PermissionError):  # root only: a device node of our own, /dev/null's twin
        os.mknod(tmp_path / "device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        odd["device"] = "is a character device, not a regular file"
    return odd


def entry(path):
    st = os.lstat(path)
    return st.st_mode, st.st_ino, os.readlink(path) if stat.S_ISLNK(st.st_mode) else None


def test_what_is_not_a_regular_file_of_ours_is_never_replaced(tmp_path, odd_files):
    before = {n: entry(tmp_path / n) for n in odd_files}
    for name, says in odd_files.items():
        path = str(tmp_path / name)
        with pytest.raises(errors.UserError, match="^" + re.escape(f"--json {path} {says}")):
            fileio.check_out_file(path, "--json")  # before the work
        for write in (lambda: fileio.save_text("new", path), lambda: fileio.replace_all({path: b"new"})):
            with pytest.raises(errors.UserError, match="^" + re.escape(f"{path} {says}")):  # and at the write itself
                write()
    assert {n: entry(tmp_path / n) for n in odd_files} == before
    assert (tmp_path / "ro").read_text() == "keep me" and not [n for n in os.listdir(tmp_path) if MARK in n]


def test_a_file_or_a_link_to_one_is_replaced_with_its_mode_kept(tmp_path):
    (tmp_path / "private").write_text("old")
    os.chmod(tmp_path / "private", 0o600)
    (tmp_path / "elsewhere").write_text("not yours")
    os.symlink("elsewhere", tmp_path / "link")
    os.symlink("nowhere", tmp_path / "dangling")
    for name in ("private", "link", "dangling"):
        fileio.save_text("new", str(tmp_path / name))
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600 and (tmp_path / "private").read_text() == "new"
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "elsewhere").read_text() == "not yours"
    assert (tmp_path / "dangling").read_text() == "new"


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder with 64 KiB of room: a tmpfs where this runs as root and may mount one, else a stand-in
    that fails every write past 64 KiB with ENOSPC, as the disk would."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        written, real = [0], fileio._Recorded.write

        def write(self, b):
            written[0] += len(b)
            if written[0] > 64 << 10:
                raise OSError(28, "No space left on device")
            return real(self, b)
        monkeypatch.setattr(fileio._Recorded, "write", write)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_names_the_file_and_leaves_nothing(small_disk):
    """torch's writers turn the OSError into a RuntimeError naming neither the error nor the file: the
    error is still "No space left on device" with the file the user asked for."""
    writes = {"last.pt": lambda p: fileio.atomic_write(p, lambda f: torch.save({"w": torch.zeros(100_000)}, f)),
              "summary.json": lambda p: fileio.save_text("x" * 200_000, p),
              "report.html": lambda p: fileio.replace_all({str(small_disk / "a.png"): b"a", p: b"x" * 200_000})}
    for name, write in writes.items():
        path = str(small_disk / name)
        with pytest.raises(OSError) as e:
            write(path)
        assert errors.error_line(e.value) == f"error: No space left on device: {path}"
        assert os.listdir(small_disk) == []


def test_mnist_dir_naming_a_file_says_so(tmp_path, monkeypatch):
    (tmp_path / "mnist.tar").write_bytes(b"x")
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "mnist.tar"))
    with pytest.raises(data.DataError, match=r"^\$MNIST_DIR .*mnist.tar is a file, not a folder"):
        data.resolve_dir()
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="does not exist"):
        data.resolve_dir()
