"""Where sinkhole meets the tools users already run: a garak target, an lm-evaluation-harness model, prompt exports for garak and PyRIT."""
