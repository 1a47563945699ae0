"""The targeted fine-tuning patch: train only the circuit's parameters, export plain weights.

Trainable parameters are either the whole MLPs of a few layers (``layers=[1, 2]``: the layers
where the first-token detector writes the huge first-token norm) or only the rows and columns
of given sink neurons (``neurons={layer: [j, ...]}``: the gate/up rows and the down-projection
column of each neuron; every other entry keeps its value because its gradient is masked).

The loss has two parts:

* **keep**: KL(P_original || P_patched) on ordinary training text (``tempest`` by default),
  per token, so outputs on ordinary text stay the same;
* **repeat**: cross-entropy of the next word token inside long runs of training words (in the
  templates of :mod:`sinkhole.attack.prompts`), so the model keeps repeating instead of falling
  into the broken-sink state. Only run positions after ``min_reps`` repetitions count.

``loss = keep_weight * keep + repeat``. Training words and repetition counts must be disjoint
from the verification set (the search checks this; ``exclude_words`` also removes them from the
``corpus_words`` frequent words of the training text). CPU-feasible: a few hundred Adam steps of the
local objective take minutes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attack.prompts import CHAT_TEMPLATES, has_chat_template, make_cases
from ..capture import Hooks
from ..data import corpus_words, snippets
from ..decoding.tokens import pad_left
from ..errors import SinkholeError
from ..evaluate.metrics import encode_batch, token_kl
from ..models.attention import fast_attention
from ..progress import progress
from ..patch.core import Patch, model_signature

TRAIN_WORDS = ("poem", "company", "book", "house", "water", "time", "music", "light", "river", "dog", "green",
               "stone", "paper", "city", "window", "apple", "story", "money", "garden", "song")


@dataclass
class FinetuneConfig:
    layers: list[int] = field(default_factory=lambda: [1, 2])
    neurons: dict | None = None  # {layer: [neuron, ...]}: train only these neurons' rows/columns
    words: tuple = TRAIN_WORDS
    reps: tuple = (64, 160, 320)
    templates: tuple = ("raw", "repeat", "chat_assistant")
    text: str = "tempest"
    n_texts: int = 32
    text_words: int = 48
    steps: int = 40
    lr: float = 3e-4
    keep_weight: float = 20.0
    rep_batch: int = 2
    text_batch: int = 8
    min_reps: int = 16
    seed: int = 0
    objective: str = "logits"  # "logits" (full model: KL + next-word CE) or "local" (see finetune_local)
    anchor_reps: int = 4  # local objective: run tokens should look like the anchor_reps-th repetition
    corpus_words: int = 0  # add this many frequent words of the training text to ``words`` (0: none)
    exclude_words: tuple = ()  # never train on these (the held-out / tuning words)
    max_examples: int = 0  # cap on the repetition examples (sampled with the seed); 0: all
    stop_layer: int | None = None  # local objective: compare resid_post here (default: last trained layer + 1)
    keep_at: str = "stop"  # local objective's keep term: "stop" (resid_post at stop_layer) or "logits" (KL)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["words"], d["reps"], d["templates"] = list(self.words), list(self.reps), list(self.templates)
        d["exclude_words"] = list(self.exclude_words)
        return d

    def train_words(self) -> list[str]:
        """``words`` plus ``corpus_words`` frequent words of ``text``, minus ``exclude_words``."""
        excl = {w.lower() for w in self.exclude_words}
        out = [w for w in self.words if w.lower() not in excl]
        if self.corpus_words > 0:
            out += corpus_words(self.text, self.corpus_words, exclude=excl | {w.lower() for w in out})
        return out


def _trainable(lm, cfg: FinetuneConfig) -> tuple[dict, dict]:
    """(name -> parameter, name -> gradient mask or None)."""
    ad = lm.adapter
    params: dict = {}
    masks: dict = {}
    if cfg.neurons:
        for layer, neurons in cfg.neurons.items():
            layer = int(layer)
            for name, p, m in ad.neuron_masks(layer, neurons):
                params[name], masks[name] = p, m
    else:
        for layer in cfg.layers:
            if not 0 <= int(layer) < ad.n_layers:
                raise SinkholeError(f"fine-tuning layer {layer} is out of range 0..{ad.n_layers - 1}")
        for name, p in ad.mlp_parameters([int(x) for x in cfg.layers]):
            params[name], masks[name] = p, None
    if not params:
        raise SinkholeError("nothing to fine-tune: give layers or neurons")
    return params, masks


def _rep_examples(lm, cfg: FinetuneConfig):
    """(ids, first scored position) for every training word x reps x template."""
    templates = [t for t in (cfg.templates or ("raw",)) if t not in CHAT_TEMPLATES or has_chat_template(lm)]
    cases = make_cases(lm, cfg.train_words(), list(cfg.reps), templates or ["raw"])
    if cfg.max_examples and len(cases) > cfg.max_examples:
        cases = random.Random(cfg.seed + 7).sample(cases, cfg.max_examples)
    out = []
    for c in cases:
        n_unit = len(c.unit)
        run_start = len(c.ids) - n_unit * c.reps if c.template in ("raw", "repeat", "chat_assistant") else None
        if run_start is None:
            continue  # garak/chat_user templates put the run inside quotes: no clean target
        out.append((c.ids, run_start + n_unit * min(cfg.min_reps, c.reps - 1), run_start, n_unit))
    if not out:
        raise SinkholeError("no usable repetition examples: use templates raw, repeat or chat_assistant")
    return out


def _n_trained(params: dict, masks: dict) -> int:
    return sum(int(masks[k].sum()) if masks[k] is not None else int(p.numel()) for k, p in params.items())


def _masked_step(opt, params: dict, masks: dict, original: dict) -> None:
    """One optimizer step that moves only the unmasked entries of each parameter (Adam's
    momentum could otherwise leak into masked entries, so they are reset afterwards)."""
    for k, p in params.items():
        if masks[k] is not None and p.grad is not None:
            p.grad.mul_(masks[k])
    opt.step()
    with torch.no_grad():
        for k, p in params.items():
            if masks[k] is not None:
                p.copy_(torch.where(masks[k], p, original[k]))


def _restore(params: dict, original: dict) -> None:
    """Put the model's own weights back (the trained ones live only in the returned patch)."""
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(original[k])
            p.requires_grad_(False)
            p.grad = None


def finetune_patch(lm, cfg: FinetuneConfig | None = None, log=None) -> Patch:
    """Train the chosen parameters (``lm`` is left unchanged) and return a weights patch.

    Training runs with PyTorch SDPA attention when the model can switch (no pattern is read;
    about 2x faster than eager on long runs); the previous kernel is restored afterwards."""
    cfg = cfg or FinetuneConfig()
    if cfg.objective not in ("local", "logits"):
        raise SinkholeError(f"unknown fine-tuning objective {cfg.objective!r}; use 'local' or 'logits'")
    with fast_attention(lm):
        return (finetune_local if cfg.objective == "local" else _finetune_logits)(lm, cfg, log)


def _finetune_logits(lm, cfg: FinetuneConfig, log=None) -> Patch:
    """The full-model objective: KL to the original on text + next-word CE inside runs."""
    model = lm.model
    params, masks = _trainable(lm, cfg)
    original = {k: p.detach().clone() for k, p in params.items()}
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    texts = snippets(cfg.text, n=cfg.n_texts, n_words=cfg.text_words, seed=cfg.seed + 11)
    with torch.no_grad():
        t_ids, t_mask = encode_batch(lm, texts, max_tokens=cfg.text_words * 2)
        teacher = []
        for i in range(0, len(texts), cfg.text_batch):
            lg = model(input_ids=t_ids[i:i + cfg.text_batch], attention_mask=t_mask[i:i + cfg.text_batch],
                       use_cache=False).logits
            teacher.append(F.log_softmax(lg.float(), -1).to(torch.bfloat16))
        teacher = torch.cat(teacher)
    examples = _rep_examples(lm, cfg)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    history = []
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout
    try:
        for step in progress(range(cfg.steps), desc="fine-tune", total=cfg.steps):
            opt.zero_grad(set_to_none=True)
            # keep: KL to the original model on ordinary text
            sel = rng.sample(range(len(texts)), min(cfg.text_batch, len(texts)))
            ids, mask = t_ids[sel], t_mask[sel]
            lg = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            lp = F.log_softmax(lg, -1)
            lt = teacher[sel].float()
            valid = mask > 0
            kl = token_kl(lt, lp)[valid].mean()
            # repeat: next word token inside long runs of training words
            batch = rng.sample(examples, min(cfg.rep_batch, len(examples)))
            rows = [b[0] for b in batch]
            r_ids, r_mask = pad_left(lm, rows)
            rl = model(input_ids=r_ids, attention_mask=r_mask, use_cache=False).logits.float()
            ce_terms = []
            for bi, (row, start, _, _) in enumerate(batch):
                off = r_ids.shape[1] - len(row)
                pos = torch.arange(off + start - 1, r_ids.shape[1] - 1, device=r_ids.device)
                ce_terms.append(F.cross_entropy(rl[bi, pos], r_ids[bi, pos + 1]))
            ce = torch.stack(ce_terms).mean()
            loss = cfg.keep_weight * kl + ce
            loss.backward()
            _masked_step(opt, params, masks, original)
            history.append({"step": step, "kl": kl.item(), "repeat_ce": ce.item(), "loss": loss.item()})
            if log and (step % 10 == 0 or step == cfg.steps - 1):
                log(f"  step {step}: keep KL {kl.item():.4f}, repeat CE {ce.item():.3f}")
        new = {k: p.detach().clone() for k, p in params.items()}
    finally:
        _restore(params, original)
        model.train(was_training)
    what = (f"neurons {dict((int(k), list(v)) for k, v in cfg.neurons.items())}" if cfg.neurons
            else f"MLPs of layers {list(cfg.layers)}")
    return Patch(ops=[], name="finetune", model=model_signature(lm), weights=new,
                 notes=f"fine-tuned {what}: KL to the original on '{cfg.text}' text + next-word CE in runs of "
                       f"{len(cfg.train_words())} training words",
                 meta={"family": "finetune", "config": cfg.to_dict(), "trained_numbers": _n_trained(params, masks),
                       "train_seconds": round(time.perf_counter() - t0, 1),
                       "history": history[-1:] if history else []})


def _resid(lm, layer: int, ids, mask, grad: bool):
    h = Hooks(lm, check_finite=False)
    h.read("resid_post", layer, reduce=(lambda x, pos: x) if grad else None)
    h.stop_after(layer)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx, h:
        h.forward(ids, attention_mask=mask, use_cache=False)
    return h.cache[f"resid_post.{layer}"]


def _head_inputs(lm, ids, mask, batch: int = 8) -> torch.Tensor:
    """What the output embedding sees on ``ids`` (the final-norm hidden states), so the original
    model's logits can be rebuilt per batch instead of stored for the whole vocabulary."""
    head = lm.model.get_output_embeddings()
    got: list = []
    hook = head.register_forward_hook(lambda m, a, out: got.append(a[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch):
                lm.model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch], use_cache=False)
    finally:
        hook.remove()
    return torch.cat(got)


def _head_logits(lm, h: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, with the model's final soft-capping where it has one."""
    lg = lm.model.get_output_embeddings()(h).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return torch.tanh(lg / cap) * cap if cap else lg


def finetune_local(lm, cfg: FinetuneConfig, log=None) -> Patch:
    """The cheap, circuit-local objective: only the blocks up to ``S`` run.

    ``S`` is ``cfg.stop_layer`` when given (the search uses the layer before the massive-activation
    layer), else ``max(layers) + 1`` (the residual stream right after the trained layers). At ``S``:

    * **keep**: ``||h_S - h_S^orig||^2 / typical^2`` on every token of ordinary text, the first
      token included (so the normal attention sink keeps its value);
    * **fix**: inside long runs of a training word, every token after ``min_reps`` repetitions
      should look like the same run's ``anchor_reps``-th repetition in the original model
      (``||h_S(j) - h_S^orig(anchor)||^2 / typical^2``): long repetitions are represented like
      short ones instead of drifting toward the first-token state (the paper's Theorem 4.1).

    With ``keep_at="logits"`` the keep term is instead the KL from the original model's next-token
    distribution on the ordinary text (a full forward of the short text batch; the runs still stop
    at ``S``), which is what top-1 agreement and KL on held-out text measure.

    Much cheaper than the full-model objective because the long runs' forward passes stop at ``S``.
    """
    if cfg.keep_at not in ("stop", "logits"):
        raise SinkholeError(f"unknown keep_at {cfg.keep_at!r}; use 'stop' or 'logits'")
    params, masks = _trainable(lm, cfg)
    last = max(int(x) for x in (cfg.neurons or {}).keys() or cfg.layers)
    S = min(last + 1 if cfg.stop_layer is None else int(cfg.stop_layer), lm.adapter.n_layers - 1)
    if S < last:
        raise SinkholeError(f"stop_layer {S} is before the last trained layer {last}")
    original = {k: p.detach().clone() for k, p in params.items()}
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    texts = snippets(cfg.text, n=cfg.n_texts, n_words=cfg.text_words, seed=cfg.seed + 11)
    t_ids, t_mask = encode_batch(lm, texts, max_tokens=cfg.text_words * 2)
    t_ref = _resid(lm, S, t_ids, t_mask, grad=False)
    valid = t_mask > 0
    typ2 = float(t_ref[valid].norm(dim=-1).median()) ** 2
    t_head = _head_inputs(lm, t_ids, t_mask) if cfg.keep_at == "logits" else None
    examples = []
    for ids, start, run_start, n_unit in _rep_examples(lm, cfg):
        x = torch.as_tensor([ids], device=lm.device)
        ref = _resid(lm, S, x, None, grad=False)[0]
        # anchor: the last token of the anchor_reps-th repetition of the run
        anchor = min(max(run_start + n_unit * cfg.anchor_reps - 1, 1), len(ids) - 1)
        examples.append((ids, start, ref[anchor].detach()))
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    t0 = time.perf_counter()
    history = []
    try:
        for step in progress(range(cfg.steps), desc="fine-tune (local)", total=cfg.steps):
            opt.zero_grad(set_to_none=True)
            sel = rng.sample(range(len(texts)), min(cfg.text_batch, len(texts)))
            if t_head is None:
                h = _resid(lm, S, t_ids[sel], t_mask[sel], grad=True)
                keep = ((h - t_ref[sel]) ** 2).sum(-1)[valid[sel]].mean() / typ2
            else:
                lp = F.log_softmax(lm.model(input_ids=t_ids[sel], attention_mask=t_mask[sel], use_cache=False)
                                   .logits.float(), -1)
                with torch.no_grad():
                    lt = F.log_softmax(_head_logits(lm, t_head[sel]), -1)
                keep = token_kl(lt, lp)[valid[sel]].mean()
            batch = rng.sample(examples, min(cfg.rep_batch, len(examples)))
            r_ids, r_mask = pad_left(lm, [b[0] for b in batch])
            hr = _resid(lm, S, r_ids, r_mask, grad=True)
            terms = []
            for bi, (row, start, target) in enumerate(batch):
                off = r_ids.shape[1] - len(row)
                terms.append(((hr[bi, off + start:] - target) ** 2).sum(-1).mean() / typ2)
            fix = torch.stack(terms).mean()
            loss = cfg.keep_weight * keep + fix
            loss.backward()
            _masked_step(opt, params, masks, original)
            history.append({"step": step, "keep": keep.item(), "fix": fix.item()})
            if log and (step % 10 == 0 or step == cfg.steps - 1):
                log(f"  step {step}: keep {keep.item():.5f}, fix {fix.item():.4f}")
        new = {k: p.detach().clone() for k, p in params.items()}
    finally:
        _restore(params, original)
    what = (f"neurons {dict((int(k), list(v)) for k, v in cfg.neurons.items())}" if cfg.neurons
            else f"MLPs of layers {list(cfg.layers)}")
    return Patch(ops=[], name="finetune_local", model=model_signature(lm), weights=new,
                 notes=f"fine-tuned {what} with the local objective at resid_post {S}: ordinary text unchanged "
                       f"({'next-token KL' if t_head is not None else f'resid_post {S}'}), long "
                       f"runs of {len(cfg.train_words())} training words represented like their {cfg.anchor_reps}th repetition",
                 meta={"family": "finetune_local", "config": cfg.to_dict(), "stop_layer": S,
                       "trained_numbers": _n_trained(params, masks),
                       "train_seconds": round(time.perf_counter() - t0, 1), "history": history[-1:]})
