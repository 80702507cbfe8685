"""The `mithril` command: compress, decompress, info, verify."""
from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import time
import warnings

from . import __version__, codecs, container
from .errors import MithrilError, short

EPILOG = """examples:
  mithril compress model.safetensors model.mth       compress (byte-exact round trip)
  mithril compress step2000.pt step2000.mth --base step1000.mth
                                                     store only what changed since step1000
  mithril decompress model.mth model.safetensors     back to safetensors (identical bytes)
  mithril decompress ckpt.mth ckpt.pt                back to a torch checkpoint
  mithril compress llama-dir/ llama-mth/             every shard of a model folder (configs copied)
  mithril info model.mth                             tensors, dtypes, ratio per tensor
  mithril verify model.mth                           decode everything, check checksums, rebuild the tree

An existing OUT is never replaced without -f/--force. Outputs get the permission bits of their input.

exit status: 0 success, 1 error (one line on stderr), 2 bad usage, 130 interrupted (Ctrl-C),
128+N ended by signal N (143 SIGTERM, 129 SIGHUP), 141 output pipe closed (as in `mithril info X | head`)."""

MAX_CHUNK_ELEMS = 8 << 20          # as mithril_gpu.save accepts
MIN_MB_FOR_SPEED = 1_000_000       # below this many bytes a MB/s figure measures start-up, not work
DIR_OUT_SUFFIXES = (".mth", ".safetensors", ".pt", ".pth")


def _show(text) -> str:
    """A name or path for normal output: printable (lone surrogates and controls escaped), whole."""
    return short(text, sys.maxsize)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _size(n: float) -> str:
    """Bytes, KB or MB, whichever reads best."""
    return f"{n:,.0f} B" if n < 1e3 else f"{n / 1e3:,.1f} KB" if n < 1e6 else _mb(n)


def _bar(args, total: int, desc: str):
    """The progress bar of a command: on stderr when it is a terminal, none with -q."""
    from .progress import Progress as _progress

    return _progress(None if args.quiet else "auto", total, desc)


def _speed(raw: int, seconds: float) -> str:
    """", N MB/s" of ``raw`` bytes, or nothing for a run too small to measure."""
    if raw < MIN_MB_FOR_SPEED or seconds <= 0:
        return ""
    mbs = raw / seconds / 1e6
    return f", {mbs:,.0f} MB/s" if mbs >= 10 else f", {mbs:.1f} MB/s"


def _summary(verb: str, src: str, dst: str, raw: int, packed: int, seconds: float, *, packing: bool) -> str:
    """One line: sizes in the order of the work (compress: raw -> packed; decompress: packed ->
    raw), the ratio, the time and the speed in uncompressed bytes."""
    ratio = raw / packed if packed else float("inf")
    sizes = f"{_mb(raw)} -> {_mb(packed)}" if packing else f"{_mb(packed)} -> {_mb(raw)}"
    return (f"{verb} {_show(src)} -> {_show(dst)}: {sizes} ({ratio:.3f}x) "
            f"in {seconds:.2f} s{_speed(raw, seconds)}")


# ---------------------------------------------------------------- checks made before any work

def _check_base(a) -> None:
    """The input (IN or FILE) and --base exist: said before any work, naming which is missing."""
    src = getattr(a, "input", None) or getattr(a, "file", None)
    if src is not None and not os.path.exists(src):
        raise MithrilError(f"{short(src)}: no such file or directory")
    if getattr(a, "base", None) is not None and not os.path.exists(a.base):
        raise MithrilError(f"--base {short(a.base)}: no such file or directory")


def _check_paths(a) -> None:
    """IN and OUT of a file command: IN a regular file, not the same file as OUT, OUT not a
    directory, OUT not replaced without --force."""
    if os.path.exists(a.input) and not stat.S_ISREG(os.stat(a.input).st_mode):
        raise MithrilError(f"IN ({short(a.input)}) is not a regular file (a pipe, a device or a socket): mithril "
                           f"reads its input more than once; save it to a file first")
    if os.path.exists(a.output) and os.path.exists(a.input) and os.path.samefile(a.input, a.output):
        raise MithrilError(f"IN and OUT are the same file ({short(a.input)}): write the output under another name")
    if os.path.isdir(a.output):
        raise MithrilError(f"OUT ({short(a.output)}) is a directory: give the output file's name")
    if os.path.lexists(a.output) and not a.force:
        raise MithrilError(f"OUT ({short(a.output)}) exists: pass -f/--force to replace it")


def _mode_of(src: str) -> int | None:
    try:
        return stat.S_IMODE(os.stat(src).st_mode) & 0o777
    except OSError:
        return None


def _check_out_dir(a, what: str) -> None:
    """OUT of a command whose IN is ``what`` (a directory): not IN or inside it, and a directory if it exists."""
    src, dst = os.path.abspath(a.input), os.path.abspath(a.output)
    if dst == src or dst.startswith(src + os.sep):
        raise MithrilError(f"OUT ({short(a.output)}) must not be IN or inside it")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise MithrilError(f"IN ({short(a.input)}) is {what}, so OUT must be a directory too, and "
                           f"{short(a.output)} exists and is not")


SKIP = object()        # what ``convert`` gives for a file left out of OUT


def _walk_dir(a, verb: str, convert, base_for) -> int:
    """Run the command on every checkpoint file of directory IN, mirrored into OUT (subfolders
    kept), and copy every other file as it is. ``convert(src, dst)`` gives the output path of a
    checkpoint file (None: not one, copied; SKIP: left out); ``base_for(rel, name)`` the --base
    for that file. Every check is made before anything is written."""
    src_root, dst_root = os.path.abspath(a.input), os.path.abspath(a.output)
    _check_out_dir(a, "a directory")
    if not os.path.exists(dst_root) and a.output.rstrip("/" + os.sep).endswith(DIR_OUT_SUFFIXES):
        raise MithrilError(f"IN ({short(a.input)}) is a directory, so OUT must be a directory too, and "
                           f"{short(a.output)} names a file: give a directory name")
    if os.path.isdir(dst_root) and not a.force:
        raise MithrilError(f"OUT ({short(a.output)}) exists: pass -f/--force to write into it "
                           "(files of the same names are replaced)")
    if a.base is not None and not os.path.isdir(a.base):
        raise MithrilError(f"with a directory IN, --base must be a directory too ({short(a.base)} is not)")
    plan = []          # (folder to create, src, dst, is checkpoint)
    for folder, dirs, files in os.walk(src_root):
        dirs.sort()
        rel = os.path.relpath(folder, src_root)
        plan.append((os.path.join(dst_root, rel), None, None, False))
        for name in sorted(files):
            src = os.path.join(folder, name)
            try:                        # (before anything reads it: a FIFO would hang, /dev/zero never end)
                st = os.stat(src)
            except OSError as e:
                raise MithrilError(f"{short(src)} cannot be read ({short(e.strerror or e, 80)}): "
                                   "remove it from IN, or fix it") from None
            if not stat.S_ISREG(st.st_mode):
                raise MithrilError(f"{short(src)} is not a regular file (a pipe, a device or a socket, or a link "
                                   "to one): remove it from IN; nothing was written")
            dst = convert(src, os.path.join(dst_root, rel, name))
            if dst is SKIP:
                if not a.quiet:
                    print(f"  left out {_show(os.path.relpath(src, src_root))} (a Lightning delta anchor: "
                          "the files decompressed from it do not need it)")
                continue
            plan.append((None, src, dst or os.path.join(dst_root, rel, name), dst is not None))
    twins = []
    if verb == "decompressed":
        # x beside x.mth: an in-place compress (hf.compress_checkpoint, MithrilCallback) killed
        # between writing x.mth and removing x. x is what x.mth was made from: it is copied as it
        # is and x.mth left out (they would both be written to x)
        plain = {src for _, src, _, ck in plan if src is not None and not ck}
        twins = [p for p in plan if p[3] and p[1].endswith(".mth") and p[1][:-4] in plain]
        for p in twins:
            plan.remove(p)
            if not a.quiet:
                print(f"  left out {_show(os.path.relpath(p[1], src_root))}: "
                      f"{_show(os.path.basename(p[1][:-4]))} beside it is the file it was made from")
    n = sum(1 for p in plan if p[3])
    if n == 0 and not twins:
        what = "checkpoint files (.safetensors or torch)" if verb == "compressed" else ".mth files"
        raise MithrilError(f"no {what} in {short(a.input)}: nothing to {'compress' if verb == 'compressed' else 'decompress'}")
    writes: dict[str, str] = {}
    for make, src, dst, _ in plan:
        if make is not None and os.path.lexists(make) and not os.path.isdir(make):
            raise MithrilError(f"{short(make)} is a file, where the folder {short(os.path.relpath(make, dst_root))} "
                               "would be written: move it away")
        if dst is None:
            continue
        if os.path.isdir(dst):
            raise MithrilError(f"{short(dst)} is a directory, where {short(src)} would be written")
        if dst in writes:
            raise MithrilError(f"{short(writes[dst])} and {short(src)} would both be written to {short(dst)}: "
                               "rename one of them")
        writes[dst] = src
    if verb == "compressed" and a.base is not None:
        _refuse_bases_in_out(plan, src_root, base_for, {os.path.realpath(d) for d in writes})
    from .formats import StagedDir

    # written into a hidden sibling, moved into place at the end: a failed or killed run leaves OUT as it was
    with StagedDir(dst_root, force=a.force) as stage:
        staged = [(m and stage.where(m), s, d and stage.where(d), c) for m, s, d, c in plan]
        return _run_plan(a, verb, staged, src_root, base_for)


def _refuse_bases_in_out(plan, src_root: str, base_for, finals: set) -> None:
    """Refuse, before any work, a --base whose files (or their chains of bases) are files this run
    writes: OUT is built aside and moved into place, so a delta against a file of OUT was coded
    against the file it then replaced, and neither loaded (`--base OUT -f` returned 0)."""
    from .reader import MAX_CHAIN, SKIP_BASE, MthFile

    for _, src, _, is_ckpt in plan:
        if not is_ckpt:
            continue
        rel = os.path.relpath(src, src_root)
        base = base_for(os.path.dirname(rel) or ".", os.path.basename(src))
        seen = 0
        while base is not None and seen <= MAX_CHAIN:
            if os.path.realpath(base) in finals:
                raise MithrilError(f"--base: {short(base)} is a file this run writes (OUT or its chain of bases "
                                   "holds it): a delta against it would replace its own base; give another --base")
            try:
                with MthFile(base, verify=False, base=SKIP_BASE) as f:
                    rec = f.index.base
            except (MithrilError, OSError):
                break
            path = rec.get("path") if isinstance(rec, dict) else None
            base = os.path.join(os.path.dirname(os.path.realpath(base)), path) if isinstance(path, str) else None
            seen += 1


def _run_plan(a, verb, plan, src_root, base_for) -> int:
    import shutil

    from . import formats
    from .errors import UnsupportedValueError

    t0, raw, packed, done = time.perf_counter(), 0, 0, 0
    for make, src, dst, is_ckpt in plan:
        if make is not None:
            os.makedirs(make, exist_ok=True)
            continue
        rel_name = os.path.relpath(src, src_root)
        if not is_ckpt:
            shutil.copy2(src, dst)
            continue
        sub = argparse.Namespace(**{**vars(a), "input": src, "output": dst, "quiet": True,
                                    "base": base_for(os.path.dirname(rel_name) or ".", os.path.basename(src))
                                    if a.base else None})
        try:
            sub.func(sub)
        except (formats.NotPlainTorchError, UnsupportedValueError) as e:
            if verb != "compressed":
                raise
            shutil.copy2(src, dst[:-len(".mth")])    # not a plain tensor checkpoint: kept byte for byte
            if not a.quiet:
                why = ("weights_only=True refuses it" if isinstance(e, formats.NotPlainTorchError)
                       else short(_one_line(e), 200))
                print(f"  copied {_show(rel_name)} as it is (not a plain tensor checkpoint: {why})")
            continue
        sizes = (os.path.getsize(src), os.path.getsize(dst))
        raw += sizes[0] if verb == "compressed" else sizes[1]
        packed += sizes[1] if verb == "compressed" else sizes[0]
        done += 1
        if not a.quiet:
            print(f"  {verb} {_show(rel_name)}: {_mb(sizes[0])} -> {_mb(sizes[1])}")
    if not a.quiet:
        print(_summary(f"{verb} {done} checkpoint files,", a.input, a.output, raw, packed,
                       time.perf_counter() - t0, packing=verb == "compressed"))
    return 0


# ---------------------------------------------------------------- commands

def cmd_compress(a) -> int:
    from . import api, formats, tree as tree_mod

    _check_base(a)
    if any(os.path.isfile(os.path.join(a.input, n)) for n in (".metadata", "mithril_dcp.json")):   # DCP
        from .dcp import cli_compress

        return cli_compress(a)
    if os.path.isdir(a.input):
        noted = set()

        def convert(src, dst):
            if formats.in_dcp_folder(src):         # a DCP folder inside: kept as it is
                folder = os.path.dirname(src)
                if folder not in noted and not a.quiet:
                    noted.add(folder)
                    print(f"  kept {_show(os.path.relpath(folder, a.input))}/ as it is (a torch.distributed.checkpoint "
                          "folder: compress it on its own, `mithril compress DIR OUT`)")
                return None
            return dst + ".mth" if formats.sniff(src) in ("safetensors", "torch") else None

        def base_for(rel, name):   # the same file, compressed, in the base folder (if it has one)
            cand = os.path.join(a.base, rel, name + ".mth")
            return cand if os.path.exists(cand) else None
        return _walk_dir(a, "compressed", convert, base_for)
    from .cpu import EncodeItem
    from .transforms import default_transform

    _check_paths(a)
    kind = formats.sniff(a.input)
    t0 = time.perf_counter()
    if kind == "mth":
        raise MithrilError(f"{short(a.input)} is already a .mth file")
    if kind == "safetensors":
        st = formats.SafetensorsFile(a.input)
        items = [EncodeItem(name, dt, shape, st.data(b, e), default_transform(dt), a.chunk_elems,
                            on_done=lambda b=b, e=e: st.release(b, e))
                 for name, dt, shape, b, e in st.tensors]
        tree = {"dict": [[{"str": it.name}, {"tensor": i}] for i, it in enumerate(items)]}
        raw = sum(it.nbytes for it in items)
        try:
            with _bar(a, raw, "compress") as bar:
                api.write_items(a.output, items, tree=tree, metadata=st.metadata, source=st.source_record(),
                                base=a.base, level=a.level, threads=a.threads, progress=bar, mode=_mode_of(a.input))
        finally:
            st.close()
    elif kind == "torch":
        obj = formats.load_torch(a.input)
        _, leaves = tree_mod.encode(obj, api._is_tensor)
        raw = sum(t.numel() * t.element_size() for _, t in leaves)
        api.save(obj, a.output, level=a.level, threads=a.threads, chunk_elems=a.chunk_elems, base=a.base,
                 device="cpu", progress=None if a.quiet else "auto", _mode=_mode_of(a.input))
    else:
        raise MithrilError(f"{short(a.input)}: not a .safetensors file or a torch checkpoint (.pt/.pth/.bin)")
    if not a.quiet:
        print(_summary("compressed", a.input, a.output, raw, os.path.getsize(a.output), time.perf_counter() - t0,
                       packing=True))
    return 0


BATCH_BYTES = 32 << 20


def _decode_in_batches(f, entries, progress):
    """Yield (entry, bytes) in order, decoding ~32 MB of tensors at a time on all threads,
    into one reused buffer (memory: max(32 MB, largest tensor))."""
    import numpy as np

    need = max([BATCH_BYTES] + [e.nbytes for e in entries])
    try:
        buf = np.empty(need, np.uint8)
    except (MemoryError, ValueError):
        big = max(entries, key=lambda e: e.nbytes)
        raise MithrilError(f"not enough memory to decode tensor {short(big.name)} ({big.nbytes:,} bytes)") from None
    i = 0
    while i < len(entries):
        batch, pos = [], 0
        while i < len(entries) and (not batch or pos + entries[i].nbytes <= buf.size):
            batch.append((entries[i], buf[pos:pos + entries[i].nbytes]))
            pos += entries[i].nbytes
            i += 1
        f.decode_into([e for e, _ in batch], [v for _, v in batch], progress)
        yield from batch


def _check_tree(f):
    """Check the file's tree as a load would rebuild it (no tensor decoded); return it rebuilt
    with :class:`~mithril_gpu.tree.Stub` in place of tensors."""
    from . import tree as tree_mod

    return tree_mod.check(f.index.tree, [e.dtype.name for e in f.index.tensors])


def _flat_names(f) -> bool:
    """True if the file's tree (already checked) is a flat {name: tensor} dict whose keys are the
    tensor names."""
    node = f.index.tree
    if not isinstance(node, dict) or list(node) != ["dict"]:
        return False
    seen = set()
    for k, v in node["dict"]:
        if not (isinstance(k, dict) and list(k) == ["str"] and isinstance(v, dict) and list(v) == ["tensor"]):
            return False
        i = v["tensor"]
        if i in seen or f.index.tensors[i].name != k["str"]:
            return False
        seen.add(i)
    return len(seen) == len(f.index.tensors)


def cmd_decompress(a) -> int:
    from . import formats
    from .reader import MthFile
    from .writer import AtomicFile

    _check_base(a)
    if any(os.path.isfile(os.path.join(a.input, n)) for n in (".metadata", "mithril_dcp.json")):   # DCP
        from .dcp import cli_decompress

        return cli_decompress(a)
    if os.path.isdir(a.input):
        def convert(src, dst):
            if formats.sniff(src) != "mth":
                return None
            if formats.LIGHTNING_ANCHOR.match(os.path.basename(src)):
                return SKIP                 # a base of Lightning's deltas: the files written do not need it
            # x.mth -> x; a .mth file under another name (Lightning's .ckpt) keeps its name
            return dst[:-len(".mth")] if src.endswith(".mth") else dst

        def base_for(rel, name):   # a folder: each delta's base is found there by its recorded name
            d = os.path.join(a.base, rel)
            return d if os.path.isdir(d) else None   # (no such folder: its files need no base, or say so)
        return _walk_dir(a, "decompressed", convert, base_for)
    _check_paths(a)
    if a.output.endswith(".mth"):
        raise MithrilError(f"OUT ({short(a.output)}) ends in .mth: decompress to a .safetensors or .pt file")
    t0 = time.perf_counter()
    out_kind = "safetensors" if a.output.endswith(".safetensors") else "torch"
    mode = _mode_of(a.input)
    with MthFile(a.input, verify=not a.no_verify, threads=a.threads, base=a.base) as f:
        _check_tree(f)
        raw = sum(e.nbytes for e in f.index.tensors)
        if out_kind == "safetensors":
            if not _flat_names(f):
                raise MithrilError(f"{short(a.input)} holds nested values or non-tensor data, which safetensors "
                                   "cannot hold: decompress to a .pt file instead")
            if "__metadata__" in f:        # (the safetensors header's own key: no tensor can have that name)
                raise MithrilError(f"{short(a.input)} holds a tensor named '__metadata__', which a safetensors "
                                   "file cannot name: decompress to a .pt file instead")
            layout = formats.original_safetensors_layout(f.index.source, f.index.tensors)
            header, order = layout if layout else (
                formats.safetensors_header(f.index.tensors, f.index.metadata), f.index.tensors)
            with _bar(a, raw, "decompress") as bar, AtomicFile(a.output, mode) as out:
                out.write(header)
                for _, view in _decode_in_batches(f, order, bar):
                    out.write(view.data)
        else:
            import torch

            with _bar(a, raw, "decompress") as bar:
                obj = f.load("cpu", bar)
            with AtomicFile(a.output, mode) as out:
                try:
                    torch.save(obj, out.file)
                except BaseException:
                    if out.file.error is not None:      # the write's own error (a full disk, a Ctrl-C),
                        raise out.file.error from None  # not torch's account of it
                    raise
        packed = f.size
    if not a.quiet:
        print(_summary("decompressed", a.input, a.output, raw, packed, time.perf_counter() - t0, packing=False))
    return 0


def cmd_info(a) -> int:
    _check_base(a)
    if any(os.path.isfile(os.path.join(a.file, n)) for n in ("mithril_dcp.json", ".metadata")):   # DCP
        from .dcp import cli_info

        return cli_info(a)
    with _open_for_info(a.file, a.base) as f:
        by_codec: dict = {}                  # codec name -> [chunks, payload bytes]
        for e in f.index.tensors:
            for c, k in zip(e.chunks[1::3], e.chunks[2::3]):
                got = by_codec.setdefault(codecs.CODEC_NAMES.get(k, str(k)), [0, 0])
                got[0] += 1
                got[1] += c
        if a.json:
            import json

            print(json.dumps({
                "file": f.path, "version": container.VERSION, "size": f.size, "writer": f.index.writer,
                "codecs": {k: {"chunks": v[0], "bytes": v[1]} for k, v in sorted(by_codec.items())},
                "tensors": [{"name": e.name, **{k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in f.info(e.name).items()}} for e in f.index.tensors],
                "metadata": f.index.metadata, "base": f.index.base,
                "chain": f.chain() if f.base_file is not None else [f.path]}, indent=1))
            return 0
        rows = []
        for e in f.index.tensors:
            kind = e.transform + (f"+{e.delta['op']}" if e.delta else "")
            shape = "x".join(map(str, e.shape)) or "scalar"
            ratio = f"{e.nbytes / e.stored_bytes:.3f}" if e.stored_bytes else ("same" if e.delta else "-")
            rows.append((_show(e.name), e.dtype.name, shape, kind, f"{e.nbytes:,}", f"{e.stored_bytes:,}", ratio))
        head = ("tensor", "dtype", "shape", "transform", "bytes", "stored", "ratio")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        if not a.summary:
            for r in [head] + rows:
                print("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        raw = sum(e.nbytes for e in f.index.tensors)
        print(f"{_show(f.path)}: .mth v{container.VERSION}, {len(f.index.tensors)} tensors, {_mb(raw)} -> "
              f"{_mb(f.size)} ({raw / f.size:.3f}x)"
              f"{', written by ' + _show(f.index.writer) if f.index.writer else ''}")
        if by_codec:
            print("chunks: " + ", ".join(f"{k} {v[0]:,} ({_size(v[1])})" for k, v in sorted(by_codec.items())))
        if f.index.base is not None:
            chain = f.chain() if f.base_file is not None else [f.path]
            print(f"delta against {_show(repr(f.index.base.get('path')))} (identity {f.index.base['xxh64']})"
                  + (f"; chain: {' <- '.join(map(_show, chain))}" if len(chain) > 1 else "; base not opened"))
        if f.index.metadata:
            print(f"metadata: {len(f.index.metadata)} keys "
                  f"({', '.join(_show(k) for k in list(f.index.metadata)[:5])})")
    return 0


def _open_for_info(path, base):
    """Open for `info`: a delta's base is opened when found, and its absence is no error."""
    from .errors import MissingBaseError
    from .reader import SKIP_BASE, MthFile

    try:
        return MthFile(path, verify=False, base=base)
    except MissingBaseError:
        return MthFile(path, verify=False, base=SKIP_BASE)


def cmd_verify(a) -> int:
    """Everything a load checks: the tree rebuilt (with stand-ins for tensors), every tensor
    decoded (delta bases included) and its checksum verified, ~32 MB of tensors at a time."""
    from .reader import MthFile

    _check_base(a)
    t0 = time.perf_counter()
    with MthFile(a.file, verify=True, threads=a.threads, base=a.base) as f:
        raw = sum(e.nbytes for e in f.index.tensors)
        with _bar(a, raw, "verify") as bar:
            f.check(bar)                # the tree, then every tensor in batches, as load() checks them
        n = len(f.index.tensors)
    dt = time.perf_counter() - t0
    if not a.quiet:                     # (-q: the exit status says it)
        print(f"OK {_show(a.file)}: {n} tensors, {_mb(raw)} decoded, checksums verified and tree rebuilt in "
              f"{dt:.2f} s{_speed(raw, dt)}")
    return 0


# ---------------------------------------------------------------- arguments

def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an int in [lo, hi] (a usage error, exit 2, otherwise)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{short(text, 40)!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"{v} is out of range: give {lo}..{hi}" if hi is not None else f"{v} is out of range: give {lo} or more")
        return v
    parse.__name__ = "integer"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mithril", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Lossless compression of PyTorch checkpoints (.safetensors, torch .pt) into .mth files, "
                    "bit-exact, on the CPU or the GPU.")
    p.add_argument("--version", action="version", version=f"mithril-gpu {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(sp, base_help):
        sp.add_argument("--threads", type=_int_in(1), default=None, metavar="N",
                        help="CPU threads, 1 or more (default: all available cores)")
        sp.add_argument("--base", metavar="BASE", default=None, help=base_help)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")

    def force(sp):
        sp.add_argument("-f", "--force", action="store_true",
                        help="replace OUT if it exists (a directory OUT: write into it, replacing files of the "
                             "same names)")

    c = sub.add_parser("compress", help="compress a .safetensors file or torch checkpoint into a .mth file",
                       description="Compress IN (.safetensors, or a torch checkpoint read with "
                                   "torch.load(weights_only=True); numeric numpy arrays in it are kept) into OUT "
                                   "(.mth). OUT is written atomically, and an existing OUT is replaced only with "
                                   "-f. If IN is a directory (a sharded model, say), OUT is a directory too: every "
                                   "checkpoint file in IN becomes OUT/<name>.mth and every other file is copied, "
                                   "subfolders kept (torch files that weights_only=True refuses, such as a Trainer's "
                                   "training_args.bin, are copied byte for byte, never unpickled); OUT is built in a "
                                   "hidden sibling folder and appears only when complete; --base may then name a "
                                   "directory compressed the same way, matched file by file.")
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--level", type=_int_in(1, 22), default=None, metavar="L",
                   help="zstd level 1-22 instead of mithril's default (tuned for float planes; faster and smaller "
                        "than level 3 on real weights)")
    c.add_argument("--chunk-elems", type=_int_in(1, MAX_CHUNK_ELEMS), default=container.DEFAULT_CHUNK_ELEMS,
                   metavar="N", help=f"elements per chunk, 1-{MAX_CHUNK_ELEMS} (default {container.DEFAULT_CHUNK_ELEMS})")
    force(c)
    common(c, "store tensors as deltas against this earlier .mth checkpoint of the same run")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help="decompress a .mth file to .safetensors or .pt",
                       description="Decompress IN (.mth) to OUT: .safetensors (byte-identical to the original "
                                   "if that is what was compressed) or any other name for a torch .pt file. An "
                                   "existing OUT is replaced only with -f. If IN is a directory, OUT is a "
                                   "directory too: every <name>.mth in IN becomes OUT/<name> and other files are "
                                   "copied.")
    d.add_argument("input", metavar="IN")
    d.add_argument("output", metavar="OUT")
    d.add_argument("--no-verify", action="store_true", help="skip checksum verification (faster)")
    force(d)
    common(d, "where the base of a delta checkpoint is, if not where it was recorded")
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="list tensors, dtypes, sizes and ratios",
                       description="Print each tensor's dtype, shape, transform, sizes and ratio, then totals.")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--summary", action="store_true", help="totals only")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--base", metavar="BASE", default=None, help="where a delta file's base is")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("verify", help="decode every tensor, check its checksum, rebuild the tree",
                       description="Check FILE as a load would, without holding it in memory: decode every tensor "
                                   "(and its delta bases), check every checksum, and rebuild the nested structure.")
    v.add_argument("file", metavar="FILE")
    common(v, "where the base of a delta checkpoint is, if not where it was recorded")
    v.set_defaults(func=cmd_verify)
    return p


# ---------------------------------------------------------------- signals and errors

class _Signalled(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP, so that they unwind (and clean up) as
    Ctrl-C does: an atomic write in progress removes its temp file."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _on_signal(signum, frame):
    for s in _STOP_SIGNALS:          # a second signal must not interrupt the clean-up
        signal.signal(s, signal.SIG_IGN)
    raise _Signalled(signum)


def _install_signal_handlers() -> dict:
    old = {}
    for s in _STOP_SIGNALS:
        try:
            old[s] = signal.signal(s, _on_signal)
        except (ValueError, OSError):  # not the main thread: leave signals alone
            break
    return old


def _one_line(msg) -> str:
    """An error message as one printable line of bounded length."""
    return short(" ".join(str(msg).split()), 1000)


def _quiet_stdout() -> None:
    """stdout's reader went away: send what is left to /dev/null so exit does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mithril: note: {_one_line(message).removeprefix('mithril: ')}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    old = _install_signal_handlers()
    try:
        try:
            with warnings.catch_warnings():       # notes (an unused --base, a CPU fallback): one line each
                warnings.showwarning = _note
                rc = args.func(args)
            sys.stdout.flush()
            return rc
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    except _Signalled as e:
        name = signal.Signals(e.signum).name
        print(f"mithril: interrupted by {name}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("mithril: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:           # `mithril info X | head`: the reader has what it wanted
        _quiet_stdout()
        return 128 + 13
    except MemoryError:
        print("mithril: error: out of memory", file=sys.stderr)
        return 1
    except MithrilError as e:
        print(f"mithril: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError, FileExistsError) as e:
        what = _one_line(e.strerror or e)
        print(f"mithril: error: {what}: {short(e.filename) if e.filename else ''}".rstrip(": "), file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mithril: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
