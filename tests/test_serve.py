"""`workbench serve` under abuse: oversized prompts, bad parameters, bodies before auth, a full queue.
In process through FastAPI's test client (the live server is tested in test_judges)."""

import json
import threading

import pytest
from fastapi.testclient import TestClient

from inspo_core.models import tiny_llama, train_tokenizer
from workbench.serve import ServeConfig, build_app

KEY = {"Authorization": "Bearer sk-serve-test"}
MSG = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(["name a fruit please, the apple is red"] * 20, vocab_size=300)
    tiny_llama(len(tok), hidden_size=32, max_positions=128).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def client(model_dir):
    return TestClient(build_app(ServeConfig(model=str(model_dir), api_key="sk-serve-test", max_queue=2)))


def chat(client, headers=KEY, **body):
    return client.post("/v1/chat/completions", headers=headers, json={"messages": MSG, "max_tokens": 2, **body})


def test_a_valid_request_answers(client):
    r = chat(client, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_prompt_beyond_the_context_is_refused_before_the_model(client):
    """A 2 MB prompt used to run for minutes and grow to 3 GB, blocking every other request."""
    big = [{"role": "user", "content": "apple " * 400_000}]
    r = client.post("/v1/chat/completions", headers=KEY, json={"messages": big})
    assert r.status_code == 400 and "beyond the input limit of 128 tokens" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", headers=KEY, json={"messages": [{"role": "user", "content": "apple " * 200}]})
    assert r.status_code == 400 and "more than the limit of 128" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": 0, "n": 2}, "n"), ({"temperature": -0.5}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0}, "top_p"), ({"n": 40}, "n"), ({"top_logprobs": 50}, "top_logprobs"),
    ({"temperature": "hot"}, "temperature"), ({"messages": []}, "messages"),
])
def test_bad_parameters_are_400_naming_the_field(client, body, field):
    """max_tokens <= 0 and temperature 0 with n > 1 gave 500; negative temperature and top_p > 1 passed."""
    r = chat(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_nan_temperature_is_refused(client):
    r = client.post("/v1/chat/completions", headers={**KEY, "Content-Type": "application/json"},
                    content=json.dumps({"messages": MSG, "temperature": float("nan")}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_auth_comes_before_the_body(client):
    """Bodies were parsed before the key was checked: a malformed body without a key got 400/422."""
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers=KEY).status_code == 200


def test_a_full_queue_answers_429(model_dir, monkeypatch):
    """With max_queue requests waiting, the next is turned away at once instead of piling up."""
    app = build_app(ServeConfig(model=str(model_dir), max_queue=1))
    client = TestClient(app)
    from transformers import LlamaForCausalLM

    entered, release = threading.Event(), threading.Event()
    orig = LlamaForCausalLM.generate

    def slow_generate(self, *a, **k):
        entered.set()
        release.wait(30)
        return orig(self, *a, **k)

    monkeypatch.setattr(LlamaForCausalLM, "generate", slow_generate)
    first = {}
    t = threading.Thread(target=lambda: first.setdefault("r", chat(client, headers={}, temperature=0)))
    t.start()
    assert entered.wait(30)
    second = chat(client, headers={}, temperature=0)
    release.set()
    t.join(60)
    assert second.status_code == 429 and "busy" in second.json()["error"]["message"]
    assert first["r"].status_code == 200


def test_help_names_the_key_variable():
    from workbench.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert "INSPO_SERVE_API_KEY" in sub.format_help()
