"""Result files: versioned ``results.json``, atomic writes, output-folder checks."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import SinkholeError

SCHEMA_VERSION = 1


def _clean(obj: Any) -> Any:
    """JSON-safe copy: dataclasses to dicts, NaN/inf to None, tensors and numpy to lists."""
    if hasattr(obj, "to_dict"):
        return _clean(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return _clean(obj.item())
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results and reports are meant to be shared
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SinkholeError(f"could not write {path}: {err.strerror}; free some space or choose another --out") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, dumps(obj))


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check that it is writable (before any long work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SinkholeError(f"--out {out} exists and is not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise SinkholeError(f"cannot write to output folder {out} ({err.strerror}); choose a writable --out") from None
    return out


def read_json_file(path: str | os.PathLike, default_name: str, missing: str, invalid: str) -> tuple[Path, Any]:
    """Read a JSON file (``default_name`` inside ``path`` when it is a folder); a missing or
    unparsable file raises SinkholeError with ``missing`` / ``invalid`` (formatted with
    ``path`` and ``err``)."""
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    if not p.exists():
        raise SinkholeError(missing.format(path=p))
    try:
        return p, json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SinkholeError(invalid.format(path=p, err=err)) from None


def load_results(path: str | os.PathLike) -> dict:
    """Read a ``results.json`` (or a folder holding one) and check its schema version."""
    p, data = read_json_file(path, "results.json", missing="{path} not found; run 'sinkhole scan --out DIR' first",
                             invalid="{path} is not valid JSON ({err}); rerun 'sinkhole scan' to regenerate it")
    if not isinstance(data, dict) or "schema_version" not in data:
        raise SinkholeError(f"{p} has no schema_version; it was not written by sinkhole scan")
    v = data["schema_version"]
    if v != SCHEMA_VERSION:
        raise SinkholeError(
            f"{p} has schema_version {v}, this sinkhole reads version {SCHEMA_VERSION}; "
            "rerun 'sinkhole scan' with this version to regenerate it"
        )
    return data
