"""Single-answer grading, MT-Bench style: a judge scores one answer from 1 to 10.

`SingleAnswerGrader` renders MT-Bench's judge prompts (Zheng et al. 2023; FastChat's `single-v1`,
`single-math-v1` with a reference answer, and `single-v1-multi-turn` / `single-math-v1-multi-turn`
for the second turn, which show the judge the whole two-turn conversation and ask about the second
answer), sends them to a chat function `chat(messages) -> str`, and parses the rating. MT-Bench's
score of a model is the mean over every graded turn (80 questions x 2 turns); ours also gives an
interval, a bootstrap over questions (the two turns of one question are not independent).

The chat function is the transport: `http_chat` (an OpenAI-compatible server, as `HTTPJudge`), or
`local_chat` (a local causal LM, greedy), or any callable, which is how tests rig judge outputs.

`parse_rating` reads, in order of trust: "[[7]]" (MT-Bench's format); then "Rating: 7", "Score: 7",
"rating of 7", "7/10", "7 out of 10"; then a bare "[7]" (FastChat's fallback). Within the first form
found, the rating stated last counts (the judge explains first and rates last, and an echo of the
prompt's example "Rating: [[5]]" comes first; FastChat takes the first "[[x]]"). A reply with no
rating, or one outside 1..10, gives None: it is counted as unparsed and left out of the mean, never
scored as some default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

_ASK = ("Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your "
        "explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: "
        "\"[[rating]]\", for example: \"Rating: [[5]]\".")
_GENERAL = ("Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
            "the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
            "relevance, accuracy, depth, creativity, and level of detail of the response.")
_REFERENCED = ("Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
               "to the user question displayed below. Your evaluation should consider correctness and helpfulness. "
               "You will be given a reference answer and the assistant's answer. Begin your evaluation by comparing "
               "the assistant's answer with the reference answer. Identify and correct any mistakes.")
_SECOND = "You evaluation should focus on the assistant's answer to the second user question."  # sic, as in MT-Bench

# name -> (system prompt, user template); the four single-answer prompts of MT-Bench
PROMPTS: dict[str, tuple[str, str]] = {
    "single-v1": ("You are a helpful assistant.",
                  f"[Instruction]\n{_GENERAL} {_ASK}\n\n[Question]\n{{question}}\n\n"
                  "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"),
    "single-math-v1": ("You are a helpful assistant.",
                       f"[Instruction]\n{_REFERENCED} Be as objective as possible. After providing your explanation, "
                       "you must rate the response on a scale of 1 to 10 by strictly following this format: "
                       "\"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n"
                       "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n"
                       "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"),
    "single-v1-multi-turn": (f"{_GENERAL} {_SECOND} {_ASK}\n\n",
                             "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
                             "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}"
                             "\n\n<|The End of Assistant A's Conversation with User|>"),
    "single-math-v1-multi-turn": (
        "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
        "the user question. Your evaluation should consider correctness and helpfulness. You will be given a "
        "reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to the "
        "second question. Begin your evaluation by comparing the assistant's answer with the reference answer. "
        "Identify and correct any mistakes. Be as objective as possible. After providing your explanation, you must "
        "rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: "
        "\"Rating: [[5]]\".\n\n",
        "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
        "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
        "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
        "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
        "<|The End of Assistant A's Conversation with User|>"),
}

_NUM = r"(\d+(?:\.\d+)?)"
# tiers in order of trust; within a tier the match that comes last in the reply counts
_TIERS = [
    [re.compile(r"\[\[\s*" + _NUM + r"\s*\]\]")],  # MT-Bench's "[[7]]"
    [re.compile(r"\b(?:rating|score)(?:\s+(?:of|is))?\s*[:=]?\s*\[?\s*" + _NUM, re.IGNORECASE),  # "Rating: 7"
     re.compile(_NUM + r"\s*(?:/|out of)\s*10\b", re.IGNORECASE)],  # "7/10", "7 out of 10"
    [re.compile(r"(?<!\[)\[\s*" + _NUM + r"\s*\](?!\])")],  # FastChat's fallback "[7]"
]


def parse_rating(text: str) -> float | None:
    """The 1-10 rating a judge reply states (module docstring), or None when it states none in range."""
    if not isinstance(text, str):
        return None
    for tier in _TIERS:
        found = [(m.start(), m.group(1)) for pat in tier for m in pat.finditer(text)]
        if found:
            value = float(max(found)[1])
            return value if 1.0 <= value <= 10.0 else None
    return None


@dataclass(frozen=True)
class Grade:
    question: str  # the question's identity (its first turn's text unless given)
    turn: int  # 1-based
    score: float | None  # None: the reply had no rating in 1..10
    reply: str


def _as_turns(x, what: str) -> list[str]:
    turns = [x] if isinstance(x, str) else list(x)
    if not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{what} must be a string or a non-empty list of strings (one per turn)")
    return turns


class SingleAnswerGrader:
    """Grades every turn of a conversation: turn 1 with `single-v1` (or `single-math-v1` given a
    reference), turn 2 with the multi-turn prompt; MT-Bench has at most two turns."""

    def __init__(self, chat: Callable[[list[dict]], str], identity: dict | None = None):
        self.chat = chat
        self._identity = dict(identity or {})

    def identity(self) -> dict:
        return {"grader": "single-answer", "prompts": sorted(PROMPTS), **self._identity}

    def messages(self, questions, answers, references=None, turn: int = 1) -> list[dict]:
        """The chat messages that grade `turn` (1-based) of the conversation."""
        q, a = _as_turns(questions, "questions"), _as_turns(answers, "answers")
        if len(q) != len(a):
            raise ValueError(f"{len(q)} question turns but {len(a)} answers: give one answer per turn")
        if len(q) > 2:
            raise ValueError(f"{len(q)} turns: MT-Bench's judge prompts cover one or two turns")
        ref = None if references is None else _as_turns(references, "references")
        if ref is not None and len(ref) != len(q):
            raise ValueError(f"{len(ref)} reference answers for {len(q)} turns")
        if turn == 1:
            name = "single-math-v1" if ref else "single-v1"
            fields = {"question": q[0], "answer": a[0], "ref_answer_1": ref[0] if ref else ""}
        elif turn == 2 and len(q) == 2:
            name = "single-math-v1-multi-turn" if ref else "single-v1-multi-turn"
            fields = {"question_1": q[0], "question_2": q[1], "answer_1": a[0], "answer_2": a[1],
                      "ref_answer_1": ref[0] if ref else "", "ref_answer_2": ref[1] if ref else ""}
        else:
            raise ValueError(f"turn {turn} of a {len(q)}-turn conversation")
        system, template = PROMPTS[name]
        return [{"role": "system", "content": system}, {"role": "user", "content": template.format(**fields)}]

    def grade(self, questions, answers, references=None, *, question_id: str | None = None) -> list[Grade]:
        """One Grade per turn."""
        q = _as_turns(questions, "questions")
        qid = question_id if question_id is not None else q[0]
        out = []
        for turn in range(1, len(q) + 1):
            reply = self.chat(self.messages(questions, answers, references, turn))
            if not isinstance(reply, str):
                raise ValueError(f"the grader's chat function returned {type(reply).__name__}, not the reply text")
            out.append(Grade(qid, turn, parse_rating(reply), reply))
        return out


@dataclass
class GradeSummary:
    mean: float
    ci: list[float]
    n: int  # graded turns with a rating
    unparsed: int  # replies without a rating in 1..10 (left out of the mean)
    per_turn: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"mt_score": self.mean, "mt_score_ci": self.ci, "n": self.n, "unparsed": self.unparsed,
                "per_turn": {str(k): v for k, v in self.per_turn.items()}}


def summarize_grades(grades: Sequence[Grade], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> GradeSummary:
    """Mean score over every parsed turn (MT-Bench's score) and a percentile bootstrap interval that
    resamples questions with all their turns. Unparsed replies are counted, not scored."""
    import numpy as np

    rated = [g for g in grades if g.score is not None]
    unparsed = len(grades) - len(rated)
    if not rated:
        return GradeSummary(float("nan"), [float("nan")] * 2, 0, unparsed)
    by_q: dict[str, list[float]] = {}
    for g in rated:
        by_q.setdefault(g.question, []).append(float(g.score))
    sums = np.array([sum(v) for v in by_q.values()])
    counts = np.array([len(v) for v in by_q.values()])
    mean = float(sums.sum() / counts.sum())
    ci = [float("nan")] * 2
    if len(by_q) > 1:
        idx = np.random.default_rng(seed).integers(0, len(by_q), size=(n_boot, len(by_q)))
        boots = sums[idx].sum(1) / counts[idx].sum(1)  # ratio of sums: each turn weighs the same, as in the mean
        ci = [float(x) for x in np.percentile(boots, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])]
    per_turn = {t: float(np.mean([g.score for g in rated if g.turn == t])) for t in sorted({g.turn for g in rated})}
    return GradeSummary(mean, ci, len(rated), unparsed, per_turn)


def http_chat(base_url: str | None = None, model: str | None = None, *, max_tokens: int = 2048,
              timeout: float = 120.0) -> Callable[[list[dict]], str]:
    """An OpenAI-compatible chat function (temperature 0, as MT-Bench grades); URL, key and model as
    `HTTPJudge` reads them."""
    from inspo_core.judges import HTTPJudge, JudgeError

    client = HTTPJudge(base_url, model, timeout=timeout, both_orders=False)

    def chat(messages: list[dict]) -> str:
        reply = client._post({"model": client.model, "temperature": 0, "max_tokens": max_tokens, "messages": messages})
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"malformed judge reply (no choices[0].message): {str(reply)[:200]}") from None

    chat.identity = {"base_url": client.base_url, "model": client.model, "max_tokens": max_tokens}  # type: ignore[attr-defined]
    return chat


def local_chat(path: str, *, max_new_tokens: int = 256, trust_remote_code: bool = False) -> Callable[[list[dict]], str]:
    """A local causal LM with a chat template as the grader, greedy decoding."""
    import torch

    from inspo_core.models import load_model, load_tokenizer

    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{path}: a local grader needs a tokenizer with a chat template")
    model = load_model(path, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()

    @torch.no_grad()
    def chat(messages: list[dict]) -> str:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    chat.identity = {"model": path, "max_new_tokens": max_new_tokens}  # type: ignore[attr-defined]
    return chat


def mean_ci_text(s: GradeSummary) -> str:
    lo, hi = s.ci
    band = "" if math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
    return f"{s.mean:.2f}{band} ({s.n} turns, {s.unparsed} unparsed)"


class OracleGrader:
    """A world's exact oracle as an MT-Bench-style grader: the score of an answer y to x is
    1 + 9 E_{y' ~ pi_ref} P(y > y' | x), the expected win probability against the world's reference
    opponents mapped onto 1..10 (5.5 is pi_ref's own level in expectation). Single-turn only: the
    worlds' prompts have one turn."""

    name = "oracle"

    def __init__(self, world, opponents: dict[str, list[str]]):
        self.world, self.opponents = world, opponents

    def identity(self) -> dict:
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(self.opponents, sort_keys=True).encode()).hexdigest()[:16]
        return {"grader": self.name, "world": self.world.cfg.key(), "opponents": digest}

    def grade(self, questions, answers, references=None, *, question_id: str | None = None) -> list[Grade]:
        q, a = _as_turns(questions, "questions"), _as_turns(answers, "answers")
        if len(q) != 1 or len(a) != 1:
            raise ValueError("the oracle grader scores single-turn answers only (a world's prompts have one turn)")
        opp = self.opponents.get(q[0])
        if not opp:
            raise ValueError(f"no reference opponents for the prompt {q[0][:60]!r}: is it one of the world's prompts?")
        v = sum(self.world.preference(q[0], a[0], o) for o in opp) / len(opp)
        return [Grade(question_id if question_id is not None else q[0], 1, 1.0 + 9.0 * float(v),
                      f"E P(answer > pi_ref) = {v:.4f} over {len(opp)} opponents")]


class GradeLog:
    """Grades appended to a JSONL file as they finish, one line per graded conversation under its key
    (as `inspo_core.evaluate.JudgementLog` does for judgements): a rerun reuses exactly its own work.
    A line of any other shape is skipped and counted; its conversation is graded again."""

    def __init__(self, path):
        import json
        from pathlib import Path

        self.path = Path(path)
        self.done: dict[str, list[Grade]] = {}
        self.skipped = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    grades = [Grade(str(g["question"]), int(g["turn"]),
                                    None if g["score"] is None else float(g["score"]), str(g["reply"]))
                              for g in row["grades"]]
                    self.done[str(row["key"])] = grades
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    self.skipped += 1

    def add(self, key: str, grades: list[Grade]) -> None:
        import json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "grades": [g.__dict__ for g in grades]}) + "\n")
        self.done[key] = grades
