"""Moved: the family catalogue, its cases and their judging to :mod:`sinkhole.attack.families`, text fidelity
to :mod:`sinkhole.patch.fidelity`, the verification itself to :mod:`sinkhole.patch.verify`. This path is a shim
for one release (0.1.x); nothing inside sinkhole uses it."""

import warnings

from ..attack.families import (
                               BROAD_REPS,
                               FAMILIES,
                               MAX_NEW_TOKENS,
                               MAX_PROMPT_TOKENS,
                               RUN_JUDGE_ONLY,
                               SHORT_REPS,
                               BroadCase,
                               broad_cases,
                               build_case,
                               check_disjoint,
                               family_rates,
                               family_words,
                               judge_cases,
)
from .fidelity import GEN_PROMPTS, TEXT_TOKENS, WINDOWS, fidelity, generated_text, text_tokens
from .verify import QUICK, TARGETS, Collapse, broad_targets, fed_gate, verify_broad

warnings.warn("sinkhole.patch.broad moved to sinkhole.attack.families, sinkhole.patch.fidelity and "
              "sinkhole.patch.verify; import from there", DeprecationWarning, stacklevel=2)
__all__ = ["BROAD_REPS", "FAMILIES", "MAX_NEW_TOKENS", "MAX_PROMPT_TOKENS", "RUN_JUDGE_ONLY", "SHORT_REPS", "BroadCase",
           "broad_cases", "build_case", "check_disjoint", "family_rates", "family_words", "judge_cases", "GEN_PROMPTS",
           "TEXT_TOKENS", "WINDOWS", "fidelity", "generated_text", "text_tokens", "QUICK", "TARGETS", "Collapse",
           "broad_targets", "fed_gate", "verify_broad"]
