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
