"""Judges: `compare(prompt, a, b) -> (probability that a is better, explanation)`.

- `OracleJudge`: a world's exact preference.
- `RewardModelJudge`: sigma(r(a) - r(b)) from an `AutoModelForSequenceClassification`.
- `LLMJudge`: a local causal LM with an AlpacaEval-style pairwise prompt, scored from the
  probabilities of the two label tokens, averaged over both orders to cancel position bias.
- `HTTPJudge`: the same prompt sent to an OpenAI-compatible chat-completions endpoint; base URL
  and key come from the environment, and the key never appears in logs or errors.

Single-answer grading (MT-Bench's 1-10 score of one answer) is `inspo_core.grading`.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

JUDGE_PROMPT = (
    "You are comparing two responses to the same instruction. Pick the more helpful, correct and "
    "relevant one.\n\n# Instruction\n{instruction}\n\n# Output (a)\n{a}\n\n# Output (b)\n{b}\n\n"
    "# Which output is better? Answer with a single letter, a or b.\nAnswer:"
)


class JudgeError(RuntimeError):
    pass


class OracleJudge:
    name = "oracle"

    def __init__(self, world):
        self.world = world

    def identity(self) -> dict:
        return {"judge": self.name, "world": self.world.cfg.key()}

    def check(self) -> None:
        pass

    def compare(self, prompt: str, a: str, b: str) -> tuple[float, str]:
        return self.world.preference(prompt, a, b), self.world.explain(prompt, a, b)


class RewardModelJudge:
    name = "reward_model"

    def __init__(self, path: str, *, trust_remote_code: bool = False, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code, use_safetensors=True).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has num_labels=1, this one has {self.model.config.num_labels}")
        self.device = device
        self.path = path

    def identity(self) -> dict:
        from inspo_core.fingerprint import model_fingerprint

        return {"judge": self.name, "model": model_fingerprint(self.path)}

    def check(self) -> None:
        pass

    @torch.no_grad()
    def reward(self, prompt: str, response: str) -> float:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": response}], tokenize=False)
            enc = self.tok(text, return_tensors="pt", add_special_tokens=False)
        else:
            enc = self.tok(prompt, response, return_tensors="pt")
        return float(self.model(**enc.to(self.device)).logits[0, 0])

    def compare(self, prompt: str, a: str, b: str) -> tuple[float, str]:
        ra, rb = self.reward(prompt, a), self.reward(prompt, b)
        return 1 / (1 + math.exp(-(ra - rb))), f"reward(a)={ra:.3f} reward(b)={rb:.3f}"


def _label_probs(logprobs: dict[str, float]) -> float:
    """P(a) from log-probabilities of candidate label tokens, renormalised over a and b."""
    pa = sum(math.exp(v) for k, v in logprobs.items() if k.strip().lower().strip("()") == "a")
    pb = sum(math.exp(v) for k, v in logprobs.items() if k.strip().lower().strip("()") == "b")
    if pa + pb == 0:
        raise JudgeError("the judge gave neither label 'a' nor 'b' any probability")
    return pa / (pa + pb)


class LLMJudge:
    name = "llm"

    def __init__(self, path: str, *, trust_remote_code: bool = False, device: str = "cpu"):
        from inspo_core.models import load_model, load_tokenizer

        self.tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        self.model = load_model(path, dtype=torch.float32, trust_remote_code=trust_remote_code).to(device).eval()
        self.device = device
        self.path = path
        self.label_ids = {lab: self._label_ids(lab) for lab in ("a", "b")}

    def identity(self) -> dict:
        from inspo_core.fingerprint import model_fingerprint

        return {"judge": self.name, "model": model_fingerprint(self.path), "prompt": JUDGE_PROMPT}

    def check(self) -> None:
        pass

    def _label_ids(self, label: str) -> list[int]:
        ids = set()
        for text in (label, " " + label, label.upper(), " " + label.upper()):
            toks = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:
                ids.add(toks[0])
        if not ids:
            raise ValueError(f"the judge tokenizer has no single token for the label {label!r}")
        return sorted(ids)

    def _render(self, prompt: str, a: str, b: str) -> str:
        text = JUDGE_PROMPT.format(instruction=prompt, a=a, b=b)
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
        return text

    @torch.no_grad()
    def prob_first(self, prompt: str, a: str, b: str) -> float:
        text = self._render(prompt, a, b)
        enc = self.tok(text, return_tensors="pt", add_special_tokens=not getattr(self.tok, "chat_template", None))
        logits = self.model(**enc.to(self.device)).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        la = torch.logsumexp(logp[self.label_ids["a"]], 0)
        lb = torch.logsumexp(logp[self.label_ids["b"]], 0)
        return float(torch.sigmoid(la - lb))

    def compare(self, prompt: str, a: str, b: str) -> tuple[float, str]:
        p1 = self.prob_first(prompt, a, b)
        p2 = 1 - self.prob_first(prompt, b, a)
        return (p1 + p2) / 2, f"P(a) shown first {p1:.3f}; shown second {p2:.3f}"


class HTTPJudge:
    """An OpenAI-compatible judge. Reads INSPO_JUDGE_BASE_URL (e.g. http://127.0.0.1:8000/v1),
    INSPO_JUDGE_API_KEY (or OPENAI_API_KEY) and INSPO_JUDGE_MODEL unless given."""

    name = "http"

    def __init__(self, base_url: str | None = None, model: str | None = None, *, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, both_orders: bool = True):
        self.base_url = (base_url or os.environ.get("INSPO_JUDGE_BASE_URL", "")).rstrip("/")
        if not self.base_url:
            raise ValueError("HTTP judge needs a base URL: set INSPO_JUDGE_BASE_URL (e.g. http://127.0.0.1:8000/v1)")
        self.model = model or os.environ.get("INSPO_JUDGE_MODEL", "judge")
        self._key = os.environ.get("INSPO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout, self.retries, self.backoff, self.both_orders = timeout, retries, backoff, both_orders

    def __repr__(self) -> str:  # never show the key
        return f"HTTPJudge(base_url={self.base_url!r}, model={self.model!r}, key={'set' if self._key else 'unset'})"

    def identity(self) -> dict:
        return {"judge": self.name, "base_url": self.base_url, "model": self.model, "both_orders": self.both_orders,
                "prompt": JUDGE_PROMPT}

    def check(self) -> None:
        """Reach the server once (GET /models) before any work is spent on sampling: an unreachable
        judge is a JudgeError now, not after every answer has been generated."""
        url = f"{self.base_url}/models"
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=min(self.timeout, 10)):
                pass
        except urllib.error.HTTPError:
            pass  # it answered: reachable (some servers have no /models)
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise JudgeError(f"judge at {self.base_url} is not reachable ({type(reason).__name__}: {reason}); "
                             "start it or fix INSPO_JUDGE_BASE_URL / --judge_url") from None

    def _post(self, payload: dict) -> dict:
        url = f"{self.base_url}/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
                try:
                    return json.loads(body)
                except json.JSONDecodeError:
                    raise JudgeError(f"judge at {url} returned a reply that is not JSON: {body[:200]!r}") from None
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code < 500 and e.code != 429:  # client errors do not get better by retrying
                    raise JudgeError(f"judge at {url} refused the request: {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise JudgeError(f"judge at {url} failed after {self.retries + 1} attempts ({last})")

    def _one_order(self, prompt: str, a: str, b: str) -> tuple[float, str]:
        reply = self._post({
            "model": self.model, "temperature": 0, "max_tokens": 1, "logprobs": True, "top_logprobs": 20,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(instruction=prompt, a=a, b=b)}],
        })
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"malformed judge reply (no choices[0].message): {str(reply)[:200]}") from None
        top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs")
        if top:
            return _label_probs({t["token"]: t["logprob"] for t in top}), text
        label = text.strip().lower().strip("()")[:1]
        if label not in ("a", "b"):
            raise JudgeError(f"judge answered {text[:50]!r}, not 'a' or 'b'")
        return (1.0 if label == "a" else 0.0), text

    def compare(self, prompt: str, a: str, b: str) -> tuple[float, str]:
        p1, t1 = self._one_order(prompt, a, b)
        if not self.both_orders:
            return p1, t1
        p2, t2 = self._one_order(prompt, b, a)
        return (p1 + 1 - p2) / 2, f"a first: {t1!r} (P(a)={p1:.3f}); b first: {t2!r} (P(b)={p2:.3f})"


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    summary: str
    needs_world: bool = False  # only for checkpoints of a synthetic world
    needs_model: bool = False  # a local model directory (--judge_model)
    needs_url: bool = False  # an OpenAI-compatible server


JUDGES: dict[str, JudgeSpec] = {j.name: j for j in [
    JudgeSpec("oracle", "the world's exact preference (world checkpoints only)", needs_world=True),
    JudgeSpec("reward_model", "sigma(r(a) - r(b)) from a sequence-classification reward model", needs_model=True),
    JudgeSpec("llm", "a local causal LM asked which answer is better, both orders", needs_model=True),
    JudgeSpec("http", "an OpenAI-compatible judge server (INSPO_JUDGE_BASE_URL)", needs_url=True),
]}


def available_judges(*, world=None, judge_model: str | None = None, url: str | None = None) -> list[str]:
    """Names of the judges that can run with what is at hand (a world, a judge model, a URL)."""
    url = url or os.environ.get("INSPO_JUDGE_BASE_URL")
    return [n for n, j in JUDGES.items() if (not j.needs_world or world is not None)
            and (not j.needs_model or bool(judge_model)) and (not j.needs_url or bool(url))]


def make_judge(kind: str, *, world=None, path: str | None = None, base_url: str | None = None,
               model: str | None = None, trust_remote_code: bool = False):
    if kind not in JUDGES:
        raise ValueError(f"unknown judge {kind!r}; valid: {', '.join(JUDGES)}")
    spec = JUDGES[kind]
    if spec.needs_world and world is None:
        raise ValueError("the oracle judge needs a world: it judges only checkpoints trained in a synthetic world")
    if spec.needs_model and not path:
        raise ValueError(f"the {kind} judge needs --judge_model PATH")
    if kind == "oracle":
        return OracleJudge(world)
    if kind == "reward_model":
        return RewardModelJudge(path, trust_remote_code=trust_remote_code)
    if kind == "llm":
        return LLMJudge(path, trust_remote_code=trust_remote_code)
    return HTTPJudge(base_url, model)
