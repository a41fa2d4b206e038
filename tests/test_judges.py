"""Judges, `workbench serve`, and the HTTP judge against the real server and against failures."""

import json
import math
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import free_port, workbench_server

from inspo_core.judges import HTTPJudge, JudgeError, LLMJudge, OracleJudge, RewardModelJudge
from inspo_core.models import tiny_llama, train_tokenizer

CORPUS = ["Which output is better? Answer with a single letter, a or b.", "Output (a) Output (b) Instruction",
          "Take the apple. Go with the bread. The sea is blue."] * 10


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny LM rigged to answer 'a' or 'b': the final norm keeps one hidden unit h0, and only the
    rows of 'a' (+5 h0) and 'b' (-5 h0) of the LM head are non-zero."""
    d = tmp_path_factory.mktemp("judge")
    tok = train_tokenizer(CORPUS, vocab_size=300)
    model = tiny_llama(len(tok), hidden_size=32, seed=3)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids("a"), 0] = 5.0
        model.lm_head.weight[tok.convert_tokens_to_ids("b"), 0] = -5.0
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_oracle_judge():
    from inspo_core.worlds.token import TokenWorld, TokenWorldConfig

    w = TokenWorld(TokenWorldConfig(n_items=3))
    p, why = OracleJudge(w).compare(w.prompts[1], "Take the apple.", "hmm")
    assert p == 1.0 and "apple vs unparseable" in why


class RiggedLM(torch.nn.Module):
    """Stands in for the judge LM: last-position logits `hi` for every token of the label whose output
    section mentions "apple" and `lo` for the other label's tokens (-30 elsewhere); with
    `always_a`, label a gets `hi` whatever the content (a judge with pure position bias)."""

    def __init__(self, tok, label_ids, hi, lo, always_a=False):
        super().__init__()
        self.tok, self.label_ids, self.hi, self.lo, self.always_a = tok, label_ids, hi, lo, always_a

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        text = self.tok.decode(input_ids[0])
        first = text.split("Output (a)")[1].split("Output (b)")[0]
        winner = "a" if self.always_a or "apple" in first else "b"
        logits = torch.full((1, input_ids.shape[1], len(self.tok)), -30.0)
        for lab, ids in self.label_ids.items():
            logits[0, -1, ids] = self.hi if lab == winner else self.lo
        return SimpleNamespace(logits=logits)


def test_llm_judge_reads_the_label_probabilities(judge_dir):
    """P(a better) from rigged label logits, by hand: with k_a tokens for 'a' at logit 3 and k_b for
    'b' at 0, the apple answer wins each order with k_a e^3 / (k_a e^3 + k_b) (or the mirror when it
    is shown second), and compare() averages the two orders."""
    import math

    judge = LLMJudge(str(judge_dir))
    ka, kb = len(judge.label_ids["a"]), len(judge.label_ids["b"])
    judge.model = RiggedLM(judge.tok, judge.label_ids, 3.0, 0.0)
    first = ka * math.exp(3) / (ka * math.exp(3) + kb)  # apple shown as (a): label a has logit 3
    second = kb * math.exp(3) / (kb * math.exp(3) + ka)  # apple shown as (b): label b has logit 3
    p, why = judge.compare("Name a fruit.", "Take the apple.", "The sea is blue.")
    assert p == pytest.approx((first + second) / 2, abs=1e-6)
    q, _ = judge.compare("Name a fruit.", "The sea is blue.", "Take the apple.")
    assert q == pytest.approx(1 - (first + second) / 2, abs=1e-6)
    assert "shown first" in why
    judge.model = RiggedLM(judge.tok, judge.label_ids, 4.0, -1.0, always_a=True)
    assert judge.compare("Name a fruit.", "Take the apple.", "The sea is blue.")[0] == pytest.approx(0.5, abs=1e-9)


def test_reward_model_judge(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = train_tokenizer(CORPUS, vocab_size=300, chat_template=None)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = RewardModelJudge(str(tmp_path))
    ra, rb = judge.reward("p", "Take the apple."), judge.reward("p", "The sea.")
    p, _ = judge.compare("p", "Take the apple.", "The sea.")
    assert p == pytest.approx(1 / (1 + torch.exp(torch.tensor(rb - ra)).item()))


@pytest.fixture(scope="module")
def served(judge_dir):
    key = {"Authorization": "Bearer sk-test-secret"}
    with workbench_server("serve", "--model", str(judge_dir), probe="/v1/models", headers=key,
                          env={"INSPO_SERVE_API_KEY": "sk-test-secret"}) as base:
        yield base + "/v1"


def post(url, payload, key="sk-test-secret"):
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_serve_matches_the_local_model(served, judge_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    msg = [{"role": "user", "content": "Which output is better?"}]
    reply = post(served, {"messages": msg, "temperature": 0, "max_tokens": 1, "logprobs": True, "top_logprobs": 5})
    first = reply["choices"][0]["logprobs"]["content"][0]
    tok = AutoTokenizer.from_pretrained(judge_dir)
    model = AutoModelForCausalLM.from_pretrained(judge_dir)
    ids = tok(tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False), return_tensors="pt",
              add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(**ids).logits[0, -1], -1)
    best = int(logp.argmax())
    assert first["token"] == tok.decode([best]) and first["logprob"] == pytest.approx(float(logp[best]), abs=1e-4)
    assert reply["choices"][0]["message"]["content"] in ("a", "b")
    with pytest.raises(urllib.error.HTTPError) as e:
        post(served, {"messages": msg}, key="wrong")
    assert e.value.code == 401


def test_http_judge_against_workbench_serve(served, monkeypatch, judge_dir):
    """The HTTP judge's P(a) equals the one computed here from the served model's own label
    probabilities (top_logprobs over 'a'/'b' tokens), in both orders."""
    monkeypatch.setenv("INSPO_JUDGE_BASE_URL", served)
    monkeypatch.setenv("INSPO_JUDGE_API_KEY", "sk-test-secret")
    judge = HTTPJudge()
    p, why = judge.compare("Name a fruit.", "Take the apple.", "The sea is blue.")
    local = LLMJudge(str(judge_dir))

    def label_prob(a, b):  # P('a') renormalised over the single-token spellings of a and b in the top 20
        from inspo_core.judges import JUDGE_PROMPT

        text = local.tok.apply_chat_template([{"role": "user", "content": JUDGE_PROMPT.format(
            instruction="Name a fruit.", a=a, b=b)}], add_generation_prompt=True, tokenize=False)
        enc = local.tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(local.model(**enc).logits[0, -1], -1)
        top = logp.topk(20).indices.tolist()
        name = lambda i: local.tok.decode([i]).strip().lower().strip("()")  # noqa: E731
        pa = sum(logp[i].exp().item() for i in top if name(i) == "a")
        pb = sum(logp[i].exp().item() for i in top if name(i) == "b")
        return pa / (pa + pb)

    want = (label_prob("Take the apple.", "The sea is blue.") + 1 - label_prob("The sea is blue.", "Take the apple.")) / 2
    assert p == pytest.approx(want, abs=1e-4)
    assert "sk-test-secret" not in repr(judge) and "sk-test-secret" not in why


class Stub(BaseHTTPRequestHandler):
    mode = "ok"
    hits = 0

    def do_POST(self):
        type(self).hits += 1
        self.rfile_body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.mode == "500":
            self.send_response(500)
            self.end_headers()
            return
        if self.mode == "400":
            self.send_response(400)
            self.end_headers()
            return
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode in ("rigged", "always_a"):
            prompt = json.loads(self.rfile_body)["messages"][0]["content"]
            apple_first = "apple" in prompt.split("Output (a)")[1].split("Output (b)")[0]
            # label probabilities: 0.8 / 0.1 for the apple side's label, 0.1 to an unrelated token
            pa, pb = (0.8, 0.1) if apple_first or self.mode == "always_a" else (0.1, 0.8)
            top = [{"token": "a", "logprob": math.log(pa)}, {"token": " B", "logprob": math.log(pb)},
                   {"token": "x", "logprob": math.log(0.1)}]
            body = json.dumps({"choices": [{"message": {"content": "a" if pa > pb else "b"},
                                            "logprobs": {"content": [{"token": "a", "logprob": 0.0,
                                                                      "top_logprobs": top}]}}]}).encode()
        else:
            body = b"this is not json" if self.mode == "garbage" else json.dumps(
                {"choices": [{"message": {"content": "b" if self.mode == "ok" else "maybe"}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up (the timeout case)
            pass

    def log_message(self, *a):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Stub.hits = 0
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize("mode, match, hits", [
    ("500", r"failed after 3 attempts \(HTTP 500", 3),
    ("400", r"refused the request: HTTP 400", 1),
    ("garbage", "not JSON", 1),
    ("unsure", "answered 'maybe', not 'a' or 'b'", 1),
    ("slow", r"failed after 2 attempts \(.*timed out", 2),
])
def test_http_judge_failures_are_clear(stub, monkeypatch, mode, match, hits):
    _, url = stub
    Stub.mode = mode
    monkeypatch.setenv("INSPO_JUDGE_API_KEY", "sk-never-shown")
    judge = HTTPJudge(url, timeout=0.5, retries=2 if mode != "slow" else 1, backoff=0.01)
    with pytest.raises(JudgeError, match=match) as e:
        judge.compare("p", "a", "b")
    assert Stub.hits == hits and "sk-never-shown" not in str(e.value)


def test_http_judge_reads_label_probabilities(stub):
    """From rigged top_logprobs: P(label a) = 0.8 / (0.8 + 0.1) when the apple answer is shown first,
    0.1 / 0.9 when second (' B' counts as b, 'x' is ignored); both orders average to 8/9. A judge
    that always says 'a' gives 0.5."""
    _, url = stub
    Stub.mode = "rigged"
    p, _ = HTTPJudge(url).compare("p", "Take the apple.", "The sea.")
    assert p == pytest.approx(8 / 9, abs=1e-9)
    assert HTTPJudge(url, both_orders=False).compare("p", "The sea.", "Take the apple.")[0] == pytest.approx(1 / 9)
    Stub.mode = "always_a"
    assert HTTPJudge(url).compare("p", "Take the apple.", "The sea.")[0] == pytest.approx(0.5, abs=1e-9)


def test_http_judge_text_answer_and_server_down(stub, monkeypatch):
    _, url = stub
    Stub.mode = "ok"
    p, _ = HTTPJudge(url, both_orders=False).compare("p", "x", "y")
    assert p == 0.0  # answered 'b'
    with pytest.raises(JudgeError, match=r"failed after 2 attempts \(ConnectionRefusedError"):
        HTTPJudge(f"http://127.0.0.1:{free_port()}/v1", retries=1, backoff=0.01).compare("p", "a", "b")
    monkeypatch.delenv("INSPO_JUDGE_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="INSPO_JUDGE_BASE_URL"):
        HTTPJudge()


def test_eval_command_with_a_local_llm_judge_and_a_prompt_file(judge_dir, tmp_path):
    """The non-world path of `workbench eval`: prompt file, checkpoint baseline, LLM judge."""
    from workbench.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a fruit.\nThe sea?\n")
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoints", str(judge_dir), "--baseline", str(judge_dir), "--prompts", str(prompts),
                 "--judge", "llm", "--judge_model", str(judge_dir), "--n_samples", "3", "--max_new_tokens", "4",
                 "--n_boot", "50", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    res = next(iter(doc["results"].values()))
    assert doc["judge"] == "llm" and res["n"] == 6
    # same model, same seed on both sides: identical answers, and both-order judging makes each a tie
    assert res["win_rate"] == pytest.approx(0.5) and res["ties"] + res["wins"] + res["losses"] == 6
    assert main(["eval", "--checkpoints", str(tmp_path / "nope")]) == 2  # a clear error, no traceback


def test_eval_with_an_unreachable_http_judge_stops_before_sampling(judge_dir, tmp_path, capsys):
    """An HTTP judge at a dead port raised a traceback after sampling everything."""
    from workbench.cli import main

    code = main(["eval", "--checkpoints", str(judge_dir), "--baseline", str(judge_dir), "--prompts",
                 str(tmp_path / "p.txt"), "--judge", "http", "--judge_url", f"http://127.0.0.1:{free_port()}/v1"]
                if (tmp_path / "p.txt").write_text("Name a fruit.\n") else [])
    out = capsys.readouterr()
    assert code == 1 and "is not reachable" in out.err and "Traceback" not in out.err
    assert "sampling" not in out.out
