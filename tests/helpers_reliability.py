"""Helpers for the reliability tests (a helper module, not a test file): a tiny model saved as a
real Hugging Face folder (safetensors + a word-level fast tokenizer), so the CLI can load it in a
second, and a runner for ``python -m sinkhole`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORDS = ["the", "poem", "company", "and", "of", "to", "in", "my", "thy", "that", "love", "with", "is", "not",
         "me", "be", "for", "thou", "so", "i", "a", "but", "all", "as", "his", "when", "do", "by", "which", "mine"]


def make_tiny_folder(path: Path, family: str = "llama", n_layers: int = 3, seed: int = 0) -> Path:
    """Save a tiny random model of ``family`` with a loadable tokenizer into ``path``."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tiny import VOCAB, tiny_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family, n_layers), attn_implementation="eager")
    model.save_pretrained(path, safe_serialization=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="[UNK]")
    fast.save_pretrained(path)
    # load it back as this word-level tokenizer, not as the family's own class (Qwen2's would rebuild
    # a byte-level BPE from the vocabulary and split every word into pieces)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "TokenizersBackend"
    cfg_path.write_text(json.dumps(cfg))
    return path


def default_sigint() -> None:
    """Popen preexec_fn: give the child the default SIGINT disposition. A shell without job
    control starts background jobs with SIGINT ignored, and Python then never raises
    KeyboardInterrupt; a user's Ctrl-C always arrives with the default disposition."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def env(**extra) -> dict:
    e = dict(os.environ)
    # one thread: the tiny models gain nothing from more, and on a loaded 2-core machine OpenMP
    # threads spinning against other processes make them ~100x slower
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SINKHOLE_NO_PROGRESS="1",
             PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e.pop("SINKHOLE_DEBUG", None)
    e.update(extra)
    return e


def sinkhole(*args, timeout: int = 240, **env_extra) -> subprocess.CompletedProcess:
    """Run ``python -m sinkhole ARGS`` and return the finished process (text mode)."""
    return subprocess.run([sys.executable, "-m", "sinkhole", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env(**env_extra), cwd=str(Path(__file__).parent))


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, exactly one line on stderr starting with 'sinkhole: error:', no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode not in (0, None), (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sinkhole: error: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def files_in(folder: Path) -> list[str]:
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text(encoding="utf-8"))
