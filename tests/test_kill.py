"""Kill tests: SIGKILL and SIGTERM at random points of saves never lose or damage a checkpoint.

Each kill hits a process that is saving, over and over: ``mithril_gpu.save``, ``Checkpointer.save``
(full and delta; blocking and in the background; with slow deletions so that many kills land
mid-prune), and ``mithril compress IN OUT``. After each kill:

* every checkpoint file in the directory loads bit-exact (so no delta lost its base), and the
  newest one completed before the kill is still there;
* a Checkpointer resumed in that directory lists no broken checkpoint, saves and loads;
* no temp file outlives that next save.

The savers are forked from one process that has already imported torch (a "zygote"), so a kill
costs tens of milliseconds instead of an interpreter start; the CLI runs as ``python -m`` does
(``runpy.run_module(..., run_name="__main__")``). Saves are slowed down a little (a ``progress``
callback that sleeps, ``threads=1``; slow deletions in the pruning mode) to widen the window.

``MITHRIL_KILLS=N`` sets the number of kills (default 12, spread over the modes);
``MITHRIL_KILL_SEED=S`` replays a run (the seed is in every failure message).
"""
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import mithril_gpu
from conftest import assert_tree_same, subprocess_env
from mithril_gpu.checkpointer import Checkpointer, CheckpointNote
from mithril_gpu.writer import is_temp_name

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and signals")

KILLS = int(os.environ.get("MITHRIL_KILLS", "12"))
SEED = int(os.environ.get("MITHRIL_KILL_SEED", str(random.SystemRandom().randrange(1 << 30))))

# how the kills are spread over the modes (out of 12), and how long after a saver is ready a kill may come
WEIGHTS = {"api": 2, "ckpt": 3, "async": 2, "prune": 3, "cli": 2}
WINDOW = {"api": 0.35, "ckpt": 0.45, "async": 0.45, "prune": 0.6, "cli": 0.35}
CKPT_ARGS = {"ckpt": dict(full_every=3, keep=2), "async": dict(full_every=3, keep=2),
             "prune": dict(full_every=4, keep=1)}

STATE_SRC = '''
def state(step):
    """The training state saved at ``step``: the same bytes in every process."""
    import torch
    g = torch.Generator().manual_seed(step)
    return {"w": {f"t{i}": torch.randn(131072, generator=g) for i in range(6)},
            "c": torch.arange(4096.0), "step": step}
'''
exec(STATE_SRC)

ZYGOTE = STATE_SRC + r'''
import json, os, runpy, signal, sys, time, traceback
import torch
import mithril_gpu, mithril_gpu.checkpointer, mithril_gpu.formats, mithril_gpu.writer   # not .cli: runpy runs it

def say(*a):
    # one write(2) per line: a pipe takes it whole, so a kill never leaves half a line for the
    # next process to write after (print() makes one write per piece when PYTHONUNBUFFERED is set)
    os.write(1, (" ".join(map(str, a)) + "\n").encode())

def slow(_n):
    time.sleep(0.004)

def worker(cmd):
    mode, d = cmd["mode"], cmd["dir"]
    if mode == "api":
        i = cmd["start"]
        say("go")
        while True:
            mithril_gpu.save(state(i), os.path.join(d, f"a-{i % 3}.mth"), threads=1, progress=slow)
            say("done", i)
            i += 1
    if mode == "cli":
        real_write = mithril_gpu.writer.AtomicFile.write
        def write(self, data, lent=False):
            time.sleep(0.003)
            return real_write(self, data, lent=lent)
        mithril_gpu.writer.AtomicFile.write = write
        sys.argv = ["mithril", "compress", cmd["src"], cmd["out"], "--threads", "1", "-q", "-f"]
        say("go")
        try:
            runpy.run_module("mithril_gpu.cli", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            say("exit", e.code)
        return
    if mode == "prune":                      # slow deletions: many kills land mid-prune
        real_unlink = os.unlink
        def unlink(p, *a, **k):
            if os.path.basename(str(p)).startswith("step-"):
                say("del", os.path.basename(str(p))[5:14])
                time.sleep(0.03)
            return real_unlink(p, *a, **k)
        os.unlink = unlink
    ck = mithril_gpu.checkpointer.Checkpointer(d, threads=1, progress=slow, **cmd["args"])
    s = (ck.steps() or [-1])[-1] + 1
    say("go")
    while True:
        if mode == "async":
            ck.save(state(s), s, blocking=False)           # finishes the previous one first
            if s > cmd["first"]:
                say("done", s - 1)
            time.sleep(0.01)                                # training goes on meanwhile
        else:
            ck.save(state(s), s)
            say("done", s)
        s += 1

say("ready")
for line in sys.stdin:
    cmd = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.alarm(120)                    # a saver never outlives a test that died before killing it
        os.close(go_w)
        os.read(go_r, 1)                     # wait until "child PID" is out, so it comes before the saver's lines
        os.close(go_r)
        code = 0
        try:
            worker(cmd)
        except BaseException:
            say("error", json.dumps(traceback.format_exc()))
            code = 1
        os._exit(code)                       # never goes back to the loop above
    os.close(go_r)
    say("child", pid)
    os.write(go_w, b"x")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    say("reaped", pid, status)
'''


def _proc(pid):
    """What /proc says of a process (for the message of a hang)."""
    if pid is None:
        return "none"
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/wchan") as f:
            return f"{pid} state {state} in {f.read() or '-'}"
    except OSError as e:
        return f"{pid} ({e.strerror})"


class Zygote:
    def __init__(self, tmp):
        self.err = open(os.path.join(tmp, "zygote.err"), "w+")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=subprocess_env(), text=True, bufsize=1)
        self.lines = queue.Queue()
        self.pid = None
        self.last = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.expect("ready", timeout=120)

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.split())
        self.lines.put(None)

    def next(self, deadline):
        try:
            words = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            words = None
        if words is None:
            self.err.seek(0)
            raise AssertionError(f"zygote stopped or hung (seed {SEED}); zygote {_proc(self.proc.pid)}, saver "
                                 f"{_proc(self.pid)}; last lines {self.last}; its stderr: {self.err.read()[-3000:]}")
        self.last = (self.last + [words])[-8:]
        if words and words[0] == "error":
            raise AssertionError(f"saver failed before the kill (seed {SEED}): {json.loads(' '.join(words[1:]))}")
        return words

    def expect(self, word, timeout=60):
        """Read lines until one starts with ``word``: (its words, the lines before it)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            w = self.next(deadline)
            if w and w[0] == word:
                return w, seen
            if w:
                seen.append(w)

    def run_and_kill(self, cmd, delay, sig, after="go"):
        """Start a saver, kill it ``delay`` s after it prints ``after``; return the lines it printed."""
        self.start(cmd)
        try:
            w, before = self.expect("go")
            if after != "go":
                w, more = self.expect(after)
                before += [["go"]] + more
            before.append(w)
            time.sleep(delay)
            self.signal(sig)
            (_, _, status), seen = self.expect("reaped")
        finally:
            self.signal(signal.SIGKILL)     # whatever went wrong, no saver outlives its test
        self.pid = None
        return before + seen

    def start(self, cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        (_, pid), _ = self.expect("child")
        self.pid = int(pid)

    def signal(self, sig):
        if self.pid is not None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:      # it had finished (the CLI) and was reaped
                pass

    def close(self):
        self.signal(signal.SIGKILL)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(str(tmp_path_factory.mktemp("zygote")))
    yield z
    z.close()


def _counts():
    """KILLS spread over the modes by WEIGHTS (largest remainders first), each mode at least one."""
    total = sum(WEIGHTS.values())
    counts = {m: KILLS * w // total for m, w in WEIGHTS.items()}
    for m in sorted(WEIGHTS, key=lambda m: -(KILLS * WEIGHTS[m] % total))[:KILLS - sum(counts.values())]:
        counts[m] += 1
    return {m: max(1, c) for m, c in counts.items()}


def _load_exact(path) -> int:
    """Load a checkpoint, check it bit-exact against the state it claims to be; return its step."""
    got = mithril_gpu.load(path)
    assert_tree_same(got, state(got["step"]))       # noqa: F821  (defined by exec(STATE_SRC))
    return got["step"]


def _done(words):
    return [int(w[1]) for w in words if w[0] == "done"]


def _temps(d):
    return [n for n in os.listdir(d) if is_temp_name(n)]


def _step_files(d):
    return sorted(int(n[5:14]) for n in os.listdir(d) if n.startswith("step-") and n.endswith(".mth"))


@pytest.mark.parametrize("mode", list(WEIGHTS))
def test_killed_saves_lose_nothing(mode, zygote, tmp_path):
    rng = random.Random(f"{SEED}-{mode}")
    n = _counts()[mode]
    d = str(tmp_path)
    stats = {"kills": 0, "mid_prune": 0, "mid_compress": 0}
    known = {}                     # api: file -> the step it holds
    ever_done = []                 # checkpointer modes: steps whose save completed
    ref = None
    if mode == "cli":
        from safetensors.torch import save_file

        src = os.path.join(d, "in.safetensors")
        save_file({f"t{i}": torch.randn(262144, generator=torch.Generator().manual_seed(i)) for i in range(8)}, src)
        ref_path = os.path.join(d, "ref.mth")
        # one compress run to the end: the reference output (the CLI's output is deterministic)
        zygote.start({"mode": "cli", "dir": d, "src": src, "out": ref_path})
        try:
            (_, code), _ = zygote.expect("exit", timeout=120)
            assert code in ("0", "None"), f"reference compress failed: exit {code}"
            zygote.expect("reaped")
        finally:
            zygote.signal(signal.SIGKILL)
        zygote.pid = None
        ref = open(ref_path, "rb").read()
        from safetensors.torch import load_file

        want = load_file(src)
        got = mithril_gpu.load(ref_path)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)

    for k in range(n):
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        delay = rng.uniform(0, WINDOW[mode])
        where = f"(mode {mode}, kill {k}, {signal.Signals(sig).name} after {delay:.3f} s, MITHRIL_KILL_SEED={SEED})"
        if mode == "api":
            start = 1000 * (k + 1)
            done = _done(zygote.run_and_kill({"mode": "api", "dir": d, "start": start}, delay, sig))
            inflight = (done[-1] + 1) if done else start
            for r in range(3):
                path = os.path.join(d, f"a-{r}.mth")
                ok = {inflight} if inflight % 3 == r else set()
                mine = [i for i in done if i % 3 == r]
                ok.add(mine[-1] if mine else known.get(r))
                if not os.path.exists(path):
                    assert None in ok, f"{path} is gone {where}"
                    continue
                known[r] = _load_exact(path)
                assert known[r] in ok, f"{path} holds step {known[r]}, expected one of {ok} {where}"
            mithril_gpu.save({"x": torch.ones(3)}, os.path.join(d, "probe.mth"))
        elif mode == "cli":
            out = os.path.join(d, f"out-{k % 2}.mth")
            words = zygote.run_and_kill({"mode": "cli", "dir": d, "src": src, "out": out}, delay, sig)
            codes = [w[1] for w in words if w[0] == "exit"]      # none if the kill came first
            assert all(c in ("0", "None", str(128 + sig)) for c in codes), f"compress exited {codes} {where}"
            stats["mid_compress"] += codes not in (["0"], ["None"])
            if os.path.exists(out):
                assert open(out, "rb").read() == ref, f"{out} differs from a complete compress {where}"
            mithril_gpu.save({"x": torch.ones(3)}, os.path.join(d, "probe.mth"))
        else:
            args = CKPT_ARGS[mode]
            first = (_step_files(d) or [-1])[-1] + 1
            # in the pruning mode, every other kill comes just after a deletion began
            after = "del" if mode == "prune" and k % 2 == 0 else "go"
            if after == "del":
                delay = rng.uniform(0, 0.12)
                where = where.replace(" after ", " after a deletion began + ")
            words = zygote.run_and_kill({"mode": mode, "dir": d, "args": args, "first": first}, delay, sig, after)
            done = _done(words)
            marks = [w[0] for w in words if w[0] in ("del", "done")]
            stats["mid_prune"] += bool(marks) and marks[-1] == "del"
            ever_done += done
            on_disk = _step_files(d)
            for s in on_disk:                       # every file, listed or not: nothing is orphaned
                assert _load_exact(os.path.join(d, f"step-{s:09d}.mth")) == s, where
            with warnings.catch_warnings():
                warnings.simplefilter("error", CheckpointNote)
                ck = Checkpointer(d, threads=1, **args)
                listed = ck.steps()
            assert listed == on_disk, where
            if ever_done:
                assert listed and listed[-1] >= ever_done[-1], f"newest completed step {ever_done[-1]} lost {where}"
                assert len(listed) >= min(args["keep"], len(set(ever_done))), where
            nxt = (listed or [-1])[-1] + 1
            ck.save(state(nxt), nxt)             # noqa: F821
            assert ck.steps()[-1] == nxt and _load_exact(ck.path(nxt)) == nxt, where
            for s in _step_files(d):
                assert _load_exact(os.path.join(d, f"step-{s:09d}.mth")) == s, where
            ever_done.append(nxt)
        assert _temps(d) == [], f"temp files outlived the next save {where}: {_temps(d)}"
        stats["kills"] += 1
    print(f"\nkills[{mode}] (seed {SEED}): {stats}")
