"""Checkpointer: nothing lost, nothing silent.

* a background save still running when the script ends (or dies of an exception) is finished,
  and one that fails then says so on stderr and makes the exit status non-zero;
* pruning deletes dependents before their bases, so a kill mid-prune orphans nothing;
* a directory that already holds orphans (a delta whose base is missing or is another file) is
  handled: they are not listed, chain() raises a typed error, the next save is full and deletes them;
* temp files of killed writers are removed when a Checkpointer starts, never a live writer's.
"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import mithril_gpu
from conftest import assert_same, subprocess_env
from mithril_gpu import BaseMismatchError, Checkpointer, MissingBaseError
from mithril_gpu.checkpointer import CheckpointNote
from mithril_gpu.writer import is_temp_name

CONST = torch.arange(100.0)     # never changes: stored as "same", so every delta needs its base


def _state(step):
    return {"w": torch.full((100,), float(step)), "c": CONST, "step": step}


def _files(d):
    return sorted(int(n[5:14]) for n in os.listdir(d) if n.startswith("step-") and n.endswith(".mth"))


def _assert_loads(d, step):
    got = mithril_gpu.load(os.path.join(d, f"step-{step:09d}.mth"))
    assert got["step"] == step
    assert_same(got["w"], _state(step)["w"])
    assert_same(got["c"], CONST)


def _temps(d):
    return sorted(n for n in os.listdir(d) if is_temp_name(n))


# ---------------------------------------------------------------- background saves at exit

_EXIT_SCRIPT = """
import sys, time, torch, mithril_gpu
def slow(n):
    time.sleep(0.02)
w = torch.randn(6_000_000, generator=torch.Generator().manual_seed(7))   # 24 MB: 6 jobs on 2 threads
ck = mithril_gpu.Checkpointer(sys.argv[1], keep=None, threads=2, progress=slow)
ck.save({{"w": w, "step": 1}}, 1, blocking=False)
import os
pid = os.fork()
if pid == 0:
    sys.exit(0)         # a forked child ends normally: the parent's pending save is not its to wait for
os.waitpid(pid, 0)
{end}
"""


@pytest.mark.parametrize("end", ["", "raise RuntimeError('the training loop crashed')"], ids=["end", "raise"])
def test_a_pending_background_save_is_finished_at_exit(tmp_path, end):
    """The script's last call is save(blocking=False), with no wait()/close()/with, or an
    exception follows it: the checkpoint is written all the same. (It used to be silently lost:
    the writer's thread pools refuse work once the interpreter shuts down.)"""
    p = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT.format(end=end), str(tmp_path)], capture_output=True,
                       text=True, env=subprocess_env(), timeout=120)
    assert p.returncode == (1 if end else 0), p.stderr
    assert "mithril: ERROR" not in p.stderr
    if end:
        assert "the training loop crashed" in p.stderr
    assert os.listdir(tmp_path) == ["step-000000001.mth"]
    got = mithril_gpu.load(tmp_path / "step-000000001.mth")
    assert got["step"] == 1
    assert_same(got["w"], torch.randn(6_000_000, generator=torch.Generator().manual_seed(7)))


def test_a_background_save_that_fails_at_exit_is_loud_and_the_exit_status_is_not_zero(tmp_path):
    script = textwrap.dedent("""
        import sys, torch, mithril_gpu
        ck = mithril_gpu.Checkpointer(sys.argv[1], keep=None)
        ck.save({"w": torch.ones(3)}, 0)
        ck.save_kwargs["level"] = 99            # makes the background writer fail
        ck.save({"w": torch.ones(3) * 2}, 1, blocking=False)
        print("script done")
    """)
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert p.stdout == "script done\n"
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("mithril: ERROR")]
    assert len(errors) == 1 and "step-000000001.mth was NOT written" in errors[0] and "level" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert _files(tmp_path) == [0]


# ---------------------------------------------------------------- pruning order

def _make_run(d, last, full_every):
    ck = Checkpointer(d, full_every=full_every, keep=None)
    for s in range(last + 1):
        ck.save(_state(s), s)
    return ck


def test_a_kill_at_any_point_of_pruning_orphans_nothing(tmp_path, monkeypatch):
    """Pruning interrupted after each possible number of deletions: every file left loads, and a
    resumed Checkpointer goes on. (Pruning used to delete oldest first: a full base before the
    deltas that need it.)"""
    template = tmp_path / "template"
    _make_run(template, 9, full_every=4)             # chains 0-3, 4-7, 8-9
    real_unlink = os.unlink
    for allowed in range(8):                          # saving 10 (a delta of 9) with keep=1 deletes 0..7
        d = tmp_path / f"run{allowed}"
        shutil.copytree(template, d)
        deleted = []

        def unlink(path, *a, _allowed=allowed, _deleted=deleted, **k):
            if os.path.basename(os.fspath(path)).startswith("step-"):
                if len(_deleted) == _allowed:
                    raise KeyboardInterrupt       # the process dies here
                _deleted.append(os.path.basename(os.fspath(path)))
            return real_unlink(path, *a, **k)
        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(os, "remove", unlink)
        with pytest.raises(KeyboardInterrupt):
            Checkpointer(d, full_every=4, keep=1).save(_state(10), 10)
        monkeypatch.undo()
        left = _files(d)
        assert len(left) == 11 - allowed
        for s in left:                                # every file on disk, listed or not
            _assert_loads(d, s)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointNote)
            ck = Checkpointer(d, full_every=4, keep=1)
            assert ck.steps() == left
            ck.save(_state(11), 11)
        assert ck.steps() == [8, 9, 10, 11] and ck.chain(11) == [11, 10, 9, 8]
        for s in _files(d):
            _assert_loads(d, s)


# ---------------------------------------------------------------- a directory with orphans

def test_orphans_are_not_listed_raise_typed_errors_and_the_next_save_is_full_and_deletes_them(tmp_path):
    _make_run(tmp_path, 8, full_every=3)              # chains 0-2, 3-5, 6-8
    os.unlink(tmp_path / "step-000000006.mth")        # 7 and 8 lose their base (8 is the newest file)
    # the same state again, but another file (another identity): 4 and 5 are orphans too
    mithril_gpu.save(_state(3), tmp_path / "step-000000003.mth", metadata={"rewritten": "yes"})
    ck = Checkpointer(tmp_path, full_every=3, keep=10)
    with pytest.warns(CheckpointNote) as notes:
        assert ck.steps() == [0, 1, 2, 3]
    text = "\n".join(str(n.message) for n in notes)
    assert all(f"step-00000000{s}.mth" in text for s in (4, 5, 7, 8)) and "missing" in text and "another file" in text
    with pytest.raises(MissingBaseError, match="step-000000006.mth, which is missing"):
        ck.chain(8)
    with pytest.raises(BaseMismatchError) as e:
        ck.chain(5)
    assert not isinstance(e.value, MissingBaseError)
    assert ck.chain(2) == [2, 1, 0] and ck.chain(3) == [3]
    with pytest.raises(FileNotFoundError):
        ck.chain(6)
    assert ck.latest()["step"] == 3
    ck.save(_state(9), 9)                              # the newest file (8) was broken: a full save
    assert ck.chain(9) == [9]
    assert _files(tmp_path) == [0, 1, 2, 3, 9]        # the orphans are deleted
    ck.save(_state(10), 10)
    assert ck.chain(10) == [10, 9]
    for s in _files(tmp_path):
        _assert_loads(tmp_path, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointNote)
        assert Checkpointer(tmp_path, full_every=3, keep=10).steps() == [0, 1, 2, 3, 9, 10]


def test_a_resumed_checkpointer_deltas_against_the_newest_restorable_one(tmp_path):
    """Orphans older than the newest checkpoint do not force a full save; they are deleted."""
    _make_run(tmp_path, 5, full_every=3)              # chains 0-2, 3-5
    os.unlink(tmp_path / "step-000000000.mth")        # 1 and 2 are orphans (old ones, as a mid-prune kill left them)
    ck = Checkpointer(tmp_path, full_every=4, keep=None)
    with pytest.warns(CheckpointNote):
        assert ck.steps() == [3, 4, 5]
    ck.save(_state(6), 6)
    assert ck.chain(6) == [6, 5, 4, 3] and _files(tmp_path) == [3, 4, 5, 6]
    _assert_loads(tmp_path, 6)


def test_a_damaged_file_is_not_listed_and_is_left_in_place(tmp_path):
    _make_run(tmp_path, 2, full_every=3)
    (tmp_path / "step-000000003.mth").write_bytes(b"not a checkpoint at all")
    ck = Checkpointer(tmp_path, full_every=3, keep=1)
    with pytest.warns(CheckpointNote, match="step-000000003.mth cannot be restored: it cannot be read"):
        assert ck.steps() == [0, 1, 2]
    assert ck.latest()["step"] == 2
    ck.save(_state(4), 4)
    assert ck.chain(4) == [4]                          # the newest file was unreadable: a full save
    assert _files(tmp_path) == [3, 4]                  # kept: it is not the Checkpointer's to delete
    assert (tmp_path / "step-000000003.mth").read_bytes() == b"not a checkpoint at all"
    # a save of that very step (a run resumed from an earlier one) moves it aside, never over it
    (tmp_path / "step-000000005.mth").write_bytes(b"damaged too")
    with pytest.warns(CheckpointNote, match="damaged checkpoint of step 5 is kept as .*step-000000005.mth.damaged"):
        ck.save(_state(5), 5)
    assert (tmp_path / "step-000000005.mth.damaged").read_bytes() == b"damaged too"
    assert ck.load(5)["step"] == 5


# ---------------------------------------------------------------- stale temp files

def test_a_new_checkpointer_removes_temp_files_of_killed_writers_but_not_of_live_ones(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    script = textwrap.dedent("""
        import sys, time, torch, mithril_gpu
        def slow(n):
            print("writing", flush=True); time.sleep(60)
        ck = mithril_gpu.Checkpointer(sys.argv[1], threads=1, progress=slow)
        ck.save({"w": torch.randn(300_000)}, 5)
    """)
    dead = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, env=subprocess_env())
    try:
        assert dead.stdout.readline().strip() == b"writing"          # it is mid-save now
    finally:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
    [stale] = _temps(tmp_path)
    assert stale.startswith(".step-000000005.mth.mithril-")
    # a writer still at work: a temp file it holds locked (what AtomicFile does while it writes)
    live = tmp_path / ".other.mth.mithril-live1234.tmp"
    fd = os.open(live, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ck = Checkpointer(tmp_path)                     # no save yet: starting is enough
        assert _temps(tmp_path) == [live.name]
        ck.save(_state(0), 0)
        assert _temps(tmp_path) == [live.name]
    finally:
        os.close(fd)                                    # the writer dies: its lock goes with it
    Checkpointer(tmp_path)
    assert _temps(tmp_path) == [] and _files(tmp_path) == [0]


RACE = textwrap.dedent("""
    import os, sys, time, torch, mithril_gpu
    folder, tag, go = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    state = {"w": torch.full((1 << 21,), tag)}             # 8 MB: a write that takes a while
    ck = mithril_gpu.Checkpointer(folder, keep=None)
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        ck.save(state, 0)
        print("saved")
    except ValueError as e:
        print("refused:", e)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_two_processes_saving_one_step_in_one_folder_do_not_both_succeed(tmp_path):
    """Every rank of a job that forgot ``if rank == 0`` saves the same step into the same folder at
    the same moment. Both wrote it and the last rename won, silently; now saves in one folder
    take turns, and the second finds the step taken."""
    go = tmp_path / "go"
    for attempt in range(3):
        folder = tmp_path / f"ck{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(folder), str(tag), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=subprocess_env()) for tag in (1.0, 2.0)]
        import time
        time.sleep(3)                                   # both started and waiting
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        go.unlink()
        said = sorted(o.strip().split(":")[0] for o, _ in outs)
        assert said == ["refused", "saved"], outs
        got = mithril_gpu.load(folder / "step-000000000.mth")["w"]
        winner = 1.0 if outs[0][0].startswith("saved") else 2.0
        assert torch.equal(got, torch.full((1 << 21,), winner))


FORK = textwrap.dedent("""
    import os, sys, time, torch, mithril_gpu
    ck = mithril_gpu.Checkpointer(sys.argv[1], keep=None)
    state = {"w": torch.randn(1 << 22)}
    ck.save(state, 0, blocking=False)                      # the folder's lock goes with this save
    pid = os.fork()                                        # as a DataLoader starting its workers
    if pid == 0:
        time.sleep(300)
        os._exit(0)
    try:
        ck.save(state, 1)                                  # waits for step 0, then takes the lock
        print("done")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_background_save_does_not_keep_the_folder_locked(tmp_path):
    p = subprocess.run([sys.executable, "-c", FORK, str(tmp_path / "ck")], capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert p.stdout.strip() == "done", p.stderr
    assert mithril_gpu.load(tmp_path / "ck" / "step-000000001.mth")["w"].shape == (1 << 22,)


def test_steps_and_chain_see_a_pending_background_save(tmp_path):
    # as load() and latest() do: right after save(blocking=False), steps() used to miss the step
    # and chain() to raise FileNotFoundError
    ck = mithril_gpu.Checkpointer(tmp_path, full_every=5)
    w = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    ck.save({"w": w}, 1)
    w[::100] += 1
    ck.save({"w": w}, 2, blocking=False)
    assert ck.steps() == [1, 2]
    w[::100] += 1
    ck.save({"w": w}, 3, blocking=False)
    assert ck.chain(3) == [3, 2, 1]
    ck.close()


def test_a_bool_is_not_a_step(tmp_path):
    ck = mithril_gpu.Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="step must be"):
        ck.save({"w": torch.ones(3)}, True)
    assert ck.steps() == []


FORK_CHILD_SAVES = textwrap.dedent("""
    import os, signal, sys, torch, mithril_gpu
    ck = mithril_gpu.Checkpointer(sys.argv[1], full_every=4, keep=None, threads=1)
    states = [{"w": torch.full((1 << 20,), float(k))} for k in range(4)]    # (no torch work in the child)
    ck.save(states[0], 0)
    fut = ck.save(states[1], 1, blocking=False)
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)                                 # a hang becomes SIGALRM
        ck.steps()
        fut2 = ck.save(states[2], 100, blocking=False)   # the child's own background save
        ck.wait()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    fut.result()
    ck.save(states[3], 200)
    print("child", status)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_saves_in_the_background_with_writers_of_its_own(tmp_path):
    """The child inherited each Checkpointer's background executor without its thread: waiting for
    the parent's pending save, or for a save of its own, never ended (and held the folder lock)."""
    p = subprocess.run([sys.executable, "-c", FORK_CHILD_SAVES, str(tmp_path / "ck")], capture_output=True,
                       text=True, env=subprocess_env(), timeout=240)
    assert p.stdout.strip() == "child 0", (p.stdout, p.stderr[-2000:])
    for step, v in ((1, 1.0), (100, 2.0), (200, 3.0)):
        assert mithril_gpu.load(tmp_path / "ck" / f"step-{step:09d}.mth")["w"][0].item() == v


EXIT_THREAD = textwrap.dedent("""
    import sys, threading, time, torch, mithril_gpu
    root = sys.argv[1]
    state = {"w": torch.randn(1 << 21), "v": torch.randn(1 << 21)}
    ck = mithril_gpu.Checkpointer(root + "/ck", full_every=4, keep=None)

    def worker():
        time.sleep(0.5)                                  # the main thread has returned by now
        mithril_gpu.save(state, root + "/a.mth")
        back = mithril_gpu.load(root + "/a.mth")
        ck.save(state, 0, blocking=False).result()
        ck.save(state, 1)
        print("ok" if all(torch.equal(back[k], state[k]) for k in state) else "WRONG", flush=True)
    threading.Thread(target=worker).start()
""")


def test_saves_and_loads_from_a_thread_after_the_main_thread_returned(tmp_path):
    """The interpreter's exit begins when the main thread returns; concurrent.futures then refuses
    new work, and a multi-threaded save or load from a thread still running failed with an untyped
    RuntimeError ('cannot schedule new futures after interpreter shutdown')."""
    p = subprocess.run([sys.executable, "-c", EXIT_THREAD, str(tmp_path)], capture_output=True, text=True,
                       env=subprocess_env(), timeout=240)
    assert p.stdout.strip() == "ok", (p.stdout, p.stderr[-2000:])
    assert torch.equal(mithril_gpu.load(tmp_path / "ck" / "step-000000001.mth")["w"],
                       mithril_gpu.load(tmp_path / "a.mth")["w"])
