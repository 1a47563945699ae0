"""Decoding: token helpers, generation, the KV cache, the run gate and the two engines that decode with it (llama.cpp, and the same loop on a transformers model)."""
