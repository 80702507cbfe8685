"""PyTorch Distributed Checkpoint (DCP) storage: :class:`MithrilWriter` and :class:`MithrilReader`.

DCP (``torch.distributed.checkpoint.save / load / async_save``) plans which rank writes which
shard of which tensor; a storage writer only stores what each rank is handed. These plug mithril
in at that level, as torch's own ``HuggingFaceStorageWriter/Reader`` plug in safetensors::

    import torch.distributed.checkpoint as dcp
    from mithril_gpu.dcp import MithrilWriter, MithrilReader

    dcp.save(state, storage_writer=MithrilWriter("ckpt/step-200", base="ckpt/step-100"))
    dcp.load(state, storage_reader=MithrilReader("ckpt/step-200"))

A checkpoint directory holds:

* one ``.mth`` file per rank, ``__<rank>_<random>.mth``, written atomically by that rank with
  mithril's own writer (the GPU path when the shards live on CUDA, the CPU path otherwise). Its
  tensors are the rank's shards, named by fqn (``fqn@o1,o2`` when a rank holds several shards of
  one fqn); values DCP pickled itself (``BYTE_IO``: ints, strings, RNG states...) are stored as
  they came, as uint8 tensors. Nothing is pickled here.
* ``mithril_dcp.json``, written last by the coordinator (atomically, fsynced): the commit point.
  It holds DCP's ``Metadata`` as JSON (every fqn's dtype, global size and chunks, where each
  chunk is) and the identity of every rank file. A save killed before it is written leaves no
  committed checkpoint; one killed while overwriting a committed directory leaves the previous
  checkpoint loadable (new rank files have new names; files no longer listed are removed after
  the commit).

Deltas: ``base=`` a previous checkpoint directory of the same run (written by MithrilWriter):
each rank's file is written as a delta against that rank's file of the base, shard by shard
(matched by name, dtype and shape), so unchanged shards cost nothing and changed ones are coded
against their previous values. The base directory must stay where it is for the delta to load.

Conversions (the ``mithril compress / decompress / info`` commands on a directory):
:func:`compress_dir` turns a stock DCP checkpoint (``FileSystemWriter`` output, ``.metadata``
plus ``*.distcp``) into a mithril one, :func:`decompress_dir` goes back, :func:`info_dir` sums
one up.
"""
from __future__ import annotations

import io
import json
import os
import re
import uuid
from dataclasses import dataclass

from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

from . import container, writer
from .writer import free_in_background
from .errors import (BaseConflictError, BaseMismatchError, CorruptFileError, FormatError, IncompleteCheckpointError,  # noqa: F401
                     MithrilError, UnsupportedValueError, short)

METADATA_NAME = "mithril_dcp.json"       # the commit point of a mithril DCP checkpoint
STOCK_METADATA_NAME = ".metadata"        # the commit point of a FileSystemWriter checkpoint
FORMAT_NAME = "mithril-dcp"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 256 << 20
_RANK_FILE = re.compile(r"^__(\d+)_([0-9a-f]{8})\.mth$")
_STOCK_FILE = re.compile(r"^__\d+_\d+\.distcp$")       # FileSystemWriter's data files


@dataclass(frozen=True)
class _Loc:
    """Where one saved chunk (or BYTE_IO value) is: the rank file and the tensor name in it."""

    file: str
    name: str


# ---------------------------------------------------------------- metadata <-> JSON

def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name):
    import torch

    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise CorruptFileError(f"corrupt DCP metadata: unknown dtype {short(repr(name), 60)}")
    return dt


def _ints(v, what: str) -> list:
    if not isinstance(v, list) or not all(type(x) is int and x >= 0 for x in v):
        raise CorruptFileError(f"corrupt DCP metadata: {short(what)} is not a list of non-negative ints")
    return v


def metadata_to_json(metadata, files: dict, locs: dict, base: str | None = None) -> dict:
    """DCP ``Metadata`` as a JSON-able dict. ``locs``: {MetadataIndex: _Loc}; ``files``:
    {file name: {"rank": r, "xxh64": identity, "size": bytes, "source": stock file name (converted)}}."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from . import tree as tree_mod

    entries = []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            loc = locs.get(MetadataIndex(fqn))
            if loc is None:
                raise MithrilError(f"DCP metadata lists {short(fqn)!r}, which no rank wrote")
            entries.append({"fqn": fqn, "kind": "bytes", "file": loc.file, "name": loc.name})
            continue
        p = md.properties
        chunks = []
        for c in md.chunks:
            loc = locs.get(MetadataIndex(fqn, c.offsets))
            if loc is None:
                raise MithrilError(f"DCP metadata lists a chunk of {short(fqn)!r} at {list(c.offsets)}, "
                                   "which no rank wrote")
            chunks.append({"offsets": list(c.offsets), "sizes": list(c.sizes), "file": loc.file, "name": loc.name})
        entries.append({"fqn": fqn, "kind": "tensor", "dtype": _dtype_name(p.dtype), "size": list(md.size),
                        "requires_grad": bool(p.requires_grad), "chunks": chunks})
    planner = None
    if metadata.planner_data is not None:
        try:
            planner, _ = tree_mod.encode(metadata.planner_data, lambda x: False)
        except UnsupportedValueError as e:
            raise UnsupportedValueError(f"the save planner's planner_data cannot be stored without pickle: {e}") \
                from None
    sm = metadata.storage_meta
    storage_meta = None
    if sm is not None:
        storage_meta = {"checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
                        "save_id": sm.save_id, "modules": list(sm.modules or [])}
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dcp_version": metadata.version,
            "files": files, "base": base, "entries": entries, "planner_data": planner,
            "storage_meta": storage_meta}


def metadata_from_json(d: dict):
    """(DCP ``Metadata`` whose storage_data is {MetadataIndex: _Loc}, files dict), every field
    checked (a damaged or foreign file gives :class:`CorruptFileError`)."""
    import torch
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    from . import tree as tree_mod

    def bad(what):
        return CorruptFileError(f"corrupt DCP metadata ({METADATA_NAME}): {what}")

    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise bad("not a mithril DCP metadata file")
    if d.get("version") != FORMAT_VERSION:
        raise FormatError(f"{METADATA_NAME} is of version {short(repr(d.get('version')), 40)}; this mithril "
                          f"reads version {FORMAT_VERSION}: upgrade mithril-gpu")
    files = d.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and _safe_name(k) and isinstance(v, dict)
                                              and isinstance(v.get("xxh64"), str)
                                              and (v.get("rank") is None or type(v.get("rank")) is int)
                                              for k, v in files.items()):
        raise bad("bad 'files'")
    sdm, storage = {}, {}
    entries = d.get("entries")
    if not isinstance(entries, list):
        raise bad("bad 'entries'")
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("fqn"), str) or e["fqn"] in sdm:
            raise bad("an entry without a (unique) fqn")
        fqn = e["fqn"]

        def loc(x):
            if not isinstance(x.get("file"), str) or x["file"] not in files or not isinstance(x.get("name"), str):
                raise bad(f"entry {short(fqn)!r} points to a file or name not listed")
            return _Loc(x["file"], x["name"])

        if e.get("kind") == "bytes":
            sdm[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = loc(e)
        elif e.get("kind") == "tensor":
            size = _ints(e.get("size"), f"size of {fqn}")
            chunks = []
            if not isinstance(e.get("chunks"), list):
                raise bad(f"entry {short(fqn)!r} has no chunk list")
            for c in e["chunks"]:
                if not isinstance(c, dict):
                    raise bad(f"entry {short(fqn)!r}: bad chunk")
                off, sz = _ints(c.get("offsets"), f"offsets of {fqn}"), _ints(c.get("sizes"), f"sizes of {fqn}")
                if len(off) != len(size) or len(sz) != len(size) or any(o + s > n for o, s, n in zip(off, sz, size)):
                    raise bad(f"a chunk of {short(fqn)!r} lies outside its tensor")
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(sz)))
                storage[MetadataIndex(fqn, off)] = loc(c)
            props = TensorProperties(dtype=_torch_dtype(e.get("dtype")), requires_grad=bool(e.get("requires_grad")))
            sdm[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(size), chunks=chunks)
        else:
            raise bad(f"entry {short(fqn)!r} has an unknown kind")
    planner = None
    if d.get("planner_data") is not None:
        try:
            tree_mod.check(d["planner_data"], [])
            planner = tree_mod.decode(d["planner_data"], lambda i: None)
        except MithrilError as ex:
            raise bad(f"planner_data: {ex}") from None
    sm = d.get("storage_meta")
    storage_meta = StorageMeta()
    if isinstance(sm, dict):
        modules = sm.get("modules") or []
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise bad("bad 'storage_meta.modules'")
        storage_meta = StorageMeta(checkpoint_id=sm.get("checkpoint_id"), save_id=sm.get("save_id"),
                                   modules=list(modules))
    md = Metadata(state_dict_metadata=sdm, planner_data=planner, storage_data=storage, storage_meta=storage_meta,
                  version=d.get("dcp_version"))
    return md, files


def _rank_threads(threads: int | None) -> int:
    """Threads for one rank: as given, or the cores this process may use shared among the ranks of
    this machine (torchrun's LOCAL_WORLD_SIZE), so that 8 ranks do not each start a thread per core."""
    if threads:
        return threads
    from .cpu import default_threads

    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, default_threads() // local)


def _safe_name(name: str) -> bool:
    """A file name recorded in the metadata: a plain name in the directory, never a path."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def read_json_metadata(path) -> dict:
    """The parsed ``mithril_dcp.json`` of checkpoint directory ``path``."""
    mpath = os.path.join(os.fspath(path), METADATA_NAME)
    try:
        with open(mpath, "rb") as fh:
            raw = fh.read(MAX_METADATA_BYTES + 1)
    except FileNotFoundError:
        stock = os.path.exists(os.path.join(os.fspath(path), STOCK_METADATA_NAME))
        raise IncompleteCheckpointError(
            f"{short(path)} holds no committed mithril DCP checkpoint (no {METADATA_NAME}): "
            + ("it is a stock DCP checkpoint: load it with FileSystemReader, or convert it with "
               "`mithril compress`" if stock else "its save did not finish, or it is not a checkpoint")) from None
    except (NotADirectoryError, IsADirectoryError):
        raise IncompleteCheckpointError(f"{short(path)} is not a DCP checkpoint directory") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise CorruptFileError(f"{short(mpath)} is larger than {MAX_METADATA_BYTES >> 20} MiB: not DCP metadata")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptFileError(f"{short(mpath)} is not valid JSON: the metadata is damaged") from None


def _refuse_chain_through(base: str, doc: dict, path: str) -> None:
    """Refuse a delta against ``base`` (its metadata ``doc``) when a directory of its chain of bases
    is ``path``, the checkpoint being written: that save removes the files of ``path`` the chain
    needs (two slots saved in turn, each against the other), and neither would load again."""
    from .reader import MAX_CHAIN

    here, d, seen = os.path.realpath(path), base, 0
    while seen <= MAX_CHAIN:
        rel = doc.get("base") if isinstance(doc, dict) else None
        if not isinstance(rel, str):
            return
        d = os.path.join(d, rel)
        if os.path.realpath(d) == here:
            raise BaseConflictError(f"cannot write {short(path)} as a delta against {short(base)}, whose chain of bases "
                             f"holds {short(path)} itself: the save would remove files that chain needs, and neither "
                             "checkpoint would load again; write it to another directory, or without base=")
        try:
            doc = read_json_metadata(d)
        except MithrilError:
            return                      # (a base missing further down: its loads say so)
        seen += 1


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _write_json_atomic(path: str, obj) -> None:
    from .writer import AtomicFile

    with AtomicFile(path) as out:
        out.write(_json_bytes(obj))


def _holds(path: str, data: bytes) -> bool:
    """Whether the file at ``path`` holds exactly ``data``."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(data) + 1) == data
    except OSError:
        return False


def is_mithril_dcp_dir(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_NAME))


def is_stock_dcp_dir(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, STOCK_METADATA_NAME))


def _base_rank_file(base_dir: str, rank: int) -> str | None:
    """The rank file of ``rank`` in the committed checkpoint ``base_dir`` (None: that rank wrote none)."""
    d = read_json_metadata(base_dir)
    files = d.get("files") if isinstance(d, dict) else None
    if not isinstance(files, dict):
        raise CorruptFileError(f"corrupt DCP metadata in {short(base_dir)}: bad 'files'")
    for name, rec in files.items():
        if isinstance(rec, dict) and rec.get("rank") == rank and isinstance(name, str) and _safe_name(name):
            return os.path.join(base_dir, name)
    return None


# ---------------------------------------------------------------- the writer

_WRITER_DOC = """A DCP ``StorageWriter`` that writes a mithril checkpoint directory (see :mod:`mithril_gpu.dcp`).

    Args:
        path: the checkpoint directory (created if missing). ``dcp.save(checkpoint_id=...)`` replaces it.
        base: an earlier checkpoint directory of the same run, written by MithrilWriter: each rank's
            file is a delta against that rank's file of ``base`` (shards matched by fqn, dtype, shape).
        level, threads, chunk_elems, device: as :func:`mithril_gpu.save` (``device="auto"``: the GPU
            path when the shards are CUDA tensors and the GPU backend can run). ``threads`` is per
            rank; by default the cores shared among the ranks of the machine (LOCAL_WORLD_SIZE).
        overwrite: whether a directory that already holds a committed checkpoint may be written to.

    The writer holds only plain values (no open files, threads or CUDA handles): it pickles, as
    ``dcp.async_save`` in process mode needs, and its heavy work runs with the GIL released.
    """

_READER_DOC = """A DCP ``StorageReader`` for checkpoint directories written by :class:`MithrilWriter` (or
    converted with ``mithril compress``). Resharding is DCP's: any number of ranks can load what any
    number saved. ``verify=False`` skips checksum checks; ``threads``: CPU threads per rank.
    """


class MithrilWriter(StorageWriter):
    __doc__ = _WRITER_DOC

    def __init__(self, path, *, base=None, level: int | None = None, threads: int | None = None,
                 chunk_elems: int = container.DEFAULT_CHUNK_ELEMS, device: str = "auto", overwrite: bool = True):
        super().__init__()
        self.path = os.fspath(path)
        self.base = None if base is None else os.fspath(base)
        self.level, self.threads, self.chunk_elems, self.device = level, threads, chunk_elems, device
        self.overwrite = overwrite
        self.save_id = uuid.uuid4().hex
        self.rank: int | None = None
        self.is_coordinator = False

    # -- DCP protocol
    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        if kwargs.get("use_collectives", True) is False:
            raise MithrilError("MithrilWriter needs use_collectives=True: the coordinator writes the one "
                               "metadata file that commits the checkpoint")

    def prepare_local_plan(self, plan):
        os.makedirs(self.path, exist_ok=True)
        if self.base is not None:
            if os.path.realpath(self.base) == os.path.realpath(self.path):      # (links too)
                raise BaseConflictError(f"base= is the checkpoint being written ({short(self.path)}): a delta needs an "
                                 "earlier checkpoint directory")
            doc = read_json_metadata(self.base)      # a committed mithril checkpoint, said before any work
            _refuse_chain_through(self.base, doc, self.path)
        if not self.overwrite and (os.path.exists(os.path.join(self.path, METADATA_NAME))
                                   or os.path.exists(os.path.join(self.path, STOCK_METADATA_NAME))):
            raise MithrilError(f"a checkpoint is already committed in {short(self.path)} and overwrite=False")
        return plan

    def prepare_global_plan(self, plans):
        import dataclasses

        return [dataclasses.replace(p, storage_data={"rank": i}) for i, p in enumerate(plans)]

    def write_data(self, plan, planner):
        from torch.futures import Future

        fut = Future()
        fut.set_result(self._write(plan, planner))
        return fut

    def finish(self, metadata, results) -> None:
        metadata.version = metadata.version or "1.0.0"
        metadata.storage_meta = self.storage_meta()
        locs, files = {}, {}
        for wr_list in results:
            for wr in wr_list:
                sd = wr.storage_data
                locs[wr.index] = _Loc(sd["file"], sd["name"])
                files[sd["file"]] = {"rank": sd["rank"], "xxh64": sd["xxh64"], "size": sd["size"]}
        base = None
        if self.base is not None:
            base = os.path.relpath(os.path.abspath(self.base), os.path.abspath(self.path))
        doc = metadata_to_json(metadata, files, locs, base=base)
        mpath = os.path.join(self.path, METADATA_NAME)
        try:
            _write_json_atomic(mpath, doc)     # the commit point
        except BaseException:
            # not committed (a full disk, most often): this save's rank files are garbage that
            # would keep the disk full until a later save into this folder; the earlier commit,
            # if any, and its files stay as they were. (Committed, and interrupted after the
            # rename, as by a Ctrl-C during the folder's fsync: the files are the checkpoint's.)
            if _holds(mpath, _json_bytes(doc)):
                raise
            for name in files:
                try:
                    os.unlink(os.path.join(self.path, name))
                except OSError:
                    pass
            raise
        _remove_unlisted(self.path, files)

    def storage_meta(self):
        from torch.distributed.checkpoint.metadata import StorageMeta

        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @property
    def checkpoint_id(self):
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        try:
            os.fspath(checkpoint_id)
            return True
        except TypeError:
            return False

    # -- the work
    def _write(self, plan, planner) -> list:
        import torch
        from torch.distributed.checkpoint.planner import WriteItemType
        from torch.distributed.checkpoint.storage import WriteResult

        from . import api
        from .reader import SKIP_BASE, MthFile

        items = plan.items
        if not items:
            return []
        sd = plan.storage_data if isinstance(plan.storage_data, dict) else {}
        rank = sd.get("rank", self.rank if self.rank is not None else 0)
        fname = f"__{rank}_{uuid.uuid4().hex[:8]}.mth"
        path = os.path.join(self.path, fname)
        count: dict[str, int] = {}
        for it in items:
            count[it.index.fqn] = count.get(it.index.fqn, 0) + 1
        obj, names = {}, []
        for it in items:
            fqn = it.index.fqn
            name = fqn
            if count[fqn] > 1:
                name = fqn + "@" + ",".join(map(str, it.index.offset or ()))
                # (an fqn may itself read "w@0,0": a shard's name never takes another item's)
                k, first = 1, name
                while name in obj or name in count:
                    name, k = f"{first}#{k}", k + 1
            data = planner.resolve_data(it)
            if it.type == WriteItemType.BYTE_IO:
                buf = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(bytes(data))
                t = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else \
                    torch.empty(0, dtype=torch.uint8)
            else:
                t = data.detach()     # a new tensor object each time: two fqns sharing a tensor stay two
            if name in obj:               # (cannot happen: names are made unique above; never silently)
                raise UnsupportedValueError(f"cannot name the shard {short(name)!r} in the rank file uniquely")
            obj[name] = t
            names.append(name)
        base = _base_rank_file(self.base, rank) if self.base is not None else None
        try:                            # this rank's files of the save this one replaces (kept until the commit)
            old = [os.path.join(self.path, n) for n in os.listdir(self.path)
                   if n.startswith(f"__{rank}_") and _RANK_FILE.match(n) and n != fname]
        except OSError:
            old = []
        writer.release_cache(old)
        api.save(obj, path, base=base, level=self.level, threads=_rank_threads(self.threads),
                 chunk_elems=self.chunk_elems, device=self.device, metadata={"mithril.dcp.rank": str(rank)})
        del obj
        with MthFile(path, verify=False, base=SKIP_BASE) as f:
            identity, size = f.identity, f.size
            stored = {e.name: e.stored_bytes for e in f.index.tensors}
        lost = [n for n in names if n not in stored]
        if lost:        # two fqns that map to one name (an fqn spelled like "x@0,0"): never silently
            raise UnsupportedValueError(f"cannot name the shard {short(lost[0])!r} in the rank file uniquely")
        return [WriteResult(index=it.index, size_in_bytes=stored.get(n, 0),
                            storage_data={"file": fname, "name": n, "rank": rank, "xxh64": identity,
                                          "size": size})
                for it, n in zip(items, names)]


def _plain_value_globals() -> list:
    """Classes and constructors of plain values training states hold as DCP values, beyond
    torch's allow-list, that rebuild data and run nothing else: numpy scalars, numpy RNGs
    (RandomState, Generator and their bit generators), io.BytesIO, datetime values, paths."""
    import datetime
    import importlib
    import pathlib

    out = [io.BytesIO, datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone,
           pathlib.PosixPath, pathlib.PurePosixPath]
    for mod, names in (("numpy._core.multiarray", ("scalar",)), ("numpy.core.multiarray", ("scalar",)),
                       ("numpy.random._pickle", ("__randomstate_ctor", "__generator_ctor", "__bit_generator_ctor")),
                       ("numpy.random", ("RandomState", "Generator", "MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64",
                                         "SeedSequence")),
                       ("numpy.random.bit_generator", ("__pyx_unpickle_SeedSequence",))):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        out += [getattr(m, n) for n in names if hasattr(m, n)]
    return out


def _refuse_unsafe_pickle(raw: bytes, fqn: str) -> None:
    """DCP's planners unpickle a BYTE_IO value with ``torch.load(weights_only=False)``: anything
    the file holds would run. mithril reads nothing it has not first unpickled with
    ``weights_only=True`` (torch's allow-list, plus what the caller added with
    ``torch.serialization.add_safe_globals``); a value that needs more is refused."""
    import torch

    from .formats import _numpy_safe_globals, _torch_refusal

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals() + _plain_value_globals()):
            torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        why = _torch_refusal(e)
        if "Unsupported global" in why or "weights_only" in str(e) or "WeightsUnpickler" in str(e):
            raise UnsupportedValueError(
                f"value {short(fqn)!r} needs more than torch's weights_only allow-list to unpickle ({why}): "
                "refused, nothing in a file is executed; if you trust this checkpoint, allow its classes with "
                "torch.serialization.add_safe_globals") from None
        raise CorruptFileError(f"value {short(fqn)!r} does not unpickle ({why}): the rank file is damaged") from None


class MithrilReader(StorageReader):
    __doc__ = _READER_DOC

    def __init__(self, path, *, verify: bool = True, threads: int | None = None):
        super().__init__()
        self.path = os.fspath(path)
        self.verify, self.threads = verify, threads
        self.storage_data: dict = {}
        self.files: dict = {}
        self.load_id = uuid.uuid4().hex

    def reset(self, checkpoint_id=None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.load_id = uuid.uuid4().hex

    def read_metadata(self):
        md, self.files = metadata_from_json(read_json_metadata(self.path))
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage_data = metadata.storage_data
        if not self.files:
            self.files = metadata_from_json(read_json_metadata(self.path))[1]

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner):
        from torch.futures import Future

        self._read(plan, planner)
        fut = Future()
        fut.set_result(None)
        return fut

    @property
    def checkpoint_id(self):
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        try:
            return is_mithril_dcp_dir(os.fspath(checkpoint_id))
        except TypeError:
            return False

    def _read(self, plan, planner) -> None:
        from torch.distributed.checkpoint.planner import LoadItemType

        from .reader import MthFile

        per_file: dict[str, list] = {}
        for req in plan.items:
            loc = self.storage_data.get(req.storage_index)
            if loc is None:
                raise CorruptFileError(f"the DCP metadata of {short(self.path)} has no chunk "
                                       f"{short(req.storage_index.fqn)!r} at {list(req.storage_index.offset or ())}")
            per_file.setdefault(loc.file, []).append((req, loc))
        for fname, reqs in per_file.items():
            path = os.path.join(self.path, fname)
            try:
                with MthFile(path, verify=self.verify, threads=_rank_threads(self.threads)) as f:
                    want = self.files.get(fname, {}).get("xxh64")
                    if f.identity != want:
                        raise BaseMismatchError(
                            f"not the rank file the checkpoint committed (identity {f.identity}, expected {want}): "
                            "the directory mixes files of two saves")
                    for req, loc in reqs:
                        if req.type == LoadItemType.BYTE_IO:
                            raw = f.get_bytes(loc.name).tobytes()
                            _refuse_unsafe_pickle(raw, req.dest_index.fqn)
                            planner.load_bytes(req, io.BytesIO(raw))
                            continue
                        target = planner.resolve_tensor(req).detach()
                        key = tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))
                        read_box(f, loc.name, key, target)
                        planner.commit_tensor(req, target)
            except MithrilError as e:        # say which rank file
                err = type(e)(f"{short(path)}: {e}")
                raise err.with_traceback(e.__traceback__) from None
            except FileNotFoundError:
                raise IncompleteCheckpointError(f"{short(path)}: this rank file of the checkpoint is missing") \
                    from None
            except KeyError as e:            # a name the metadata lists and the (committed) file lacks
                raise CorruptFileError(f"{short(path)}: {short(e.args[0] if e.args else e, 200)}: the checkpoint's "
                                       f"{METADATA_NAME} is damaged") from None



def _remove_unlisted(directory: str, files: dict) -> None:
    """After a commit: remove rank files of earlier saves into the same directory (big ones on a
    background thread, off the save's critical path; any left by a killed process go at the next
    save), and a stock (FileSystemWriter) checkpoint the save replaced: its ``.metadata`` first,
    then its ``.distcp`` files (left there, ``dcp.load`` without a reader went on loading it)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    if STOCK_METADATA_NAME in names:
        try:
            os.unlink(os.path.join(directory, STOCK_METADATA_NAME))
        except OSError:
            pass
    for name in names:
        if (_RANK_FILE.match(name) and name not in files) or _STOCK_FILE.match(name):
            free_in_background(os.path.join(directory, name))


def read_box(f, name: str, key: tuple, out) -> None:
    """Copy box ``key`` (a tuple of slices) of tensor ``name`` of open file ``f`` into ``out``
    (a tensor of the box's shape). The whole tensor of a contiguous CPU ``out`` of the file's dtype
    is decoded straight into it; a partial box decodes only the rows that cover it, each checked
    against its row digest (``MthFile.get_slice``). An ``out`` of another dtype (a bf16 checkpoint
    loaded into fp32 parameters) gets the values cast by ``Tensor.copy_``, as stock DCP does."""
    from . import dtypes

    e = f.entry(name)
    want = dtypes.to_torch(e.dtype)
    box = tuple(s.stop - s.start for s in key)
    if len(key) != len(e.shape) or any(s.start < 0 or s.stop > n for s, n in zip(key, e.shape)):
        raise CorruptFileError(f"tensor {short(name)!r} {list(e.shape)} does not hold the box "
                               f"{[(s.start, s.stop) for s in key]} the DCP metadata says it holds")
    if tuple(out.shape) != box:
        raise CorruptFileError(f"tensor {short(name)!r} is {e.dtype.name} {list(e.shape)}; the "
                               f"checkpoint metadata asks for {list(box)} of it, into a tensor of {list(out.shape)}")
    if out.dtype != want:
        import torch

        got = torch.empty(box, dtype=want)
        f.get_slice(name).read_into(key, got)
        with torch.no_grad():
            out.copy_(got)
        return
    f.get_slice(name).read_into(key, out)     # whole: straight into out; a box: only its rows, verified


# ---------------------------------------------------------------- stock DCP checkpoints (FileSystemWriter)

_STOCK_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def _restricted_unpickler():
    import pickle

    import torch

    class MetadataUnpickler(pickle.Unpickler):
        """Reads a stock DCP ``.metadata`` file: only DCP's metadata classes, torch.Size and torch
        dtypes/layouts/memory formats may appear in it; anything else is refused, never imported."""

        def find_class(self, module, name):
            if name in _STOCK_CLASSES.get(module, ()):
                return super().find_class(module, name)
            if module == "torch":
                v = getattr(torch, name, None) if isinstance(name, str) and not name.startswith("_") else None
                if name == "Size" or isinstance(v, (torch.dtype, torch.layout, torch.memory_format)):
                    return v
            raise UnsupportedValueError(f"the DCP metadata refers to {short(module, 60)}.{short(name, 60)}, which a "
                                        "stock DCP checkpoint never holds: refusing to unpickle it")

    return MetadataUnpickler


def load_stock_metadata(path):
    """The ``Metadata`` of a stock DCP checkpoint directory, unpickled with an allow-list (DCP's own
    metadata classes only: no code from the file can run)."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    mpath = os.path.join(os.fspath(path), STOCK_METADATA_NAME)
    if not os.path.isfile(mpath):
        raise IncompleteCheckpointError(f"{short(path)} holds no committed DCP checkpoint (no {STOCK_METADATA_NAME})")
    if os.path.getsize(mpath) > MAX_METADATA_BYTES:
        raise CorruptFileError(f"{short(mpath)} is larger than {MAX_METADATA_BYTES >> 20} MiB: not DCP metadata")
    with open(mpath, "rb") as fh:
        try:
            md = _restricted_unpickler()(fh).load()
        except MithrilError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
                RecursionError, UnicodeDecodeError, OverflowError) as e:
            raise CorruptFileError(f"{short(mpath)} cannot be read as DCP metadata ({short(e, 80)})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CorruptFileError(f"{short(mpath)} is not DCP metadata of a FileSystemWriter checkpoint")
    return md


def _stock_items(md, src: str) -> dict:
    """{.distcp file name: [(MetadataIndex, storage info, dtype or None for BYTE_IO, chunk sizes)]},
    each list in file order, every record checked against the directory."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    per_file: dict[str, list] = {}
    sizes: dict[str, int | None] = {}     # data file -> its size (None: not a regular file), one stat each

    def size_of(name: str):
        if name not in sizes:
            p = os.path.join(src, name)
            sizes[name] = os.path.getsize(p) if os.path.isfile(p) else None
        return sizes[name]
    for idx, info in md.storage_data.items():
        if not isinstance(info, _StorageInfo):
            raise UnsupportedValueError(f"{short(src)} was not written by FileSystemWriter in its default torch.save "
                                        "format (safetensors or another storage layout): it cannot be converted")
        name = info.relative_path
        if not isinstance(name, str) or not _safe_name(name) or size_of(name) is None:
            raise CorruptFileError(f"DCP metadata of {short(src)} refers to a missing data file {short(repr(name))}")
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0 \
                or info.offset + info.length > size_of(name):
            raise CorruptFileError(f"DCP metadata of {short(src)}: bad offset or length for {short(idx.fqn)!r} "
                                   f"(beyond the end of {short(name)})")
        smd = md.state_dict_metadata.get(idx.fqn)
        if isinstance(smd, BytesStorageMetadata):
            per_file.setdefault(name, []).append((idx, info, None, None))
        elif isinstance(smd, TensorStorageMetadata):
            chunk = next((c for c in smd.chunks if tuple(c.offsets) == tuple(idx.offset or ())), None)
            if chunk is None:
                raise CorruptFileError(f"DCP metadata of {short(src)}: no chunk of {short(idx.fqn)!r} at "
                                       f"{list(idx.offset or ())}")
            if not all(type(x) is int and x >= 0 for x in tuple(smd.size) + tuple(chunk.sizes)):
                raise CorruptFileError(f"DCP metadata of {short(src)}: {short(idx.fqn)!r} has a negative size")
            per_file.setdefault(name, []).append((idx, info, smd.properties.dtype, tuple(chunk.sizes)))
        else:
            raise CorruptFileError(f"DCP metadata of {short(src)}: {short(idx.fqn)!r} is stored but not described")
    for recs in per_file.values():
        recs.sort(key=lambda r: r[1].offset)
    return per_file


def _names_in_file(indices) -> list[str]:
    count: dict[str, int] = {}
    for idx in indices:
        count[idx.fqn] = count.get(idx.fqn, 0) + 1
    return [idx.fqn if count[idx.fqn] == 1 else idx.fqn + "@" + ",".join(map(str, idx.offset or ())) for idx in indices]


def _rank_of(name: str):
    m = re.match(r"^__(\d+)_", name)
    return int(m.group(1)) if m else None


def compress_dir(src, dst, *, base=None, level=None, threads=None, chunk_elems=container.DEFAULT_CHUNK_ELEMS,
                 progress=None) -> tuple[int, int]:
    """Convert the stock DCP checkpoint ``src`` (FileSystemWriter output) into the mithril DCP
    checkpoint ``dst`` that :class:`MithrilReader` loads: every ``X.distcp`` becomes ``X.mth``
    (its items stored as they were sharded), ``mithril_dcp.json`` is written last. ``base``: an
    earlier mithril DCP checkpoint of the same run (files matched by their source name, then by
    rank). One item is held in memory at a time. Returns (data bytes, bytes written)."""
    import shutil

    import torch

    from . import api, dtypes
    from .cpu import EncodeItem
    from .reader import SKIP_BASE, MthFile
    from .transforms import default_transform

    src, dst = os.fspath(src), os.fspath(dst)
    md = load_stock_metadata(src)
    per_file = _stock_items(md, src)
    base_files = {}
    if base is not None:
        bd = read_json_metadata(base)
        bfiles = bd.get("files") if isinstance(bd, dict) else None
        if isinstance(bfiles, dict):
            for n, rec in bfiles.items():
                if isinstance(rec, dict) and isinstance(n, str) and _safe_name(n):
                    base_files.setdefault(("source", rec.get("source")), n)
                    base_files.setdefault(("rank", rec.get("rank")), n)
    os.makedirs(dst, exist_ok=True)
    files, locs, raw_total = {}, {}, 0
    for fname in sorted(per_file):
        recs = per_file[fname]
        names = _names_in_file([r[0] for r in recs])
        out_name = fname[:-len(".distcp")] + ".mth" if fname.endswith(".distcp") else fname + ".mth"
        if not _safe_name(out_name) or out_name == METADATA_NAME:
            raise UnsupportedValueError(f"cannot name the output of {short(fname)}")
        fh = open(os.path.join(src, fname), "rb")
        try:
            items = []
            for (idx, info, dtype, sizes), name in zip(recs, names):
                def fetch(info=info, dtype=dtype, sizes=sizes, fqn=idx.fqn):
                    fh.seek(info.offset)
                    raw = fh.read(info.length)
                    if len(raw) != info.length:
                        raise CorruptFileError(f"{short(fname)} ends before item {short(fqn)!r}: the file is truncated")
                    if info.transform_descriptors:
                        from torch.distributed.checkpoint._extension import ExtensionRegistry

                        stream = io.BytesIO(raw)
                        for ex in ExtensionRegistry().from_descriptor_list(info.transform_descriptors):
                            stream = ex.transform_from(stream)
                        raw = stream.read()
                    if dtype is None:
                        return api.tensor_bytes(torch.frombuffer(bytearray(raw), dtype=torch.uint8)) if raw else \
                            api.tensor_bytes(torch.empty(0, dtype=torch.uint8))
                    try:
                        t = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
                    except Exception as e:
                        raise CorruptFileError(f"{short(fname)}: item {short(fqn)!r} is not a readable tensor "
                                               f"({short(e, 80)})") from None
                    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != sizes:
                        raise CorruptFileError(f"{short(fname)}: item {short(fqn)!r} is not the {dtype} {list(sizes)} "
                                               "tensor the metadata describes")
                    return api.tensor_bytes(t)

                if dtype is None:
                    dt, shape = dtypes.BY_NAME["U8"], None
                else:
                    dt, shape = dtypes.from_torch(dtype), sizes
                if shape is None:        # BYTE_IO: the length is known only once read (extensions)
                    data = fetch()
                    shape = (data.size,)
                else:
                    data = fetch
                items.append(EncodeItem(name, dt, shape, data, default_transform(dt), chunk_elems))
            raw_total += sum(it.nbytes for it in items)
            tree = {"dict": [[{"str": it.name}, {"tensor": i}] for i, it in enumerate(items)]}
            bname = base_files.get(("source", fname)) or base_files.get(("rank", _rank_of(fname)))
            bpath = os.path.join(os.fspath(base), bname) if base is not None and bname else None
            out = os.path.join(dst, out_name)
            api.write_items(out, items, tree=tree, base=bpath, level=level, threads=threads, progress=progress,
                            metadata={"mithril.dcp.source": fname})
        finally:
            fh.close()
        with MthFile(out, verify=False, base=SKIP_BASE) as f:
            files[out_name] = {"rank": _rank_of(fname), "xxh64": f.identity, "size": f.size, "source": fname}
        for (idx, *_), name in zip(recs, names):
            locs[idx] = _Loc(out_name, name)
    from .writer import is_temp_name

    for name in sorted(os.listdir(src)):       # anything else the directory holds is copied
        p = os.path.join(src, name)
        if name != STOCK_METADATA_NAME and name not in per_file and os.path.isfile(p) and name != METADATA_NAME \
                and not is_temp_name(name) and name not in files:
            shutil.copy2(p, os.path.join(dst, name))
    brel = os.path.relpath(os.path.abspath(base), os.path.abspath(dst)) if base is not None else None
    _write_json_atomic(os.path.join(dst, METADATA_NAME), metadata_to_json(md, files, locs, base=brel))
    written = sum(r["size"] for r in files.values()) + os.path.getsize(os.path.join(dst, METADATA_NAME))
    return raw_total, written


def decompress_dir(src, dst, *, verify: bool = True, threads=None, progress=None, base=None) -> tuple[int, int]:
    """Convert the mithril DCP checkpoint ``src`` back into a stock one (``*.distcp`` + a pickled
    ``.metadata``, written last) that ``FileSystemReader`` loads. A checkpoint converted with
    :func:`compress_dir` gets its original file names and item order back. One tensor is held in
    memory at a time. ``base``: where the bases of delta rank files are (a directory), if not
    where they were recorded. Returns (data bytes, packed bytes read)."""
    import pickle

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    from .reader import MthFile
    from .writer import AtomicFile

    src, dst = os.fspath(src), os.fspath(dst)
    d = read_json_metadata(src)
    md, files = metadata_from_json(d)
    by_loc: dict[_Loc, object] = {loc: idx for idx, loc in md.storage_data.items()}
    os.makedirs(dst, exist_ok=True)
    storage, raw_total, packed = {}, 0, 0
    used = set()
    for fname in sorted(files, key=lambda n: (files[n].get("rank") is None, files[n].get("rank") or 0, n)):
        rec = files[fname]
        # the stock file name it was converted from, where it is one (any other name, ".metadata"
        # above all, could be overwritten by, or overwrite, another file of the folder)
        out_name = rec.get("source") if isinstance(rec.get("source"), str) and _STOCK_FILE.match(rec["source"]) else None
        if out_name is None or out_name in used:
            r = rec.get("rank") if type(rec.get("rank")) is int else len(used)
            out_name = f"__{r}_0.distcp"
            k = 1
            while out_name in used:
                out_name, k = f"__{r}_{k}.distcp", k + 1
        used.add(out_name)
        with MthFile(os.path.join(src, fname), verify=verify, threads=threads, base=base) as f, \
                AtomicFile(os.path.join(dst, out_name)) as out:
            if f.identity != rec["xxh64"]:
                raise BaseMismatchError(f"{short(f.path)} is not the rank file the checkpoint committed "
                                        f"(identity {f.identity}, expected {rec['xxh64']})")
            packed += f.size
            for e in f.index.tensors:
                idx = by_loc.get(_Loc(fname, e.name))
                if idx is None:
                    continue
                smd = md.state_dict_metadata[idx.fqn]
                if idx.offset is None:
                    blob = f.get_bytes(e.name).tobytes()
                else:
                    t = f.get_tensor(e.name)
                    chunk = next(c for c in smd.chunks if tuple(c.offsets) == tuple(idx.offset))
                    if t.dtype != smd.properties.dtype or tuple(t.shape) != tuple(chunk.sizes):
                        raise CorruptFileError(f"{short(f.path)}: tensor {short(e.name)!r} is not the chunk the "
                                               "metadata describes")
                    buf = io.BytesIO()
                    torch.save(t, buf)
                    blob = buf.getvalue()
                    del t
                at = out.write(blob)
                storage[idx] = _StorageInfo(out_name, at, len(blob))
                raw_total += e.nbytes
                if progress:
                    progress(e.nbytes)
    import shutil

    from .writer import is_temp_name

    for name in sorted(os.listdir(src)):       # anything else the directory holds is copied back
        p = os.path.join(src, name)
        if name not in files and name != METADATA_NAME and not is_temp_name(name) and not _RANK_FILE.match(name) \
                and name != STOCK_METADATA_NAME and name not in used and os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, name))
    missing = [idx.fqn for idx in md.storage_data if idx not in storage]
    if missing:
        raise CorruptFileError(f"{short(src)}: {len(missing)} items of the metadata are in no rank file "
                               f"({short(missing[0])!r}...)")
    sm = md.storage_meta or StorageMeta()
    stock = Metadata(state_dict_metadata=md.state_dict_metadata, planner_data=md.planner_data, storage_data=storage,
                     storage_meta=StorageMeta(checkpoint_id=sm.checkpoint_id, save_id=sm.save_id,
                                              modules=list(sm.modules or [])),
                     version=md.version)
    with AtomicFile(os.path.join(dst, STOCK_METADATA_NAME)) as out:       # the commit point, last
        out.write(pickle.dumps(stock))
    return raw_total, packed


def info_dir(path) -> dict:
    """A summary of a DCP checkpoint directory (mithril or stock): ranks, files, tensors, sizes, ratio."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    path = os.fspath(path)
    if is_mithril_dcp_dir(path):
        d = read_json_metadata(path)
        md, files = metadata_from_json(d)
        kind = "mithril"
        missing = [n for n in files if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise IncompleteCheckpointError(f"{short(path)}: rank file {short(missing[0])} of the checkpoint is missing")
        stored = sum(os.path.getsize(os.path.join(path, n)) for n in files) + \
            os.path.getsize(os.path.join(path, METADATA_NAME))
        names = sorted(files)
    else:
        md = load_stock_metadata(path)
        kind = "stock"
        names = sorted(_stock_items(md, path))          # (every record checked, as a conversion does)
        stored = sum(os.path.getsize(os.path.join(path, n)) for n in names) + \
            os.path.getsize(os.path.join(path, STOCK_METADATA_NAME))
        d = {}
    tensors = {k: v for k, v in md.state_dict_metadata.items() if not isinstance(v, BytesStorageMetadata)}
    if not all(isinstance(v, TensorStorageMetadata) for v in tensors.values()):
        raise CorruptFileError(f"DCP metadata of {short(path)}: an entry is neither a tensor's nor a value's")
    nbytes = 0
    dtypes_seen: dict[str, int] = {}
    for v in tensors.values():
        n = 1
        for s in v.size:
            n *= s
        n *= torch_element_size(v.properties.dtype)
        nbytes += n
        k = _dtype_name(v.properties.dtype)
        dtypes_seen[k] = dtypes_seen.get(k, 0) + n
    chunks = sum(len(v.chunks) for v in tensors.values())
    ranks = sorted({_rank_of(n) for n in names if _rank_of(n) is not None})
    return {"path": path, "kind": kind, "files": names, "ranks": len(ranks) or len(names), "tensors": len(tensors),
            "chunks": chunks, "values": len(md.state_dict_metadata) - len(tensors), "tensor_bytes": nbytes,
            "stored_bytes": stored, "ratio": nbytes / stored if stored else None, "dtypes": dtypes_seen,
            "base": d.get("base")}


def torch_element_size(dtype) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()


def format_info(s: dict) -> str:
    """The lines ``mithril info`` prints for a DCP directory."""
    mb = 1e6
    lines = [f"{s['path']}: {'mithril' if s['kind'] == 'mithril' else 'stock (FileSystemWriter)'} DCP checkpoint, "
             f"{s['ranks']} ranks, {len(s['files'])} files, {s['tensors']} tensors in {s['chunks']} chunks, "
             f"{s['values']} other values",
             "dtypes: " + ", ".join(f"{k} {v / mb:,.1f} MB" for k, v in sorted(s["dtypes"].items())),
             f"{s['tensor_bytes'] / mb:,.1f} MB of tensors -> {s['stored_bytes'] / mb:,.1f} MB on disk"
             + (f" ({s['ratio']:.3f}x)" if s["ratio"] else "")]
    if s.get("base"):
        lines.append(f"delta against {s['base']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the `mithril` command on DCP directories

def _dir_size(path) -> int:
    """Bytes of the regular files directly in ``path`` (a DCP checkpoint has no subfolders)."""
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))


def _cli_convert(a, compress: bool) -> int:
    """``mithril compress DCP_DIR OUT_DIR [--base MITHRIL_DCP_DIR]`` and ``mithril decompress
    MITHRIL_DCP_DIR OUT_DIR`` (back to a stock FileSystemWriter checkpoint)."""
    import time

    from .cli import _check_out_dir, _summary

    if is_mithril_dcp_dir(a.input) == compress:
        raise MithrilError(f"{short(a.input)} is already a mithril DCP checkpoint" if compress else
                           f"{short(a.input)} is a stock DCP checkpoint (FileSystemWriter): nothing to decompress")
    _check_out_dir(a, "a DCP checkpoint directory")
    if os.path.isdir(a.output) and os.listdir(a.output) and not a.force:
        raise MithrilError(f"OUT ({short(a.output)}) exists: pass -f/--force to write into it")
    from .formats import StagedDir

    t0 = time.perf_counter()
    if compress and a.base is not None and not is_mithril_dcp_dir(a.base):
        raise MithrilError(f"--base {short(a.base)} is not a mithril DCP checkpoint directory (no {METADATA_NAME})")
    # written into a hidden sibling, moved into place at the end: a failed or killed run leaves OUT as
    # it was (a sibling: relative paths to a base outside stay right once it is moved)
    with StagedDir(a.output, force=a.force) as stage:
        if compress:
            compress_dir(a.input, stage.tmp, base=a.base, level=a.level, threads=a.threads, chunk_elems=a.chunk_elems)
            raw, packed = _dir_size(a.input), _dir_size(stage.tmp)
        else:
            decompress_dir(a.input, stage.tmp, verify=not a.no_verify, threads=a.threads, base=a.base)
            raw, packed = _dir_size(stage.tmp), _dir_size(a.input)
    # written into an OUT that held a checkpoint (-f): its commit file and data of the other kind
    # (or of an earlier save) go, so that no reader finds the previous step there
    if compress:
        _remove_unlisted(a.output, read_json_metadata(a.output).get("files") or {})
    else:
        for name in os.listdir(a.output):
            if name == METADATA_NAME or _RANK_FILE.match(name):
                try:
                    os.unlink(os.path.join(a.output, name))
                except OSError:
                    pass
    if not a.quiet:
        print(_summary(f"{'compressed' if compress else 'decompressed'} DCP checkpoint", a.input, a.output, raw,
                       packed, time.perf_counter() - t0, packing=compress))
    return 0


def cli_compress(a) -> int:
    """``mithril compress DCP_DIR OUT_DIR [--base MITHRIL_DCP_DIR]``."""
    return _cli_convert(a, compress=True)


def cli_decompress(a) -> int:
    """``mithril decompress MITHRIL_DCP_DIR OUT_DIR``: back to a stock (FileSystemWriter) checkpoint."""
    return _cli_convert(a, compress=False)


def cli_info(a) -> int:
    """``mithril info DCP_DIR [--json]``."""
    s = info_dir(a.file)
    if a.json:
        print(json.dumps(s, indent=1))
    else:
        print(format_info(s))
    return 0
