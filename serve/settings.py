"""Server settings: one object, filled from CLI flags, then `MT_*` environment variables, then defaults.

Keeping every knob in one pydantic-settings class means `python -m serve --help`, the environment
and the README table cannot drift apart: the field descriptions are the documentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

DEFAULT_MODEL = "facebook/mbart-large-50-many-to-many-mmt"


class Settings(BaseSettings):
    """Multilingual translation server. Every option is also an environment variable MT_<NAME>; flags win."""

    model_config = SettingsConfigDict(
        env_prefix="MT_",
        extra="ignore",
        cli_prog_name="python -m serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        protected_namespaces=(),
    )

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    model: str = Field(
        DEFAULT_MODEL,
        description="converted checkpoint dir, Hugging Face dir, hub id, or 'tiny' (random test model)",
    )
    backend: Literal["auto", "pytorch", "trtllm"] = Field(
        "auto", description="auto: TensorRT-LLM when it imports and --engine-dir is set, else PyTorch"
    )
    engine_dir: Path | None = Field(None, description="directory of built TensorRT-LLM engines")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights/activations dtype (auto: float16 on GPU, float32 on CPU)"
    )
    tp_size: int = Field(1, ge=1, description="tensor-parallel size")
    device: str = Field("auto", description="torch device for the PyTorch backend (auto: cuda if present)")
    max_batch_size: int = Field(64, ge=1, description="most sequences running at once in the engine")
    max_num_tokens: int = Field(4096, ge=1, description="token budget of one engine step")
    kv_block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    kv_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="fraction of free device memory for the KV-cache pool"
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads on CPU (default: all cores but one, left to the HTTP loop)"
    )
    static_batching: bool = Field(
        False, description="baseline for benchmarks: batches run to completion, no joining (PyTorch only)"
    )
    shortlist: bool = Field(
        False,
        description="let each request emit only its target language's tokens and its source's "
        "(shortlist.safetensors from `python -m calib.shortlist`): a faster lm_head, but outputs may "
        "differ from the full vocabulary's (its report measures by how much); PyTorch backend only",
    )
    max_queue: int = Field(1024, ge=1, description="waiting sequences before the engine answers 429")
    max_texts_per_request: int = Field(128, ge=1, description="most texts in one /translate request")
    max_tokens_per_text: int = Field(4096, ge=1, description="most source tokens in one text (else 413)")
    max_segment_tokens: int = Field(
        200, ge=8, description="longer sentences are cut at clause/word boundaries before translation"
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body (else 413)")
    max_new_tokens: int = Field(512, ge=1, description="cap on generated tokens per sentence")
    max_beam_size: int = Field(8, ge=1, description="largest beam_size a request may ask for")
    api_key: SecretStr | None = Field(
        None, description="when set, /translate and /detect need it (Bearer, X-API-Key or api_key)"
    )
    langid_model: Path | None = Field(
        None, description="XLM-R language-ID checkpoint for /detect and auto source (else py3langid)"
    )
    cache_dir: Path = Field(
        Path("~/.cache/mt-trtllm"), description="where Hugging Face models are converted to, once"
    )
    warmup: bool = Field(True, description="run one translation before reporting ready")
    drain_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for running requests")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level"
    )

    def resolved_device(self) -> str:
        """`cuda` when a GPU is visible and `device` is auto; the explicit value otherwise."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        """float16 on a GPU, float32 on CPU, unless set explicitly."""
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.resolved_device().startswith("cuda") else "float32"


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from `argv` (flags), the environment and defaults; `--help` prints them all."""
    return CliApp.run(Settings, cli_args=argv if argv is not None else [])
