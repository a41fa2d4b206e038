import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
# the suite runs at a fixed thread count (the runs it starts inherit it): tests that compare two runs bit
# for bit must not see the thread governor react to whatever else the machine runs (inspo_core.threads;
# test_threads.py tests the governor itself with a simulated machine)
os.environ.setdefault("INSPO_THREADS", str(torch.get_num_threads()))

CORPUS = [
    "the cat sat on the mat and looked at the dog",
    "answer the question about apples, oranges and pears",
    "a short reply. a longer, more careful reply with reasons.",
    "write a haiku about the sea; the sea is blue and wide",
] * 20

PLAIN_EXAMPLES = [
    {"prompt": "Name a fruit.", "chosen": "An apple, crisp and sweet.", "rejected": "A cat."},
    {"prompt": "Describe the sea in a few words please.", "chosen": "Blue and wide.",
     "rejected": "The sea is a large body of salt water that covers most of the planet."},
]
CHAT_EXAMPLES = [
    {"prompt": [{"role": "user", "content": "Name a fruit."}],
     "chosen": [{"role": "assistant", "content": "An apple, crisp and sweet."}],
     "rejected": [{"role": "assistant", "content": "A cat."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The sea?"}],
     "chosen": "Blue and wide.", "rejected": "The sea is a large body of salt water."},
]


@pytest.fixture(scope="session")
def tokenizer():
    from inspo_core.models import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from inspo_core.models import tiny_llama

    return tiny_llama(len(tokenizer), seed=0).eval()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset before a test that builds Trainers in this process."""
    from inspo_core.trainer import reset_accelerate_state

    reset_accelerate_state()
    yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A reference/tiny-model cache shared by the tests of one module."""
    return str(tmp_path_factory.mktemp("cache"))


@contextlib.contextmanager
def workbench_server(*args: str, probe: str = "/", env: dict | None = None, headers: dict | None = None):
    """Run `python -m workbench <args> --port P` on 127.0.0.1; yields http://127.0.0.1:P once `probe` answers."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", *args, "--port", str(port)], cwd=root, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(proc, base + probe, headers=headers)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_for_http(proc, url: str, headers: dict | None = None, timeout: float = 120) -> None:
    """Poll `url` until it answers; fail with the server's output if the process exits first."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
