"""Research routes the docs call failing or short of target, off every default path: the run gate's state
check, caps and fine-tunes (``search``, ``finetune``, ``gguf_export``), the stock-model route with trained
attention sinks (``stock``, ``stock_export``) and the generation-free predictor (``predictor``). Each is
reached by one command, ``sinkhole experimental search|stock|predict``; docs/experimental.md gives their
figures and why they fall short."""
