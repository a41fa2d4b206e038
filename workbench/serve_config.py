"""`workbench serve`'s settings, apart from the server so that `serve --help` and a config's errors come
without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from inspo_core.config import opt


@dataclass
class ServeConfig:
    model: str = opt("", "checkpoint directory (a run's final/ or any causal LM), a .gguf file or a name (smollm2)")
    cache_dir: str = opt(".cache/inspo", "where named models are materialised")
    host: str = opt("127.0.0.1", "interface to bind (127.0.0.1 keeps it local)")
    port: int = opt(8000, "port")
    name: str | None = opt(None, "model name reported by /v1/models (default: the directory name)")
    trust_remote_code: bool = opt(False, "allow the model repository to run its own code")
    max_new_tokens: int = opt(512, "cap on max_tokens per request")
    max_input_tokens: int | None = opt(None, "refuse prompts longer than this (default: the model's context length)")
    max_queue: int = opt(8, "requests that may wait for the model at once; more get HTTP 429")
    api_key: str | None = opt(None, "bearer token clients must send (default: the environment variable "
                              "INSPO_SERVE_API_KEY; none: no authentication)")

    def __post_init__(self):
        if not self.model:
            raise ValueError("serve needs --model PATH (a checkpoint directory)")
        if self.max_queue < 1 or self.max_new_tokens < 1:
            raise ValueError("max_queue and max_new_tokens must be >= 1")
