"""Settings of `python -m workbench app` (kept apart so the CLI loads without gradio)."""

from dataclasses import dataclass

from inspo_core.config import opt


@dataclass
class AppConfig:
    runs_dir: str = opt("runs", "where checkpoints and runs are found")
    host: str = opt("127.0.0.1", "interface to bind; 127.0.0.1 keeps the app on this machine")
    port: int = opt(7860, "port")
    share: bool = opt(False, "create a public Gradio share link (off unless asked)")
    allow_any_path: bool = opt(False, "accept checkpoint paths outside runs_dir")
    prompts: str | None = opt(None, "a file of example prompts (.txt one per line, or .jsonl with 'prompt')")
    votes: str | None = opt(None, "vote log (default: <runs_dir>/votes.jsonl)")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")
    cache_dir: str = opt(".cache/inspo", "where named models (smollm2) live; they can be picked by name")
