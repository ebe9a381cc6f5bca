"""Serving engines. :mod:`arrag_kernels.serving.vllm`: DAiD as a vLLM logits processor (imports vLLM lazily)."""
