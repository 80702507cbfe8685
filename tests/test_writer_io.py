"""The writer's I/O (writer.AtomicFile): payloads go to a writer thread in batches (one writev each,
writeback started as the file grows), a big file that is replaced is freed off the critical path,
and none of it weakens atomicity: a failed write leaves the old file and no temp behind."""
import errno
import os
import threading
import time

import numpy as np
import pytest
import torch

import mithril_gpu
from mithril_gpu import writer
from mithril_gpu.writer import AtomicFile

from conftest import _names


def _payloads(seed=0, n=300):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = int(rng.integers(0, 70_000))
        b = rng.integers(0, 256, size, dtype=np.uint8)
        out.append(b.tobytes() if i % 3 else b)              # bytes, and buffers the caller reuses
    return out


def test_batched_threaded_writes_give_the_same_bytes_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "FLUSH_BYTES", 256 << 10)      # many batches
    monkeypatch.setattr(writer, "SYNC_EVERY", 1 << 20)
    ranges = []
    monkeypatch.setattr(writer, "_start_writeback", lambda fd, off, n, flags: ranges.append((off, n)) or 0)
    threads = set()
    real = writer._write_all
    monkeypatch.setattr(writer, "_write_all", lambda fd, bufs: threads.add(threading.current_thread().name)
                        or real(fd, bufs))
    want, offsets = bytearray(), []
    with AtomicFile(tmp_path / "f") as out:
        for p in _payloads():
            raw = bytes(p)
            offsets.append((out.write(p), raw))
            if isinstance(p, np.ndarray):
                p[...] = 0                                    # reused right away: what was written stays
            want += raw
    data = (tmp_path / "f").read_bytes()
    assert data == bytes(want)
    assert all(data[at:at + len(raw)] == raw for at, raw in offsets)
    assert "mithril-writer" in threads                        # the batches went to the writer thread
    assert ranges and ranges[0][0] == 0                       # writeback started as the file grew
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    assert os.listdir(tmp_path) == ["f"]


def test_short_writes_are_continued(tmp_path, monkeypatch):
    real = os.writev
    monkeypatch.setattr(writer.os, "writev", lambda fd, bufs: real(fd, [memoryview(bufs[0])[:777]]))
    pay = _payloads(1, 40)
    with AtomicFile(tmp_path / "f") as out:
        for p in pay:
            out.write(p)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in pay)


def test_a_failed_write_on_the_writer_thread_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.mth"
    old = {"w": torch.arange(10.0)}
    mithril_gpu.save(old, path)
    before = path.read_bytes()

    def full(fd, bufs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer.os, "writev", full)
    with pytest.raises(OSError, match="No space"):
        mithril_gpu.save({"w": torch.randn(3_000_000)}, path)      # 12 MB: several batches
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.mth"]


def _hold_frees(monkeypatch):
    """Hold writer._free_old (the background close of a replaced big file) until released; returns
    (release, the descriptors held, a function that waits for the threads)."""
    held, fds = threading.Event(), []
    real = writer._free_old

    def slow_free(fd):
        fds.append(fd)
        held.wait(5)
        real(fd)
    monkeypatch.setattr(writer, "_free_old", slow_free)

    def join():
        for t in threading.enumerate():
            if t.name == "mithril-free-old":
                t.join(5)
    return held, fds, join


def test_a_replaced_big_file_is_freed_after_the_rename_and_leaves_no_name(tmp_path, monkeypatch):
    """The replaced file is held open across the rename and closed on a background thread (its
    blocks freed off the critical path); its name is gone when the save returns, so a folder
    listed or removed at once sees only the new file (shutil.rmtree used to race the thread that
    unlinked a second link)."""
    monkeypatch.setattr(writer, "OLD_FILE_BYTES", 1000)
    path = tmp_path / "ckpt.mth"
    mithril_gpu.save({"w": torch.randn(10_000)}, path)
    old_inode = os.stat(path).st_ino
    held, fds, join = _hold_frees(monkeypatch)
    new = {"w": torch.randn(10_000)}
    mithril_gpu.save(new, path)
    assert os.listdir(tmp_path) == ["ckpt.mth"]                    # no second name, even now
    for _ in range(100):
        if fds:
            break
        time.sleep(0.01)
    st = os.fstat(fds[0])
    assert st.st_ino == old_inode and st.st_nlink == 0 and fds[0] in writer._old_fds   # open, unnamed
    assert torch.equal(mithril_gpu.load(path)["w"], new["w"])
    held.set()
    join()
    assert not writer._old_fds
    with pytest.raises(OSError):
        os.fstat(fds[0])                                            # closed: the blocks are free


def test_a_save_does_not_wait_for_an_earlier_files_close(tmp_path, monkeypatch):
    """Closing a replaced file frees its blocks (~0.1 s per GB) under writer._old_lock; the next
    save's commit must not wait for that lock."""
    monkeypatch.setattr(writer, "OLD_FILE_BYTES", 1000)
    path = tmp_path / "ckpt.mth"
    mithril_gpu.save({"w": torch.randn(10_000)}, path)
    new = {"w": torch.randn(10_000)}
    done = threading.Event()
    with writer._old_lock:                       # as a background close of another file holds it
        t = threading.Thread(target=lambda: (mithril_gpu.save(new, path), done.set()))
        t.start()
        assert done.wait(5)                      # committed meanwhile, its old file held open
        assert len(writer._old_fds) == 1
    t.join(5)
    for th in threading.enumerate():
        if th.name == "mithril-free-old":
            th.join(5)
    assert not writer._old_fds and os.listdir(tmp_path) == ["ckpt.mth"]
    assert torch.equal(mithril_gpu.load(path)["w"], new["w"])


def test_a_small_replaced_file_is_not_held(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "OLD_FILE_BYTES", 1 << 30)
    calls = []
    monkeypatch.setattr(writer, "_close_in_background", lambda fd: calls.append(fd))
    path = tmp_path / "ckpt.mth"
    mithril_gpu.save({"w": torch.randn(10_000)}, path)
    mithril_gpu.save({"w": torch.randn(10_000)}, path)
    assert calls == [] and os.listdir(tmp_path) == ["ckpt.mth"]


def test_a_forked_child_closes_the_replaced_files_its_parent_is_freeing(tmp_path, monkeypatch):
    """A child forked while a replaced file waits for its background close (a DataLoader worker
    started during a save) closes its copy at once: it never keeps the old file's blocks."""
    monkeypatch.setattr(writer, "OLD_FILE_BYTES", 1000)
    path = tmp_path / "ckpt.mth"
    mithril_gpu.save({"w": torch.randn(10_000)}, path)
    held, fds, join = _hold_frees(monkeypatch)
    mithril_gpu.save({"w": torch.randn(10_000)}, path)
    for _ in range(100):
        if fds:
            break
        time.sleep(0.01)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: is its copy of the descriptor still open?
        try:
            os.fstat(fds[0])
            os.write(w, b"open")
        except OSError:
            os.write(w, b"closed")
        os._exit(0)
    os.close(w)
    answer = os.read(r, 16)
    os.waitpid(pid, 0)
    os.close(r)
    held.set()
    join()
    assert answer == b"closed"


def test_an_old_link_left_by_a_killed_process_goes_with_the_next_save(tmp_path):
    path = tmp_path / "ckpt.mth"
    mithril_gpu.save({"w": torch.ones(3)}, path)
    stale = tmp_path / ".ckpt.mth.mithril-old-0123456789ab.tmp"     # as _keep_old names it
    os.link(path, stale)
    mithril_gpu.save({"w": torch.zeros(3)}, tmp_path / "other.mth")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.mth", "other.mth"]


def test_torch_save_writes_through_the_file_view(tmp_path):
    state = {"a": torch.randn(100_000), "b": [1, 2]}
    with AtomicFile(tmp_path / "x.pt") as out:
        torch.save(state, out.file)
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert torch.equal(back["a"], state["a"]) and back["b"] == [1, 2]


def _record_releases(monkeypatch):
    """Make ``writer.release_cache`` record what it would drop, at once (no thread)."""
    dropped = []
    monkeypatch.setattr(writer, "_drop_cached", lambda fds: dropped.extend(_names(fds)))
    real = writer.release_cache

    def sync_release(paths):
        t = real(paths)
        if t is not None:
            t.join(5)
        return t
    monkeypatch.setattr(writer, "release_cache", sync_release)
    return dropped


def test_a_big_file_being_replaced_has_its_cache_released_as_the_save_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "OLD_FILE_BYTES", 1000)
    dropped = _record_releases(monkeypatch)
    path = tmp_path / "ckpt.mth"
    mithril_gpu.save({"w": torch.randn(10)}, path)                 # small: left alone
    assert dropped == []
    mithril_gpu.save({"w": torch.randn(10)}, path)
    assert dropped == []
    mithril_gpu.save({"w": torch.randn(10_000)}, path)             # replaces a small file
    assert dropped == []
    seen = []
    real_write = writer._write_all
    monkeypatch.setattr(writer, "_write_all", lambda fd, bufs: (seen.append(list(dropped)), real_write(fd, bufs))[1])
    new = {"w": torch.randn(10_000)}
    mithril_gpu.save(new, path)                                   # replaces a big one
    assert dropped == ["ckpt.mth"] and seen[0] == ["ckpt.mth"]    # before the first byte is written
    assert torch.equal(mithril_gpu.load(path)["w"], new["w"])
    monkeypatch.setattr(writer, "RELEASE_REPLACED", False)
    mithril_gpu.save(new, path)
    assert dropped == ["ckpt.mth"]


def test_released_cache_is_only_cache_the_old_file_survives_a_failed_save(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "OLD_FILE_BYTES", 1000)
    path = tmp_path / "ckpt.mth"
    old = {"w": torch.randn(50_000)}
    mithril_gpu.save(old, path)
    before = path.read_bytes()
    os.mkfifo(tmp_path / "fifo")
    os.symlink(path, tmp_path / "link.mth")
    seen = []
    real_drop = writer._drop_cached
    monkeypatch.setattr(writer, "_drop_cached", lambda fds: (seen.extend(_names(os.dup(fd) for fd in fds)),
                                                            real_drop(fds)))
    t = writer.release_cache([path, tmp_path / "missing.mth", tmp_path, tmp_path / "fifo", tmp_path / "link.mth"])
    assert t is not None                       # real fadvise; a missing file, a folder, a FIFO, a link: skipped
    t.join(5)
    assert seen == ["ckpt.mth"]
    monkeypatch.setattr(writer, "_drop_cached", real_drop)

    def full(fd, bufs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer.os, "writev", full)
    with pytest.raises(OSError, match="No space"):
        mithril_gpu.save({"w": torch.randn(3_000_000)}, path)
    assert path.read_bytes() == before
    assert torch.equal(mithril_gpu.load(path)["w"], old["w"])


def test_the_release_drops_the_replaced_file_not_the_one_renamed_over_it(tmp_path, monkeypatch):
    """The files are opened when the save starts: a release thread that runs late still drops
    the old file's pages, never the new file's."""
    monkeypatch.setattr(writer, "OLD_FILE_BYTES", 1000)
    path = tmp_path / "ckpt.mth"
    mithril_gpu.save({"w": torch.randn(10_000)}, path)
    old_ino = os.stat(path).st_ino
    go, inos = threading.Event(), []
    real = writer._drop_cached

    def late(fds):
        go.wait(5)
        inos.extend(os.fstat(fd).st_ino for fd in fds)
        real(fds)
    monkeypatch.setattr(writer, "_drop_cached", late)
    mithril_gpu.save({"w": torch.randn(10_000)}, path)
    new_ino = os.stat(path).st_ino
    go.set()
    for t in threading.enumerate():
        if t.name == "mithril-release-cache":
            t.join(5)
    assert inos == [old_ino] and new_ino != old_ino


@pytest.mark.parametrize("fused", [True, False])
def test_stored_planes_are_written_from_the_coders_buffers_and_reused_only_after(tmp_path, monkeypatch, fused):
    """Stored planes (most of an fp32 save) are written from the coder's buffers without a copy
    (writer.LEND); a buffer goes back to its pool only once the writer thread has written it. A
    slow writer and small batches make the encoder reach for buffers while earlier ones still
    wait: were one reused early, the file would hold another chunk's bytes and fail its checksum."""
    from mithril_gpu import cpu

    monkeypatch.setattr(cpu, "FUSED", fused)
    monkeypatch.setattr(writer, "FLUSH_BYTES", 64 << 10)
    real = writer._write_all

    def slow(fd, bufs):
        import time
        time.sleep(0.003)
        return real(fd, bufs)
    monkeypatch.setattr(writer, "_write_all", slow)
    g = torch.Generator().manual_seed(3)
    state = {f"t{i}": torch.randn(70000, generator=g) for i in range(24)}      # random mantissas: stored
    mithril_gpu.save(state, tmp_path / "lent.mth", chunk_elems=8192, threads=2)
    got = mithril_gpu.load(tmp_path / "lent.mth")
    assert all(torch.equal(got[k], v) for k, v in state.items())
    with mithril_gpu.open(tmp_path / "lent.mth") as f:
        assert any(0 in e.chunks[2::3] for e in f.index.tensors)              # stored chunks were written
    monkeypatch.setattr(writer, "LEND", False)                                # copied first: the same bytes
    mithril_gpu.save(state, tmp_path / "copied.mth", chunk_elems=8192, threads=2)
    assert (tmp_path / "lent.mth").read_bytes() == (tmp_path / "copied.mth").read_bytes()


def test_the_coders_buffers_outlive_a_save_up_to_a_limit(tmp_path, monkeypatch):
    """The pool of plane buffers is shared by saves (memory a host took back costs a fault per
    page to touch again), keeps at most cpu.POOL_BYTES of free buffers, and changes no byte."""
    from mithril_gpu import cpu

    monkeypatch.setattr(cpu, "_SHARED_POOL", cpu.BufferPool(4 << 20))
    g = torch.Generator().manual_seed(5)
    state = {f"t{i}": torch.randn(300_000, generator=g) for i in range(6)}
    mithril_gpu.save(state, tmp_path / "a.mth")
    assert 0 < cpu._SHARED_POOL.free_bytes <= 4 << 20                 # kept, within the limit
    mithril_gpu.save(state, tmp_path / "b.mth")                       # from the pool's buffers
    monkeypatch.setattr(cpu, "SHARE_POOL", False)
    mithril_gpu.save(state, tmp_path / "c.mth")
    assert (tmp_path / "a.mth").read_bytes() == (tmp_path / "b.mth").read_bytes() == (tmp_path / "c.mth").read_bytes()
    pool = cpu.BufferPool(100)
    pool.put([np.empty(60, np.uint8), np.empty(60, np.uint8)])
    assert pool.free_bytes == 60 and pool.get(50).size == 50 and pool.free_bytes == 0
