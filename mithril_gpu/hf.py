"""Hugging Face: load compressed models with ``from_pretrained``, compress Trainer checkpoints.

>>> model = mithril_gpu.hf.from_pretrained(AutoModelForCausalLM, "llama-mth/", device_map="auto")
>>> trainer = Trainer(..., callbacks=[mithril_gpu.hf.MithrilCallback(deltas=True)])
>>> mithril_gpu.hf.restore_checkpoint("out/checkpoint-500")      # then resume_from_checkpoint=...

* :func:`from_pretrained` opens every ``.mth`` shard of a folder made by ``mithril compress
  MODEL_DIR OUT_DIR`` (or of a Hub repo holding one) and hands transformers lazy slices in place of
  a state dict: transformers' own ``from_pretrained`` does the rest (``device_map``, ``dtype``,
  tied weights, ...), and each tensor is decoded only when transformers asks for it.
* :class:`MithrilCallback` compresses every ``checkpoint-N/`` folder the Trainer writes, in place:
  each ``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` becomes
  ``<name>.mth``; files that are not plain tensor checkpoints (``training_args.bin``) and the JSON
  files stay as they are. ``mithril decompress checkpoint-N restored-N`` (or
  :func:`restore_checkpoint`) gives back a folder the Trainer resumes from.

Importing this module needs nothing beyond mithril itself; the functions and the callback need
``transformers`` (``pip install mithril-gpu[hf]``).
"""
from __future__ import annotations

import os
import re
import shutil

from .errors import MithrilError, short

MODEL_PATTERNS = (".safetensors.mth", ".bin.mth")
_ANCHOR = re.compile(r"\.mithril-anchor-(\d+)\Z")
_ANCHOR_PARTIAL = re.compile(r"\.mithril-anchor-(\d+)\.partial\Z")


class HubFolderError(MithrilError):
    """A folder (or Hub repo) given to :func:`from_pretrained` holds no compressed model shards."""


# ---------------------------------------------------------------- loading

def _slice(f, name: str):
    """What transformers gets for one weight: a lazy slice (shape and dtype without decoding;
    ``[...]`` or a box decodes the rows it covers)."""
    return f.get_slice(name)


def model_shards(folder: str) -> list[str]:
    """The compressed weight files of a model folder, sorted: ``*.safetensors.mth`` if there
    are any, else ``*.bin.mth`` (a model saved as ``pytorch_model.bin``). Other ``.mth`` files
    (a Trainer's ``optimizer.pt.mth``...) are not model weights and are left out."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise HubFolderError(f"{short(folder)}: cannot list it ({short(e.strerror or e, 80)})") from None
    indexes = [n for n in names if n.endswith((".safetensors.index.json", ".bin.index.json"))]
    if len(indexes) == 1:          # a sharded model: the shards its index names, and only those
        import json

        try:
            with open(os.path.join(folder, indexes[0]), encoding="utf-8") as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise HubFolderError(f"{short(os.path.join(folder, indexes[0]))}: not a valid shard index") from None
        if all(isinstance(n, str) and n + ".mth" in names for n in files) and files:
            return [os.path.join(folder, n + ".mth") for n in files]
        missing = [n for n in files if not (isinstance(n, str) and n + ".mth" in names)]
        if len(missing) < len(files):
            raise HubFolderError(f"{short(folder)}: {short(indexes[0])} names shards that are not there compressed "
                                 f"({short(', '.join(map(str, missing[:3])), 120)}.mth)")
    for suffix in MODEL_PATTERNS:
        found = [os.path.join(folder, n) for n in names
                 if n.endswith(suffix) and os.path.isfile(os.path.join(folder, n))]
        if found:
            return found
    raw = [n for n in names if n.endswith((".safetensors", ".bin"))]
    hint = (f" (it has {short(', '.join(raw[:3]), 100)}: load it with transformers directly, or compress it "
            "with `mithril compress DIR OUT`)") if raw else ""
    raise HubFolderError(f"{short(folder)}: no compressed model shards (*.safetensors.mth){hint}")


def _resolve(path_or_repo_id, kwargs: dict) -> str:
    """A local folder as it is; otherwise a Hub repo id, downloaded (or found in the cache) with
    ``huggingface_hub.snapshot_download`` and the hub arguments of ``kwargs``."""
    path = os.fspath(path_or_repo_id)
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        return os.path.join(path, subfolder) if subfolder else path
    if os.path.exists(path):
        raise HubFolderError(f"{short(path)} is a file: give the folder made by `mithril compress MODEL_DIR OUT_DIR`")
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
        raise HubFolderError(f"{short(path)}: no such folder (and not a Hub repo id such as 'org/name')")
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
           if kwargs.get(k) is not None}
    # configs and compressed shards only (not the uncompressed weights a repo may hold too)
    patterns = ["*.json", "*.mth"] + (["*.py"] if kwargs.get("trust_remote_code") else [])
    local = snapshot_download(path, allow_patterns=patterns, **hub)
    return os.path.join(local, subfolder) if subfolder else local


def from_pretrained(model_class, path_or_repo_id, **kwargs):
    """``model_class.from_pretrained`` for a model folder compressed with ``mithril compress``.

    Args:
        model_class: a transformers model class (``LlamaForCausalLM``) or auto class
            (``AutoModelForCausalLM``).
        path_or_repo_id: a local folder (``mithril compress model-dir/ model-mth/``), or a Hub
            repo id holding such a folder (downloaded with ``huggingface_hub.snapshot_download``;
            ``revision``, ``cache_dir``, ``token``, ``local_files_only`` are passed to it).
        **kwargs: passed to transformers' ``from_pretrained`` (``device_map``, ``dtype``,
            ``attn_implementation``...). ``config`` may be given; by default the folder's
            ``config.json`` is read.

    Every ``.mth`` shard is opened (lazily: nothing is decoded up front) and its tensors handed
    to transformers as slices, which it decodes one at a time while placing the weights.
    """
    kwargs = dict(kwargs)
    folder = _resolve(path_or_repo_id, kwargs)
    for k in ("subfolder", "revision", "cache_dir", "token", "local_files_only", "force_download", "proxies"):
        kwargs.pop(k, None)
    if kwargs.get("state_dict") is not None:
        raise TypeError("from_pretrained: state_dict= cannot be given; the weights come from the .mth shards")
    kwargs.pop("state_dict", None)
    shards = model_shards(folder)
    config = kwargs.pop("config", None)
    if config is None or isinstance(config, (str, os.PathLike)):
        from transformers import AutoConfig

        trust = kwargs.get("trust_remote_code")
        cfg_kwargs = {"trust_remote_code": trust} if trust is not None else {}
        config = AutoConfig.from_pretrained(folder if config is None else config, **cfg_kwargs)
    if "generation_config" not in kwargs and os.path.isfile(os.path.join(folder, "generation_config.json")):
        try:
            from transformers import GenerationConfig

            kwargs["generation_config"] = GenerationConfig.from_pretrained(folder)
        except (ImportError, OSError, ValueError):
            pass
    from .reader import MthFile

    files, state = [], {}
    try:
        for path in shards:
            f = MthFile(path)
            files.append(f)
            for name in f.keys():
                if name in state:
                    raise MithrilError(f"tensor {short(name)!r} is in two shards of {short(folder)}")
                state[name] = _slice(f, name)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype in (None, "auto") and getattr(config, "dtype", None) is None:
            # transformers would ask the state dict (tensors) for the first float dtype: say it here
            kwargs.pop("torch_dtype", None)
            kwargs["dtype"] = _first_float_dtype(state)
        return _concrete(model_class, config).from_pretrained(None, config=config, state_dict=state, **kwargs)
    finally:
        for f in files:
            f.close()


def _concrete(model_class, config):
    """The model class an auto class (``AutoModelForCausalLM``) picks for ``config``, as its own
    ``from_pretrained`` would (which needs a path, where this hands a state dict)."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    try:
        from transformers.models.auto.auto_factory import _get_model_class

        return _get_model_class(config, mapping)
    except KeyError:
        raise MithrilError(f"{model_class.__name__} has no model class for a {type(config).__name__} "
                           "(remote code models: pass the model class itself)") from None


def _first_float_dtype(state: dict):
    from . import dtypes

    names = [s.get_dtype() for s in state.values()]
    import torch

    for n in names:
        t = dtypes.to_torch(dtypes.from_name(n))
        if t.is_floating_point and "float8" not in str(t) and "float4" not in str(t):
            return t
    return dtypes.to_torch(dtypes.from_name(names[0])) if names else torch.float32


# ---------------------------------------------------------------- Trainer checkpoints

def _cli_compress(src: str, dst: str, base: str | None, level, threads) -> None:
    from . import cli

    argv = ["compress", "-q", "-f", src, dst]
    argv += ["--base", base] if base else []
    argv += ["--level", str(level)] if level is not None else []
    argv += ["--threads", str(threads)] if threads is not None else []
    ns = cli.build_parser().parse_args(argv)
    import warnings

    from .writer import BaseNote

    with warnings.catch_warnings():     # a file with no tensor like its base's (scheduler.pt) is simply stored whole
        warnings.simplefilter("ignore", BaseNote)
        ns.func(ns)


def compress_checkpoint(folder, base=None, *, level: int | None = None, threads: int | None = None) -> list[str]:
    """Compress a checkpoint folder in place: every ``.safetensors`` file and plain tensor
    checkpoint (what ``torch.load(weights_only=True)`` reads) becomes ``<name>.mth`` and the
    original is removed once its ``.mth`` is complete; other files stay as they are. A folder
    interrupted midway holds each file whole, either as it was or compressed. ``base``: a folder
    compressed the same way; a file with a ``<name>.mth`` there is stored as a delta against it.
    A ``torch.distributed.checkpoint`` folder inside (FSDP's sharded state) is kept as it is.
    Returns the names compressed, relative to ``folder``."""
    from . import formats
    from .errors import UnsupportedValueError

    folder = os.fspath(folder)
    done = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            src = os.path.join(root, name)
            if name.startswith(".") or not os.path.isfile(src) or os.path.islink(src):
                continue
            if formats.in_dcp_folder(src) or formats.sniff(src) not in ("safetensors", "torch"):
                continue
            rel = os.path.relpath(src, folder)
            cand = os.path.join(os.fspath(base), rel + ".mth") if base is not None else None
            try:
                _cli_compress(src, src + ".mth", cand if cand and os.path.isfile(cand) else None, level, threads)
            except (formats.NotPlainTorchError, UnsupportedValueError):
                continue        # kept byte for byte, never unpickled
            os.unlink(src)
            done.append(rel)
    return done


def restore_checkpoint(folder, out=None, *, base=None, threads: int | None = None) -> str:
    """Decompress a checkpoint folder written by :class:`MithrilCallback` (or ``mithril
    compress``) so that the Trainer can resume from it: in place (each ``<name>.mth`` replaced by
    ``<name>``) or, with ``out``, into a new folder as ``mithril decompress folder out`` does.
    ``.safetensors`` files come back byte-identical, torch files (``optimizer.pt``...) as files
    ``torch.load`` reads to the same values. Returns the folder to resume from."""
    from . import cli

    folder = os.fspath(folder)
    if out is not None:
        argv = ["decompress", "-q", folder, os.fspath(out)]
        argv += ["--base", os.fspath(base)] if base is not None else []
        argv += ["--threads", str(threads)] if threads is not None else []
        ns = cli.build_parser().parse_args(argv)
        ns.func(ns)
        return os.fspath(out)
    from . import formats

    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            src = os.path.join(root, name)
            if not name.endswith(".mth") or name.startswith(".") or formats.sniff(src) != "mth":
                continue
            argv = ["decompress", "-q", "-f", src, src[:-len(".mth")]]
            if base is not None:
                argv += ["--base", os.path.join(os.fspath(base), os.path.relpath(root, folder))]
            argv += ["--threads", str(threads)] if threads is not None else []
            ns = cli.build_parser().parse_args(argv)
            ns.func(ns)
            os.unlink(src)
    return folder


class _CallbackImpl:
    """A ``transformers.TrainerCallback`` that compresses each ``checkpoint-N/`` folder in place
    right after the Trainer writes it (see :func:`compress_checkpoint`).

    Args:
        deltas: store each checkpoint as a delta against a full *anchor*: every ``full_every``-th
            checkpoint is compressed whole and its ``.mth`` files are also linked (hard links:
            no extra disk) into ``output_dir/.mithril-anchor-<step>/``, which the checkpoints
            after it are deltas against. ``save_total_limit`` may then delete any checkpoint
            folder: the anchors live outside them, and one is deleted once no checkpoint needs it.
            Copy the anchor along with a checkpoint that needs it (``mithril info FILE`` names it).
        full_every: checkpoints per anchor, with ``deltas=True``.
        level, threads: as ``mithril compress --level/--threads``.

    To resume: ``restore_checkpoint(path)`` (or ``mithril decompress path restored``), then
    ``trainer.train(resume_from_checkpoint=...)``. Not for ``load_best_model_at_end=True``: the
    Trainer reads that checkpoint back itself, and cannot read .mth files.
    """

    def __init__(self, deltas: bool = False, full_every: int = 10, level: int | None = None,
                 threads: int | None = None):
        if not isinstance(full_every, int) or full_every < 1:
            raise ValueError("full_every must be an int >= 1")
        if level is not None and not (isinstance(level, int) and 1 <= level <= 22):
            raise ValueError("level must be None or an int in 1..22")
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise ValueError("threads must be None or an int >= 1")
        self.deltas, self.full_every, self.level, self.threads = deltas, full_every, level, threads
        self._anchor: str | None = None
        self._since_anchor = 0
        #: the ``checkpoint-N`` folders compressed so far, in order
        self.compressed: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "load_best_model_at_end", False):
            raise ValueError("MithrilCallback compresses checkpoints in place, so the Trainer cannot read the best one "
                             "back for load_best_model_at_end=True: turn one of them off")

    def on_save(self, args, state, control, **kwargs):
        # Every process writes files of the checkpoint (its RNG state; its shards, with FSDP or
        # DeepSpeed), and the Trainer calls this without waiting for the others: the first process
        # compresses the folder once every process is here, so no file is caught half written or
        # left behind uncompressed.
        if getattr(args, "world_size", 1) > 1:
            _barrier()
        if not state.is_world_process_zero:
            return
        run_dir = args.output_dir
        folder = os.path.join(run_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        if not self.deltas:
            compress_checkpoint(folder, level=self.level, threads=self.threads)
        else:
            anchor = self._anchor
            if (anchor is None or os.path.dirname(anchor) != os.path.abspath(run_dir) or not os.path.isdir(anchor)
                    or self._since_anchor >= self.full_every):
                compress_checkpoint(folder, level=self.level, threads=self.threads)
                self._make_anchor(folder, run_dir, state.global_step)
            else:
                compress_checkpoint(folder, base=anchor, level=self.level, threads=self.threads)
                self._since_anchor += 1
            self._collect(run_dir)
        self.compressed.append(folder)

    def _make_anchor(self, folder: str, run_dir: str, step: int) -> None:
        anchor = os.path.join(os.path.abspath(run_dir), f".mithril-anchor-{step:09d}")
        tmp = anchor + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if not name.endswith(".mth"):
                    continue
                src = os.path.join(root, name)
                dst = os.path.join(tmp, os.path.relpath(src, folder))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:           # a file system without hard links
                    shutil.copy2(src, dst)
        os.makedirs(tmp, exist_ok=True)
        shutil.rmtree(anchor, ignore_errors=True)
        os.rename(tmp, anchor)
        self._anchor, self._since_anchor = anchor, 1

    def _collect(self, run_dir: str) -> None:
        """Delete the anchors of ``run_dir`` that no checkpoint in it needs (never the current one)."""
        from .reader import SKIP_BASE, MthFile

        run_dir = os.path.abspath(run_dir)
        names = os.listdir(run_dir)
        anchors = {os.path.join(run_dir, n) for n in names if _ANCHOR.match(n)}
        needed = {self._anchor}
        for n in names:
            if n.startswith("."):
                continue
            for root, dirs, files in os.walk(os.path.join(run_dir, n)):
                for name in files:
                    if not name.endswith(".mth"):
                        continue
                    p = os.path.join(root, name)
                    try:
                        with MthFile(p, verify=False, base=SKIP_BASE) as f:
                            rec = f.index.base
                    except Exception:  # noqa: BLE001  (not a .mth file after all, or a partial copy)
                        continue
                    if rec is not None and isinstance(rec.get("path"), str):
                        target = os.path.normpath(os.path.join(root, rec["path"]))
                        needed.update(a for a in anchors if target.startswith(a + os.sep))
        for a in anchors - needed:
            shutil.rmtree(a, ignore_errors=True)
        for n in names:        # an anchor being made when a run was killed
            if _ANCHOR_PARTIAL.match(n):
                shutil.rmtree(os.path.join(run_dir, n), ignore_errors=True)


def _barrier() -> None:
    """Wait for every process of the run (torch.distributed's default group, when there is one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_CALLBACK = None


def __getattr__(name):
    # MithrilCallback subclasses transformers.TrainerCallback, made on first use so that importing
    # this module does not import transformers
    global _CALLBACK
    if name != "MithrilCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _CALLBACK is None:
        try:
            from transformers import TrainerCallback
        except ImportError:
            raise ImportError("mithril_gpu.hf.MithrilCallback needs transformers: pip install mithril-gpu[hf]") from None
        _CALLBACK = type("MithrilCallback", (_CallbackImpl, TrainerCallback),
                         {"__doc__": _CallbackImpl.__doc__, "__module__": __name__})
    return _CALLBACK
