"""Writes are atomic: an interrupted or failed save never damages the file already at the path."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mithril_gpu
from conftest import assert_same, subprocess_env


def test_exception_during_save_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "ckpt.mth"
    old = {"w": torch.arange(10.0)}
    mithril_gpu.save(old, path)
    before = path.read_bytes()

    def boom(_n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mithril_gpu.save({"w": torch.randn(1_000_000)}, path, progress=boom)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.mth"]
    assert_same(mithril_gpu.load(path)["w"], old["w"])


def test_killed_save_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.mth"
    mithril_gpu.save({"w": torch.arange(10.0)}, path)
    before = path.read_bytes()
    script = (
        "import sys, time, torch, mithril_gpu\n"
        "def slow(n):\n"
        "    print('writing', flush=True); time.sleep(0.05)\n"
        f"mithril_gpu.save({{'w': torch.randn(4_000_000)}}, {str(path)!r}, threads=1, progress=slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            env=subprocess_env())
    assert proc.stdout.readline().strip() == b"writing"      # it is mid-save now
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == before
    assert mithril_gpu.load(path)["w"].shape == (10,)


def test_new_file_gets_normal_permissions(tmp_path):
    path = tmp_path / "x.mth"
    mithril_gpu.save({"a": torch.ones(1)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(path).st_mode & 0o777) == (0o666 & ~umask)


def test_stale_temp_files_are_removed_by_the_next_save_but_live_ones_are_not(tmp_path):
    """A SIGKILLed save leaves its temp file; the next save into that directory removes it, but
    never the temp file of a writer that is still alive (it holds a lock on it)."""
    path = tmp_path / "ckpt.mth"
    script = (
        "import sys, time, torch, mithril_gpu\n"
        "def slow(n):\n"
        "    print('writing', flush=True); time.sleep(60)\n"
        f"mithril_gpu.save({{'w': torch.randn(300_000)}}, {str(path)!r}, threads=1, progress=slow)\n"
    )
    live = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=subprocess_env())
    dead = subprocess.Popen([sys.executable, "-c", script.replace("ckpt.mth", "other.mth")], stdout=subprocess.PIPE,
                            env=subprocess_env())
    try:
        assert live.stdout.readline().strip() == b"writing" and dead.stdout.readline().strip() == b"writing"
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        temps = lambda: sorted(f for f in os.listdir(tmp_path) if f.endswith(".tmp"))  # noqa: E731
        assert len(temps()) == 2 and all(".mithril-" in f for f in temps())
        mithril_gpu.save({"x": torch.ones(3)}, tmp_path / "third.mth")
        left = temps()
        assert len(left) == 1 and left[0].startswith(".ckpt.mth.mithril-")      # the live writer's file stays
    finally:
        live.kill()
        live.wait()
    mithril_gpu.save({"x": torch.ones(3)}, tmp_path / "third.mth")
    assert temps() == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_device_or_a_pipe_is_never_replaced_by_a_file(tmp_path):
    """The atomic rename would put a regular file in the place of a FIFO or a device node: as
    root, ``mithril compress x /dev/null -f`` (a way to time a compression) replaced /dev/null
    itself. Such targets are refused before anything is written."""
    import stat as stat_mod

    targets = [tmp_path / "pipe"]
    os.mkfifo(targets[0])
    if os.geteuid() == 0:                                  # a null device of our own (mknod needs root)
        os.mknod(tmp_path / "null", 0o644 | stat_mod.S_IFCHR, os.makedev(1, 3))
        targets.append(tmp_path / "null")
    for t in targets:
        with pytest.raises(mithril_gpu.MithrilError, match="not a regular file"):
            mithril_gpu.save({"a": torch.ones(3)}, t)
        assert not stat_mod.S_ISREG(os.lstat(t).st_mode)
    (tmp_path / "link").symlink_to(targets[-1])
    with pytest.raises(mithril_gpu.MithrilError, match="not a regular file"):
        mithril_gpu.save({"a": torch.ones(3)}, tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([t.name for t in targets] + ["link"])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_a_filesystem_without_flock_still_takes_saves(tmp_path, monkeypatch):
    """Lustre mounted without -o flock (and some NFS setups) answer flock with ENOSYS or ENOLCK.
    The temp file's lock and the Checkpointer's folder lock are then skipped: saving failed
    outright ("could not create a temp file") after 100 tries."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    state = {"a": torch.arange(10.0)}
    mithril_gpu.save(state, tmp_path / "x.mth")
    assert_same(mithril_gpu.load(tmp_path / "x.mth")["a"], state["a"])
    ck = mithril_gpu.Checkpointer(tmp_path / "ck", keep=2, full_every=1)
    for step in range(3):
        state["a"] += 1
        ck.save(state, step)
    assert ck.steps() == [1, 2] and torch.equal(ck.load(2)["a"], state["a"])
    assert not [n for n in os.listdir(tmp_path / "ck") if n.endswith(".tmp")]


def test_a_path_with_no_file_or_no_folder_is_refused_before_any_work(tmp_path):
    """An OUT ending in '/', or '', ran the whole compression into a temp in the parent folder
    before failing at the rename; a missing folder was reported by the temp file's name."""
    import pytest
    import torch

    import mithril_gpu

    with pytest.raises(FileNotFoundError, match=f"no folder {tmp_path / 'nope'} to write x.mth in"):
        mithril_gpu.save({"w": torch.ones(3)}, tmp_path / "nope" / "x.mth")
    for p in (str(tmp_path / "nope") + "/", ""):
        with pytest.raises(IsADirectoryError, match="names no file"):
            mithril_gpu.save({"w": torch.ones(3)}, p)
    assert os.listdir(tmp_path) == []
