"""Multi-process DCP scenarios for tests/test_dcp.py (CPU, gloo, FSDP2).

    python tests/dcp_worker.py MODE ROOT

MODE: ``save`` (2 ranks: sync, async, delta, stock saves; loads back; damaged file), ``kill``
(2 ranks: an in-place overwrite killed mid-write; 1 rank: a fresh save killed mid-write),
``load1`` / ``load3`` (reshard onto 1 / 3 ranks), ``process`` (async_save in process mode; needs a
free local TCP port). Every check that passes leaves a marker file
``ROOT/ok_<name>`` so the tests can say which one failed; any failure exits non-zero.
"""
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT_DIR not in sys.path:
    sys.path.insert(0, ROOT_DIR)


def _init(rank, world, root, tag):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(root, 'pg_' + tag)}",
                            rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _done():
    dist.barrier()
    dist.destroy_process_group()


def _mark(root, name, rank):
    if rank == 0:
        open(os.path.join(root, "ok_" + name), "w").close()


def build(mesh, seed, steps=1):
    """An FSDP2 bf16 model, AdamW after ``steps`` steps, a Shard(1) DTensor and plain values."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.GELU(), torch.nn.Linear(80, 40, bias=False),
                                torch.nn.LayerNorm(40)).to(torch.bfloat16)
    for m in model:
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 100 + step)
        x = torch.randn(8, 48, generator=g).to(torch.bfloat16)
        model(x).float().pow(2).mean().backward()
        optim.step()
        optim.zero_grad()
    msd, osd = get_state_dict(model, optim)
    g = torch.Generator().manual_seed(seed + 7)
    full = torch.randn(6, 10, generator=g)
    extra = {"shard1": distribute_tensor(full, mesh, [Shard(1)]), "plain": torch.arange(12, dtype=torch.int64) * seed,
             "step": 1000 + seed, "name": f"run-{seed}", "lr": 0.5 / seed, "flags": [True, None, b"\x00\xff"]}
    return {"model": msd, "optim": osd, "extra": extra}


def flat(obj, path=""):
    """{path: value}, DTensors gathered to full tensors (a collective: all ranks call it alike)."""
    from torch.distributed.tensor import DTensor

    out = {}
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            out.update(flat(obj[k], f"{path}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat(v, f"{path}/{i}"))
    elif isinstance(obj, DTensor):
        out[path] = obj.full_tensor().detach().clone()
    elif isinstance(obj, torch.Tensor):
        out[path] = obj.detach().clone()
    else:
        out[path] = obj
    return out


def same(a, b, what):
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b))[:5])
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, (what, k)
            assert torch.equal(x.reshape(-1).view(torch.uint8) if x.dtype != torch.bool else x,
                               y.reshape(-1).view(torch.uint8) if y.dtype != torch.bool else y), (what, k)
        else:
            assert x == y and type(x) is type(y), (what, k, x, y)


def differs(a, b):
    return any(isinstance(v, torch.Tensor) and not torch.equal(v, b[k]) for k, v in a.items())


def save_scenario(rank, world, root):
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException

    from mithril_gpu.dcp import METADATA_NAME, MithrilReader, MithrilWriter
    from mithril_gpu.errors import MithrilError

    mesh = _init(rank, world, root, "save")
    state1 = build(mesh, seed=1, steps=1)
    ref1 = flat(state1)
    torch.save(ref1, os.path.join(root, f"ref1_{rank}.pt"))
    w = MithrilWriter(os.path.join(root, "m1"))
    w2 = pickle.loads(pickle.dumps(w))
    assert vars(w2) == vars(w) and type(w2) is type(w)
    dcp.save(state1, storage_writer=w2)
    dcp.save(state1, storage_writer=FileSystemWriter(os.path.join(root, "stock")))
    assert os.path.exists(os.path.join(root, "m1", METADATA_NAME))
    _mark(root, "save_sync", rank)

    # one more step; saved with async_save (thread mode) as a delta against m1, and in full
    state2 = build(mesh, seed=1, steps=2)
    ref2 = flat(state2)
    assert differs(ref1, ref2)
    torch.save(ref2, os.path.join(root, f"ref2_{rank}.pt"))
    fut = dcp.async_save(state2, storage_writer=MithrilWriter(os.path.join(root, "m2"), base=os.path.join(root, "m1")))
    fut.result()
    dcp.async_save(state2, storage_writer=MithrilWriter(os.path.join(root, "a2"))).result()
    _mark(root, "save_async", rank)

    def load(path, reader, seed=5):
        fresh = build(mesh, seed=seed)
        assert differs(flat(fresh), ref1)
        dcp.load(fresh, storage_reader=reader(path))
        return flat(fresh)

    from torch.distributed.checkpoint import FileSystemReader

    got = load(os.path.join(root, "m1"), MithrilReader)
    same(got, ref1, "m1")
    same(load(os.path.join(root, "stock"), FileSystemReader), got, "stock vs m1")
    _mark(root, "load_sync", rank)
    same(load(os.path.join(root, "a2"), MithrilReader), ref2, "a2")
    _mark(root, "load_async", rank)
    same(load(os.path.join(root, "m2"), MithrilReader), ref2, "m2")
    if rank == 0:
        from mithril_gpu.reader import MthFile

        from mithril_gpu import codecs

        files = [n for n in os.listdir(os.path.join(root, "m2")) if n.endswith(".mth")]
        assert len(files) == 2, files
        used = set()
        for n in files:
            with MthFile(os.path.join(root, "m2", n)) as f:
                assert f.index.base is not None and any(e.delta for e in f.index.tensors), n
                used |= {c for e in f.index.tensors for c in e.chunks[2::3]}
        assert codecs.ANS in used or not codecs.ans_enabled(), used     # rank-file deltas use the ans codec too
    _mark(root, "load_delta", rank)

    # a damaged rank file: mithril's typed error, inside DCP's CheckpointException
    if rank == 0:
        shutil.copytree(os.path.join(root, "m1"), os.path.join(root, "bad"))
        victim = next(n for n in sorted(os.listdir(os.path.join(root, "bad"))) if n.startswith("__1_"))
        p = os.path.join(root, "bad", victim)
        with open(p, "r+b") as fh:
            size = os.path.getsize(p)
            for off in (size // 4, size // 3, size // 2):
                fh.seek(off)
                b = fh.read(1)
                fh.seek(off)
                fh.write(bytes([b[0] ^ 0x10]))
    dist.barrier()
    try:
        load(os.path.join(root, "bad"), MithrilReader)
    except CheckpointException as e:
        errs = [exc for exc, _ in e.failures.values()]
        assert errs and all(isinstance(x, MithrilError) for x in errs), errs
        assert 1 in e.failures, e.failures
        with open(os.path.join(root, f"damaged_{rank}.txt"), "w") as fh:
            fh.write(" | ".join(f"{type(x).__name__}: {x}" for x in errs))
    else:
        raise AssertionError("a damaged rank file loaded")
    _mark(root, "damaged", rank)
    _done()


def kill_scenario(rank, world, root, target, base):
    import torch.distributed.checkpoint as dcp

    import mithril_gpu.writer as mw
    from mithril_gpu.dcp import MithrilWriter

    mesh = _init(rank, world, root, "kill" + str(world))
    state = build(mesh, seed=1, steps=3)
    if rank == world - 1:
        real = mw.AtomicFile.write
        calls = [0]

        def write(self, data, lent=False):
            calls[0] += 1
            if calls[0] == 3:          # mid-way through this rank's file
                open(os.path.join(root, f"killing_{world}"), "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, data, lent=lent)

        mw.AtomicFile.write = write
    dcp.save(state, storage_writer=MithrilWriter(target, base=base))
    raise AssertionError("the save was not killed")


def process_scenario(rank, world, root):
    """dcp.async_save in process mode: DCP pickles the writer to a checkpoint process of its own."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    from mithril_gpu.dcp import MithrilReader, MithrilWriter

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    state = build(mesh, seed=1, steps=1)
    ref = flat(state)
    dcp.async_save(state, storage_writer=MithrilWriter(os.path.join(root, "p")),
                   async_checkpointer_type=AsyncCheckpointerType.PROCESS).result()
    fresh = build(mesh, seed=5)
    dcp.load(fresh, storage_reader=MithrilReader(os.path.join(root, "p")))
    same(flat(fresh), ref, "process mode")
    _mark(root, "process_mode", rank)
    _done()


def load_scenario(rank, world, root):
    import torch.distributed.checkpoint as dcp

    from mithril_gpu.dcp import IncompleteCheckpointError, MithrilReader, read_json_metadata

    mesh = _init(rank, world, root, f"load{world}")
    ref1 = torch.load(os.path.join(root, "ref1_0.pt"), weights_only=True)
    ref2 = torch.load(os.path.join(root, "ref2_0.pt"), weights_only=True)
    for name, ref in (("m1", ref1), ("m2", ref2)) + ((("ow", ref1),) if world == 1 else ()):
        fresh = build(mesh, seed=9)
        dcp.load(fresh, storage_reader=MithrilReader(os.path.join(root, name)))
        same(flat(fresh), ref, f"{name} on {world} ranks")
    if world == 1:
        try:
            read_json_metadata(os.path.join(root, "k"))
        except IncompleteCheckpointError:
            pass
        else:
            raise AssertionError("a killed save left a committed checkpoint")
    _mark(root, f"reshard{world}", rank)
    _done()


def main():
    mode, root = sys.argv[1], os.path.abspath(sys.argv[2])
    if mode == "save":
        mp.spawn(save_scenario, args=(2, root), nprocs=2)
    elif mode == "kill":
        for target, base, world in ((os.path.join(root, "ow"), None, 2),
                                    (os.path.join(root, "k"), None, 1)):
            try:
                mp.spawn(kill_scenario, args=(world, root, target, base), nprocs=world)
            except ProcessException:      # the killed rank, or a peer that saw it go first
                assert os.path.exists(os.path.join(root, f"killing_{world}")), "a rank failed before the kill"
            else:
                raise AssertionError("the killed save finished")
        open(os.path.join(root, "ok_killed"), "w").close()
    elif mode == "process":
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        mp.spawn(process_scenario, args=(2, root), nprocs=2)
    elif mode.startswith("load"):
        world = int(mode[4:])
        mp.spawn(load_scenario, args=(world, root), nprocs=world)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
