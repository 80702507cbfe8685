"""The `mithril` command: compress, decompress, info, verify."""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import __version__, container
from .errors import MithrilError

EPILOG = """examples:
  mithril compress model.safetensors model.mth       compress (byte-exact round trip)
  mithril compress step2000.pt step2000.mth --base step1000.mth
                                                     store only what changed since step1000
  mithril decompress model.mth model.safetensors     back to safetensors (identical bytes)
  mithril decompress ckpt.mth ckpt.pt                back to a torch checkpoint
  mithril compress llama-dir/ llama-mth/             every shard of a model folder (configs copied)
  mithril info model.mth                             tensors, dtypes, ratio per tensor
  mithril verify model.mth                           decode everything, check checksums

exit status: 0 success, 1 error (one line on stderr), 2 bad usage, 130 interrupted."""


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _bar(args, total: int, desc: str):
    """The progress bar of a command: on stderr when it is a terminal, none with -q."""
    from .api import _progress

    return _progress(None if args.quiet else "auto", total, desc)


def _summary(verb: str, src: str, dst: str, raw: int, packed: int, seconds: float) -> str:
    ratio = raw / packed if packed else float("inf")
    return (f"{verb} {src} -> {dst}: {_mb(raw)} -> {_mb(packed)} ({ratio:.3f}x) "
            f"in {seconds:.2f} s, {raw / max(seconds, 1e-9) / 1e6:,.0f} MB/s")


def _check_paths(a) -> None:
    if os.path.exists(a.output) and os.path.exists(a.input) and os.path.samefile(a.input, a.output):
        raise MithrilError(f"IN and OUT are the same file ({a.input}): write the output under another name")


def _walk_dir(a, verb: str, convert, base_for) -> int:
    """Run the command on every checkpoint file of directory IN, mirrored into OUT (subfolders
    kept), and copy every other file as it is. ``convert(src, dst)`` gives the output path of a
    checkpoint file (None: not one); ``base_for(rel, name)`` the --base for that file."""
    import argparse
    import shutil

    src_root, dst_root = os.path.abspath(a.input), os.path.abspath(a.output)
    if dst_root == src_root or dst_root.startswith(src_root + os.sep):
        raise MithrilError(f"OUT ({a.output}) must not be IN or inside it")
    if a.base is not None and not os.path.isdir(a.base):
        raise MithrilError(f"with a directory IN, --base must be a directory too ({a.base} is not)")
    t0, raw, packed, done = time.perf_counter(), 0, 0, 0
    for folder, dirs, files in os.walk(src_root):
        dirs.sort()
        rel = os.path.relpath(folder, src_root)
        os.makedirs(os.path.join(dst_root, rel), exist_ok=True)
        for name in sorted(files):
            src = os.path.join(folder, name)
            dst = convert(src, os.path.join(dst_root, rel, name))
            if dst is None:
                shutil.copy2(src, os.path.join(dst_root, rel, name))
                continue
            sub = argparse.Namespace(**{**vars(a), "input": src, "output": dst, "quiet": True,
                                        "base": base_for(rel, name) if a.base else None})
            sub.func(sub)
            sizes = (os.path.getsize(src), os.path.getsize(dst))
            raw += sizes[0] if verb == "compressed" else sizes[1]
            packed += sizes[1] if verb == "compressed" else sizes[0]
            done += 1
            if not a.quiet:
                print(f"  {verb} {os.path.join(rel, name)}: {_mb(sizes[0])} -> {_mb(sizes[1])}")
    if not a.quiet:
        print(_summary(f"{verb} {done} checkpoint files,", a.input, a.output, raw, packed, time.perf_counter() - t0))
    return 0


def cmd_compress(a) -> int:
    from . import api, formats, tree as tree_mod

    if os.path.isdir(a.input):
        def convert(src, dst):
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
        raise MithrilError(f"{a.input} is already a .mth file")
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
                                base=a.base, level=a.level, threads=a.threads, progress=bar)
        finally:
            st.close()
    elif kind == "torch":
        obj = formats.load_torch(a.input)
        _, leaves = tree_mod.encode(obj, api._is_tensor)
        raw = sum(t.numel() * t.element_size() for _, t in leaves)
        api.save(obj, a.output, level=a.level, threads=a.threads, chunk_elems=a.chunk_elems, base=a.base,
                 device="cpu", progress=None if a.quiet else "auto")
    else:
        raise MithrilError(f"{a.input}: not a .safetensors file or a torch checkpoint (.pt/.pth/.bin)")
    if not a.quiet:
        print(_summary("compressed", a.input, a.output, raw, os.path.getsize(a.output), time.perf_counter() - t0))
    return 0


BATCH_BYTES = 32 << 20


def _decode_in_batches(f, entries, progress):
    """Yield (entry, bytes) in order, decoding ~32 MB of tensors at a time on all threads,
    into one reused buffer (memory: max(32 MB, largest tensor))."""
    import numpy as np

    buf = np.empty(max([BATCH_BYTES] + [e.nbytes for e in entries]), np.uint8)
    i = 0
    while i < len(entries):
        batch, pos = [], 0
        while i < len(entries) and (not batch or pos + entries[i].nbytes <= buf.size):
            batch.append((entries[i], buf[pos:pos + entries[i].nbytes]))
            pos += entries[i].nbytes
            i += 1
        f.decode_into([e for e, _ in batch], [v for _, v in batch], progress)
        yield from batch


def _flat_names(f) -> bool:
    """True if the file's tree is a flat {name: tensor} dict whose keys are the tensor names."""
    node = f.index.tree
    if not isinstance(node, dict) or list(node) != ["dict"]:
        return False
    seen = set()
    for k, v in node["dict"]:
        if not (isinstance(k, dict) and "str" in k and isinstance(v, dict) and "tensor" in v):
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

    if os.path.isdir(a.input):
        def convert(src, dst):
            return dst[:-len(".mth")] if src.endswith(".mth") and formats.sniff(src) == "mth" else None

        def base_for(rel, name):   # a folder: each delta's base is found there by its recorded name
            return os.path.join(a.base, rel)
        return _walk_dir(a, "decompressed", convert, base_for)
    _check_paths(a)
    if a.output.endswith(".mth"):
        raise MithrilError(f"OUT ({a.output}) ends in .mth: decompress to a .safetensors or .pt file")
    t0 = time.perf_counter()
    out_kind = "safetensors" if a.output.endswith(".safetensors") else "torch"
    with MthFile(a.input, verify=not a.no_verify, threads=a.threads, base=a.base) as f:
        raw = sum(e.nbytes for e in f.index.tensors)
        with _bar(a, raw, "decompress") as bar:
            if out_kind == "safetensors":
                if not _flat_names(f):
                    raise MithrilError(f"{a.input} holds nested values or non-tensor data, which safetensors "
                                       "cannot hold: decompress to a .pt file instead")
                layout = formats.original_safetensors_layout(f.index.source, f.index.tensors)
                header, order = layout if layout else (
                    formats.safetensors_header(f.index.tensors, f.index.metadata), f.index.tensors)
                with AtomicFile(a.output) as out:
                    out.write(header)
                    for _, view in _decode_in_batches(f, order, bar):
                        out.write(view.data)
            else:
                import torch

                obj = f.load("cpu", bar)
                with AtomicFile(a.output) as out:
                    torch.save(obj, out.file)
        packed = f.size
    if not a.quiet:
        print(_summary("decompressed", a.input, a.output, raw, packed, time.perf_counter() - t0))
    return 0


def cmd_info(a) -> int:
    with _open_for_info(a.file, a.base) as f:
        if a.json:
            import json

            print(json.dumps({
                "file": f.path, "version": container.VERSION, "size": f.size, "writer": f.index.writer,
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
            rows.append((e.name, e.dtype.name, shape, kind, f"{e.nbytes:,}", f"{e.stored_bytes:,}", ratio))
        head = ("tensor", "dtype", "shape", "transform", "bytes", "stored", "ratio")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        if not a.summary:
            for r in [head] + rows:
                print("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        raw = sum(e.nbytes for e in f.index.tensors)
        print(f"{f.path}: .mth v{container.VERSION}, {len(f.index.tensors)} tensors, {_mb(raw)} -> {_mb(f.size)} "
              f"({raw / f.size:.3f}x){', written by ' + f.index.writer if f.index.writer else ''}")
        if f.index.base is not None:
            chain = f.chain() if f.base_file is not None else [f.path]
            print(f"delta against {f.index.base.get('path')!r} (identity {f.index.base['xxh64']})"
                  + (f"; chain: {' <- '.join(chain)}" if len(chain) > 1 else "; base not opened"))
        if f.index.metadata:
            print(f"metadata: {len(f.index.metadata)} keys ({', '.join(list(f.index.metadata)[:5])})")
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
    from .reader import MthFile

    t0 = time.perf_counter()
    with MthFile(a.file, verify=True, threads=a.threads, base=a.base) as f:
        raw = sum(e.nbytes for e in f.index.tensors)
        with _bar(a, raw, "verify") as bar:
            for _ in _decode_in_batches(f, f.index.tensors, bar):
                pass
        n = len(f.index.tensors)
    dt = time.perf_counter() - t0
    print(f"OK {a.file}: {n} tensors, {_mb(raw)} decoded and checksums verified in {dt:.2f} s "
          f"({raw / max(dt, 1e-9) / 1e6:,.0f} MB/s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mithril", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Lossless compression of PyTorch checkpoints (.safetensors, torch .pt) into .mth files, "
                    "bit-exact, on the CPU or the GPU.")
    p.add_argument("--version", action="version", version=f"mithril-gpu {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(sp, base_help):
        sp.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads (default: all available cores)")
        sp.add_argument("--base", metavar="BASE", default=None, help=base_help)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")

    c = sub.add_parser("compress", help="compress a .safetensors file or torch checkpoint into a .mth file",
                       description="Compress IN (.safetensors, or a torch checkpoint read with "
                                   "torch.load(weights_only=True)) into OUT (.mth). OUT is replaced atomically. "
                                   "If IN is a directory (a sharded model, say), every checkpoint file in it becomes "
                                   "OUT/<name>.mth and every other file is copied, subfolders kept; --base may then "
                                   "name a directory compressed the same way, matched file by file.")
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--level", type=int, default=None,
                   help="zstd level 1-22 instead of mithril's default (tuned for float planes; faster and smaller "
                        "than level 3 on real weights)")
    c.add_argument("--chunk-elems", type=int, default=container.DEFAULT_CHUNK_ELEMS, metavar="N",
                   help=f"elements per chunk (default {container.DEFAULT_CHUNK_ELEMS})")
    common(c, "store tensors as deltas against this earlier .mth checkpoint of the same run")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help="decompress a .mth file to .safetensors or .pt",
                       description="Decompress IN (.mth) to OUT: .safetensors (byte-identical to the original "
                                   "if that is what was compressed) or any other name for a torch .pt file. If IN is "
                                   "a directory, every <name>.mth in it becomes OUT/<name> and other files are copied.")
    d.add_argument("input", metavar="IN")
    d.add_argument("output", metavar="OUT")
    d.add_argument("--no-verify", action="store_true", help="skip checksum verification (faster)")
    common(d, "where the base of a delta checkpoint is, if not where it was recorded")
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="list tensors, dtypes, sizes and ratios",
                       description="Print each tensor's dtype, shape, transform, sizes and ratio, then totals.")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--summary", action="store_true", help="totals only")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--base", metavar="BASE", default=None, help="where a delta file's base is")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("verify", help="decode every tensor and check its checksum",
                       description="Decode every tensor of FILE (and its delta bases) and check checksums.")
    v.add_argument("file", metavar="FILE")
    common(v, "where the base of a delta checkpoint is, if not where it was recorded")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("mithril: interrupted", file=sys.stderr)
        return 130
    except MithrilError as e:
        print(f"mithril: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError) as e:
        print(f"mithril: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mithril: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
