"""`workbench serve` under abuse (oversized prompts, bad parameters, bodies before auth, a full queue) and
against the OpenAI API it imitates (streaming through the official `openai` client, stop strings,
refused fields, the model's own log-probs). Mostly in process through FastAPI's test client; the
`openai` client talks to a real server on 127.0.0.1."""

import json
import threading

import pytest
import torch
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
    orig = LlamaForCausalLM.forward

    def slow_forward(self, *a, **k):
        entered.set()
        release.wait(30)
        return orig(self, *a, **k)

    monkeypatch.setattr(LlamaForCausalLM, "forward", slow_forward)
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


# ---- faithful to the OpenAI API (issue 23, items 8-11) ----

def model_and_tok(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def prompt_ids(tok, msgs=MSG) -> list[int]:
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def live(model_dir):
    """The real server on 127.0.0.1, for the official `openai` client."""
    from conftest import workbench_server

    with workbench_server("serve", "--model", str(model_dir), probe="/v1/models",
                          env={"INSPO_SERVE_API_KEY": ""}) as base:
        yield base + "/v1"


@pytest.fixture(scope="module")
def oai(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live, api_key="unused", max_retries=0, timeout=60)


def test_stream_through_the_openai_client(oai):
    """`stream: true` got one plain JSON body with 200: the client yielded 0 chunks and no error."""
    kw = dict(model="m", messages=MSG, temperature=0, max_completion_tokens=6)
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    with_choice = [c for c in chunks if c.choices]
    assert with_choice[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choice) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choice][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choice[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # n choices stream side by side, each with its own index, role and finish
    many = list(oai.chat.completions.create(model="m", messages=MSG, temperature=1, seed=3, n=2,
                                            max_completion_tokens=4, stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in many if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason in ("stop", "length")


def test_stream_wire_format_ends_in_done(client):
    with client.stream("POST", "/v1/chat/completions", headers=KEY,
                       json={"messages": MSG, "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["choices"][0]["delta"] == {}


def test_a_stream_left_early_stops_the_model(model_dir, monkeypatch):
    """A client that stops reading must not keep the model (one generation at a time) busy: its
    generation stops at the next token. Each forward is slowed to 20 ms and counted; the abandoned
    stream asked for 90 tokens."""
    import time

    import uvicorn
    from transformers import LlamaForCausalLM

    from conftest import free_port

    openai = pytest.importorskip("openai")
    calls, orig = [], LlamaForCausalLM.forward

    def counted(self, *a, **k):
        calls.append(1)
        time.sleep(0.02)
        return orig(self, *a, **k)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(ServeConfig(model=str(model_dir))), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        monkeypatch.setattr(LlamaForCausalLM, "forward", counted)
        stream = oai.chat.completions.create(model="m", messages=MSG, temperature=0, max_completion_tokens=90,
                                             stream=True)
        first = next(iter(stream))
        stream.close()
        assert first.choices[0].delta.role == "assistant"
        r = oai.chat.completions.create(model="m", messages=MSG, temperature=0, max_completion_tokens=2)
        assert r.usage.completion_tokens <= 2
        assert len(calls) - r.usage.completion_tokens < 45, f"the abandoned stream ran {len(calls)} forwards"
    finally:
        server.should_exit = True
        thread.join(30)


def test_max_completion_tokens_is_honoured(client):
    """Current clients send max_completion_tokens; it was ignored (128 tokens came back)."""
    r = chat(client, temperature=0, max_tokens=None, max_completion_tokens=3).json()
    assert r["usage"]["completion_tokens"] <= 3
    assert r == {**r, "choices": chat(client, temperature=0, max_tokens=3).json()["choices"]}
    r = chat(client, temperature=0, max_tokens=3, max_completion_tokens=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_stop_cuts_before_the_stop_string(client):
    """`stop` was ignored: the text ran on past it."""
    full = chat(client, temperature=0, max_tokens=12).json()["choices"][0]
    text = full["message"]["content"]
    at = [i for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable()]
    assert at, text  # the untrained model's text is mostly stray bytes: a printable pair, not at the start
    stop = text[at[0]:at[0] + 2]
    want = text[:text.index(stop)]
    for s in (stop, [stop], ["\x00never", stop]):
        got = chat(client, temperature=0, max_tokens=12, stop=s).json()["choices"][0]
        assert got["message"]["content"] == want and got["finish_reason"] == "stop", (s, got)
    with client.stream("POST", "/v1/chat/completions", headers=KEY, json={
            "messages": MSG, "max_tokens": 12, "temperature": 0, "stop": stop, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, field", [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"), ({"stop": [""]}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"top_k": 5}, "top_k"),
    ({"reasoning_effort": "high"}, "reasoning_effort"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_fields_that_would_change_the_output_are_refused(client, body, field):
    """They were dropped without a word: the reply looked like an answer to a request it was not."""
    r = chat(client, temperature=0, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_fields_that_do_not_change_the_output_are_accepted(client):
    r = chat(client, temperature=0, user="u1", metadata={"k": "v"}, store=False, presence_penalty=0,
             frequency_penalty=0, logit_bias={}, tools=None, response_format={"type": "text"}, stop=None,
             n=None, logprobs=None, top_p=None, tool_choice="auto")
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == chat(client, temperature=0).json()["choices"]


@pytest.mark.parametrize("temperature, top_p", [(0, 1), (0.3, 1), (1.7, 0.9), (1.0, 0.05)])
def test_logprobs_are_the_models_own(client, model_dir, temperature, top_p):
    """logprobs came from the temperature/top-p-warped distribution (they moved with T; at top_p 0.05
    the -inf values made a 500). Here: log_softmax of a direct forward over the prompt and the tokens
    chosen so far, step by step."""
    r = chat(client, temperature=temperature, top_p=top_p, seed=1, max_tokens=4, logprobs=True, top_logprobs=5)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    model, tok = model_and_tok(model_dir)
    ids = prompt_ids(tok)
    for entry in content:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        vals, idx = logp.topk(5)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(vals.tolist(), abs=1e-4)
        assert [t["token"] for t in entry["top_logprobs"]] == [tok.decode([i]) for i in idx.tolist()]
        match = [j for j in range(len(tok)) if tok.decode([j]) == entry["token"]
                 and abs(float(logp[j]) - entry["logprob"]) < 1e-4]
        assert match, entry
        assert entry["bytes"] == list(entry["token"].encode())
        ids.append(match[0])
    assert len(content) == r.json()["usage"]["completion_tokens"]


def test_a_lone_surrogate_is_400(client):
    r = client.post("/v1/chat/completions", headers={**KEY, "Content-Type": "application/json"},
                    content=b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}], "max_tokens": 2}')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages.0.content" and "surrogate" in r.json()["error"]["message"]


def test_a_seed_beyond_64_bits_is_400(client):
    assert chat(client, seed=2**64 - 1).status_code == 200
    for seed in (2**64, -2**63 - 1):
        r = chat(client, seed=seed)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text


def test_a_seed_reproduces_the_answer(client):
    a, b = (chat(client, temperature=1, seed=7, max_tokens=8, n=2).json()["choices"] for _ in range(2))
    assert a == b


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_prompt_plus_max_tokens_beyond_the_context_is_400(client, model_dir, field):
    """Eval refuses a prompt that cannot fit with its answer; the server accepted it (context 128)."""
    _, tok = model_and_tok(model_dir)
    room = 128 - len(prompt_ids(tok))
    assert chat(client, temperature=0, **{"max_tokens": None, field: room}).status_code == 200
    r = chat(client, temperature=0, **{"max_tokens": None, field: room + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert "context of 128" in r.json()["error"]["message"]


def test_usage_carries_total_tokens(client, model_dir):
    _, tok = model_and_tok(model_dir)
    r = chat(client, temperature=1, seed=0, n=3, max_tokens=5, logprobs=True).json()
    u = r["usage"]
    assert u["prompt_tokens"] == len(prompt_ids(tok))
    assert u["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in r["choices"])
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
