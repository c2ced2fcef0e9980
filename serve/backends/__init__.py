"""Backends that execute generation outside the embedded PyTorch engine.

`serve.backends.trtllm` drives TensorRT-LLM's C++ Executor; it imports TensorRT-LLM only when
started, so this package imports on machines without it.
"""

from serve.backends.trtllm import TrtllmBackend, create_backend, trtllm_available

__all__ = ["TrtllmBackend", "create_backend", "trtllm_available"]
