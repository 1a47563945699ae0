"""lm-evaluation-harness adapter: the same before/after comparison on harness tasks.

:class:`SinkholeLM` wraps a loaded model (and optionally a patch, applied as hooks during every
call) as an ``lm_eval`` model; :func:`compare_tasks` runs the tasks once unpatched and once
patched and returns both metric tables and their differences.

Offline limitation: harness tasks download their datasets from the Hugging Face hub. Without
network (and with ``HF_HUB_OFFLINE=1``) only tasks whose data is already in the local
``datasets`` cache, or **local tasks** (a YAML file whose ``dataset_path`` is ``json`` with
local ``data_files``), can run. :func:`write_local_task` writes such a task (a cloze multiple
choice over held-out Shakespeare) so the adapter can be checked anywhere. ``lm-eval`` itself is
an optional dependency: ``pip install lm-eval``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_text
from ..decoding.tokens import pad_left
from ..errors import SinkholeError
from ..patch.core import apply_patch


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError:
        raise SinkholeError("sinkhole eval --tasks needs lm-evaluation-harness; run: pip install lm-eval") from None
    return LM


def make_lm_class():
    LM = _require_lm_eval()

    class SinkholeLM(LM):
        """An lm_eval model over a sinkhole LoadedModel, with an optional patch."""

        def __init__(self, lm, patch=None, batch_size: int = 8, max_length: int | None = None):
            super().__init__()
            self.lm, self.patch, self.batch_size = lm, patch, int(batch_size)
            self.max_length = int(max_length or min(lm.n_ctx or 2048, 2048))

        # -- helpers ------------------------------------------------------------------------
        def _enc(self, text: str) -> list[int]:
            return list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

        def _logprobs(self, rows: list[list[int]]):
            ids, mask = pad_left(self.lm, rows)
            with torch.no_grad(), apply_patch(self.lm, self.patch, validate=False):
                logits = self.lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            return F.log_softmax(logits, -1), ids.shape[1]

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            out = []
            for i in range(0, len(pairs), self.batch_size):
                chunk = pairs[i:i + self.batch_size]
                rows = []
                for ctx, cont in chunk:
                    row = (ctx + cont)[-(self.max_length + 1):]
                    rows.append(row[:-1] if len(row) > 1 else row)
                lp, width = self._logprobs(rows)
                for b, ((ctx, cont), row) in enumerate(zip(chunk, rows)):
                    n = len(cont)
                    # the last n positions of the (left-padded) row predict the continuation
                    pred = lp[b, width - n:width]
                    tgt = torch.as_tensor(cont, device=pred.device)
                    ll = float(pred.gather(-1, tgt[:, None]).sum())
                    greedy = bool((pred.argmax(-1) == tgt).all())
                    out.append((ll, greedy))
            return out

        def _ctx_ids(self, context: str) -> list[int]:
            bos = self.lm.bos_id
            ids = self._enc(context)
            return ([bos] if bos is not None else []) + ids

        # -- the lm_eval API -----------------------------------------------------------------
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = []
            for req in requests:
                context, continuation = req.args
                n_sp = len(context) - len(context.rstrip())
                if n_sp:  # move trailing spaces into the continuation (harness convention)
                    continuation = context[-n_sp:] + continuation
                    context = context[:-n_sp]
                whole = self._enc(context + continuation)
                ctx = self._enc(context)
                cont = whole[len(ctx):] or self._enc(continuation)
                bos = self.lm.bos_id
                pairs.append((([bos] if bos is not None else []) + ctx, cont))
            return self._score(pairs)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                ids = self._enc(req.args[0])
                bos = self.lm.bos_id
                ctx = [bos] if bos is not None else ids[:1]
                cont = ids if bos is not None else ids[1:]
                total = 0.0
                step = self.max_length
                for s in range(0, len(cont), step):
                    piece = cont[s:s + step]
                    prefix = (ctx + cont[:s])[-(self.max_length - len(piece)) or None:] if s else ctx
                    total += self._score([(prefix, piece)])[0][0]
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, kw = req.args
                until = kw.get("until") or []
                if isinstance(until, str):
                    until = [until]
                n_new = int(kw.get("max_gen_toks", 64))
                ids = torch.as_tensor([self._ctx_ids(context)[-self.max_length:]], device=self.lm.device)
                with torch.no_grad(), apply_patch(self.lm, self.patch, validate=False):
                    gen = self.lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                                 do_sample=False, top_p=None, top_k=None, temperature=None,
                                                 pad_token_id=getattr(self.lm.tokenizer, "eos_token_id", 0) or 0)
                text = self.lm.tokenizer.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
                for u in until:
                    if u and u in text:
                        text = text[: text.index(u)]
                out.append(text)
            return out

        @property
        def tokenizer_name(self) -> str:
            return self.lm.name

    return SinkholeLM


def write_local_task(folder: str | os.PathLike, n: int = 24, seed: int = 0, name: str = "sinkhole_cloze") -> Path:
    """Write an offline multiple-choice task (YAML + JSONL) into ``folder``: pick the true next
    line of held-out Shakespeare among four. Returns the folder (pass it as ``--tasks FOLDER``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [ln.strip() for ln in load_text("twelfth_night").splitlines() if len(ln.strip().split()) >= 6]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(2, len(lines) - 1)
        others = rng.sample([j for j in range(len(lines)) if abs(j - i - 1) > 3], 3)
        choices = [lines[i + 1]] + [lines[j] for j in others]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"context": lines[i - 2] + "\n" + lines[i - 1] + "\n" + lines[i] + "\n",
                     "choices": [choices[k] for k in order], "label": order.index(0)})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yaml = (f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            "doc_to_text: \"{{context}}\"\n"
            "doc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n")
    (folder / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return folder


def _split_tasks(tasks) -> tuple[list[str], list[str]]:
    names, paths = [], []
    for t in ([x.strip() for x in tasks.split(",")] if isinstance(tasks, str) else list(tasks)):
        if not t:
            continue
        p = Path(t)
        if p.exists():
            if p.is_file():
                paths.append(str(p.parent))
                names.append(_task_name(p))
            else:
                paths.append(str(p))
                names += [_task_name(y) for y in sorted(p.glob("*.yaml"))]
        else:
            names.append(t)
    if not names:
        raise SinkholeError("--tasks needs task names or local task YAML files/folders, e.g. --tasks hellaswag")
    return names, paths


def _task_name(yaml_path: Path) -> str:
    for line in yaml_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip()
    raise SinkholeError(f"{yaml_path} has no 'task:' line; is it an lm-eval task file?")


def run_tasks(lm, patch, tasks, limit: int | None = None, batch_size: int = 8, num_fewshot: int | None = None) -> dict:
    """Run harness tasks on ``lm`` with ``patch`` (None = unpatched); {task: {metric: value}}."""
    _require_lm_eval()
    import logging

    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    names, paths = _split_tasks(tasks)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tm = TaskManager(include_path=paths or None)
    model = make_lm_class()(lm, patch, batch_size=batch_size)
    try:
        res = evaluator.simple_evaluate(model=model, tasks=names, limit=limit, task_manager=tm, num_fewshot=num_fewshot,
                                        log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    except SinkholeError:
        raise
    except Exception as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise SinkholeError(f"lm-eval could not run tasks {names} ({msg})"
                            + ("; HF_HUB_OFFLINE is set: only cached or local tasks can run" if offline else
                               "; is the dataset reachable or cached?")) from None
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.startswith(("alias", "sample_len")) and "stderr" not in k}
    return out


def compare_tasks(lm, patch, tasks, limit: int | None = None, batch_size: int = 8) -> dict:
    """Before/after table on harness tasks: {task: {metric: {before, after, change}}}."""
    before = run_tasks(lm, None, tasks, limit, batch_size)
    after = run_tasks(lm, patch, tasks, limit, batch_size)
    table = {}
    for task in before:
        table[task] = {m: {"before": v, "after": after.get(task, {}).get(m),
                           "change": (after.get(task, {}).get(m) - v) if after.get(task, {}).get(m) is not None
                           else None} for m, v in before[task].items()}
    return table
