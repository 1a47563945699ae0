"""Result files: versioned ``results.json``, atomic writes, output-folder checks."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import SinkholeError

SCHEMA_VERSION = 2  # 2: typed step results, circuit roles, one divergence vocabulary


def check_unique(names, what: str) -> None:
    """A registry's names must be unique: a duplicate is an error, never a silent replacement."""
    seen: set = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate {what} {n!r}")
        seen.add(n)


class StepResult:
    """Base of every step's result (a dataclass): ``to_dict`` for JSON and ``from_dict`` that
    refuses an unknown or missing field, so a renamed field fails when a file is loaded, never
    as a silently empty report section."""

    def to_dict(self) -> dict:
        return {f.name: clean(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def log_line(self) -> str:
        """A line the scan logs after the step (empty: nothing)."""
        return ""

    @classmethod
    def from_dict(cls, d):
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise SinkholeError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        fs = dataclasses.fields(cls)
        names = {f.name for f in fs}
        required = {f.name for f in fs if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(d) - names), sorted(required - set(d))
        if unknown or missing:
            raise SinkholeError(f"{cls.__name__}: " + "; ".join(
                x for x in (f"unknown field(s) {unknown}" if unknown else "",
                            f"missing field(s) {missing}" if missing else "") if x)
                + "; the file was written by another sinkhole version: rerun the command that wrote it")
        return cls(**{k: d[k] for k in names if k in d})


def clean(obj: Any) -> Any:
    """JSON-safe copy: dataclasses to dicts, NaN/inf to None, tensors and numpy to lists."""
    if hasattr(obj, "to_dict"):
        return clean(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):
        return clean(obj.tolist())
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return clean(obj.item())
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


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
    if not p.is_file():
        raise SinkholeError(f"{p} is not a regular file; pass a JSON file or a folder holding {default_name}")
    try:
        return p, json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SinkholeError(invalid.format(path=p, err=err)) from None


def load_results(path: str | os.PathLike) -> dict:
    """Read a ``results.json`` (or a folder holding one) and check its schema version."""
    p, data = read_json_file(path, "results.json", missing="{path} not found; run 'sinkhole scan --out DIR' first",
                             invalid="{path} is not valid JSON ({err}); rerun 'sinkhole scan' to regenerate it")
    if not isinstance(data, dict) or "schema_version" not in data:
        raise SinkholeError(f"{p} is not a results document (no schema_version; those are written by 'sinkhole scan' and by the --json "
                            "of 'sinkhole circuit', 'diverge', 'sweep' and 'cluster'); the report cannot render it")
    v = data["schema_version"]
    if v != SCHEMA_VERSION:
        raise SinkholeError(
            f"{p} has schema_version {v}, this sinkhole reads version {SCHEMA_VERSION}; "
            "rerun the command that wrote it with this version to regenerate it"
        )
    return data
