"""The dequantized-GGUF cache: a GGUF file is dequantized once by transformers and kept as safetensors
under ``$SINKHOLE_CACHE`` (default ``~/.cache/sinkhole``) in ``dequantized/<stem>-<key>/``, with a manifest
checked on every load and a lock so that two processes never build the same entry at once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import ModelLoadError, SinkholeError
from ..version import __version__
from .quiet import quiet_hf

log = logging.getLogger("sinkhole")


def cache_dir() -> Path:
    root = os.environ.get("SINKHOLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "sinkhole"
    )
    return Path(root)


def _file_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    h.update(str(st.st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > (2 << 20):
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror}; check the path and its permissions") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes); pass a valid .gguf file or a model folder")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError("reading .gguf files needs the 'gguf' package; run: pip install gguf") from None
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as err:  # the reader raises many kinds of errors on damaged files
        msg = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ModelLoadError(
            f"{path} is a corrupt or truncated GGUF file ({msg}); download or reinstall it"
        ) from None


CACHE_FORMAT = 1


MANIFEST = "sinkhole-cache.json"  # what a cache entry holds; checked on every load


def _digest(path: Path, size: int) -> str:
    """A cheap fingerprint of a file: its size and its first and last 64 KiB."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 16))
        if size > (1 << 17):
            f.seek(-(1 << 16), os.SEEK_END)
            h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


def _safetensors_problem(path: Path) -> str:
    """'' when a safetensors file is whole (its header parses and the data ends where the header
    says), else what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            return "its header is cut short"
        try:
            meta = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is damaged"
    if 8 + n + end != size:
        return f"it has {size:,} bytes where its header needs {8 + n + end:,}"
    return ""


def cache_problem(folder: Path, key: str) -> str | None:
    """None when the cache entry ``folder`` is whole and was made from the source file with ``key``;
    else why not ("missing" when there is none). Cheap: sizes, 128 KiB per file and the
    safetensors headers, never the whole weights."""
    if not folder.is_dir():
        return "missing"
    try:
        man = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = man["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no readable manifest (written by an older sinkhole, or an interrupted copy)"
    if man.get("format") != CACHE_FORMAT or man.get("source_key") != key:
        return "it was made from another file or by another version of sinkhole"
    for name, rec in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != rec.get("size"):
            return f"{name} has {size:,} bytes where {rec.get('size'):,} were written (truncated?)"
        if _digest(p, size) != rec.get("digest"):
            return f"{name} changed after it was written"
        if name.endswith(".safetensors") and _safetensors_problem(p):
            return f"{name}: {_safetensors_problem(p)}"
    if not any(n.endswith(".safetensors") for n in files) or "config.json" not in files:
        return "it lacks its weights or config"
    return None


def _write_manifest(folder: Path, source: Path, key: str, dtype: str, seconds: float) -> None:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            size = p.stat().st_size
            files[p.name] = {"size": size, "digest": _digest(p, size)}
    man = {"format": CACHE_FORMAT, "sinkhole_version": __version__, "source": str(source),
           "source_size": source.stat().st_size, "source_key": key, "dtype": dtype,
           "dequantize_s": round(seconds, 1), "files": files}
    (folder / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _cache_lock(target: Path):
    """One process builds a cache entry at a time (others wait, then find it built)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): publishing by rename still keeps entries whole
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished cache folder into place (under the cache lock), replacing a damaged one."""
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _build_cache(gguf_path: Path, tmp: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and save it (float32 safetensors) into ``tmp``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_hf():
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
    except SinkholeError:
        raise
    except Exception as err:
        msg = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ModelLoadError(f"transformers could not load {gguf_path} ({msg}); is it a causal LM GGUF?") from None
    # The weights are plain float32 now; drop the GGUF quantizer so they save as safetensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    with quiet_hf():
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def dequantized_folder(gguf_path: Path, progress: bool = True, strict: bool = False) -> Path:
    """Return a cached safetensors folder for ``gguf_path``, creating it on first use. Every load
    checks the entry (``cache_problem``); a damaged one is reported in one line and rebuilt
    (refused with ``strict``, ``--strict-cache`` or ``SINKHOLE_CACHE_STRICT=1``). Two processes loading the same file for the first
    time build it once: the second waits for the first."""
    gguf_path = gguf_path.resolve()
    key = _file_key(gguf_path)
    target = cache_dir() / "dequantized" / f"{gguf_path.stem}-{key}"
    problem = cache_problem(target, key)
    if problem is None:
        return target
    check_gguf(gguf_path)  # a broken file fails here, before anything is written to the cache
    with _cache_lock(target):
        problem = cache_problem(target, key)  # another process may have built it meanwhile
        if problem is None:
            return target
        if problem != "missing":
            if strict or os.environ.get("SINKHOLE_CACHE_STRICT"):
                raise ModelLoadError(f"the cached dequantized model {target} cannot be used ({problem}); delete "
                                     "that folder to rebuild it, or drop --strict-cache / SINKHOLE_CACHE_STRICT")
            log.warning("the cached dequantized model %s cannot be used (%s); rebuilding it", target, problem)
        t0 = time.time()
        if progress:
            log.info("dequantizing %s once (cached in %s)", gguf_path.name, target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            _build_cache(gguf_path, tmp)
            _write_manifest(tmp, gguf_path, key, "float32", time.time() - t0)
            _publish(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
