"""The conditioning builder: one (x, y_w, y_l) -> token sequences for every view (Appendix C.2).

A sequence is `prompt | context | target`: the prompt (chat-rendered with the generation prompt
for conversational data), an optional rendering of the alternative response, and the target
response whose tokens are scored. The target's tokens are the same in every view (plain or
conditioned) so that log pi(y_w | x, y_l) and log pi_ref(y_w | x) score exactly the same tokens.

Context renderings (`context_format`):
- `sep`: x + [SEP] + y_alt + [SEP] + y (eq. 14/15; the separator is `sep_token`, else the
  tokenizer's sep token, else its EOS token);
- `raw`: x + y_alt + y, plain concatenation of the token sequences (the authors' code);
- `template`: x + render(template, y_alt) + y, a user-editable text with `{alternative}`.

Truncation (Table 3): every sequence has at most `max_length` tokens; the alternative inside a
context is cut to its first `alpha_draft * max_length` tokens; each target keeps its start and is
cut to the shortest budget among the views it appears in, so all views share its tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from inspo_core.names import CONTEXT_FORMATS, PROMPT_FORMATS  # noqa: F401  (re-exported)
from inspo_core.strategies import View

DEFAULT_TEMPLATE = "\n[Another response to this request, for reflection]\n{alternative}\n[Your response]\n"
RESPONSES = ("chosen", "rejected")


@dataclass(frozen=True)
class BuilderConfig:
    context_format: str = "sep"
    max_length: int = 1024
    alpha_draft: float | None = 0.4  # None: the alternative is not capped
    sep_token: str | None = None
    template: str = DEFAULT_TEMPLATE
    exclude_eos: bool = False  # Appendix C.1: drop the final EOS (end of turn) of each target from its log-prob
    prompt_format: str = "auto"  # see PROMPT_FORMATS

    @classmethod
    def from_mapping(cls, conf: dict, **overrides) -> "BuilderConfig":
        """The builder settings found in a config mapping (a TrainConfig as a dict, a run's
        config.yaml); other keys are ignored, absent ones take the defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in conf.items() if k in names and not (k == "template" and v is None)}  # None: default
        return cls(**{**kw, **overrides})

    def __post_init__(self):
        problems = []
        if self.prompt_format not in PROMPT_FORMATS:
            problems.append(f"prompt_format={self.prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")
        if self.context_format not in CONTEXT_FORMATS:
            problems.append(f"context_format={self.context_format!r}; valid: {', '.join(CONTEXT_FORMATS)}")
        if self.max_length < 2:
            problems.append(f"max_length={self.max_length} must be at least 2")
        if self.alpha_draft is not None and not 0 < self.alpha_draft <= 1:
            problems.append(f"alpha_draft={self.alpha_draft} must be in (0, 1], or None for no cap")
        if self.template.count("{alternative}") != 1:
            problems.append("template must contain '{alternative}' exactly once")
        if problems:
            raise ValueError("invalid builder settings: " + "; ".join(problems))


@dataclass
class Encoded:
    """One example tokenised, before truncation."""

    index: int
    prompt_ids: list[int]
    target_ids: dict[str, list[int]]  # the response as scored (ends with EOS / end of turn)
    content_ids: dict[str, list[int]]  # the response text alone, used inside contexts
    eos_tail: dict[str, int]  # trailing tokens from the final EOS on (EOS + the template's "\n"), 0 if none
    label: str = ""  # how errors name the example: its data file line when known


@dataclass
class BuiltPair:
    """One example laid out for a set of views, after truncation."""

    index: int
    prompt_ids: list[int]
    targets: dict[str, list[int]]
    contexts: dict[str, list[int]]  # alternative name -> its rendered context tokens
    loss_lengths: dict[str, int]  # scored tokens per target (EOS dropped when exclude_eos)
    flags: set[str] = field(default_factory=set)

    def sequence(self, view: View) -> tuple[list[int], int]:
        """(token ids, index of the first target token) of `view`."""
        ctx = self.contexts[view.context] if view.context else []
        ids = self.prompt_ids + ctx + self.targets[view.target]
        return ids, len(ids) - len(self.targets[view.target])


@dataclass
class TruncationReport:
    examples: int = 0
    counts: Counter = field(default_factory=Counter)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def add(self, pair: BuiltPair) -> None:
        self.examples += 1
        self.counts.update(pair.flags)

    def summary(self) -> str:
        parts = [f"{self.examples} examples built"]
        parts += [f"{n} {k.replace('_', ' ')}" for k, n in sorted(self.counts.items())]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (first: #{self.skipped[0][0]}: {self.skipped[0][1]})")
        return "; ".join(parts)


def _message_content(value: Any, label: str, name: str) -> str:
    """The assistant text of a response field given as a string or a one-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        msg = value[0]
        if msg.get("role", "assistant") != "assistant" or not isinstance(msg.get("content"), str):
            raise ValueError(
                f"{label}: field {name!r} must be one assistant message with string content, "
                f"got role={msg.get('role')!r}"
            )
        return msg["content"]
    raise ValueError(
        f"{label}: field {name!r} must be a string or a single assistant message; got "
        f"{type(value).__name__}. Whole conversations (UltraFeedback style) are split by "
        "inspo_core.data.normalize_row first."
    )


class ConditioningBuilder:
    """Tokenises preference examples and lays them out for `views` (see module docstring).

    Examples are dicts with `prompt` (a string, or a list of chat messages) and `chosen` /
    `rejected` (strings, or one assistant message each).
    """

    def __init__(self, tokenizer, config: BuilderConfig, views: Iterable[View]):
        self.tok = tokenizer
        self.cfg = config
        self.views = sorted(set(views))
        if not self.views:
            raise ValueError("the builder needs at least one view")
        self.eos_id = tokenizer.eos_token_id
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if config.prompt_format == "chat" and not has_template:
            raise ValueError("prompt_format='chat' needs a tokenizer with a chat template; set `chat_template` or use "
                             "prompt_format 'plain'")
        self.chat_prompts = config.prompt_format == "chat" or (config.prompt_format == "auto" and has_template)
        self.sep_id = self._resolve_sep() if config.context_format == "sep" else None
        pre, post = config.template.split("{alternative}")
        self.template_ids = (self._ids(pre), self._ids(post))

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _resolve_sep(self) -> int:
        sep = self.cfg.sep_token or self.tok.sep_token or self.tok.eos_token
        if sep is None:
            raise ValueError("context_format='sep' needs a separator: set sep_token, or use 'template'")
        ids = self._ids(sep) if sep not in self.tok.get_vocab() else [self.tok.convert_tokens_to_ids(sep)]
        if len(ids) != 1:
            raise ValueError(
                f"sep_token {sep!r} is not a single token of this tokenizer; add it as a special "
                "token (and resize the model's embeddings) or use context_format='template'"
            )
        return ids[0]

    # ---- tokenisation -------------------------------------------------------------------------
    def encode(self, example: dict, index: int = 0) -> Encoded:
        label = str(example.get("_source") or f"example {index}")
        for name in ("prompt", *RESPONSES):
            if name not in example or example[name] is None:
                raise ValueError(f"{label}: missing field {name!r}")
        prompt = example["prompt"]
        texts = {r: _message_content(example[r], label, r) for r in RESPONSES}
        for r, text in texts.items():
            if not text.strip():
                raise ValueError(f"{label}: field {r!r} is empty; fix or drop the row")
        if isinstance(prompt, str) and self.chat_prompts:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list):
            prompt_ids, targets = self._encode_chat(prompt, texts, label)
        elif isinstance(prompt, str):
            prompt_ids = self.tok(prompt, add_special_tokens=True)["input_ids"]
            eos = [self.eos_id] if self.eos_id is not None else []
            targets = {r: self._ids(t) + eos for r, t in texts.items()}
        else:
            raise ValueError(
                f"{label}: field 'prompt' must be a string or a list of chat messages, "
                f"got {type(prompt).__name__}"
            )
        if not prompt_ids:
            raise ValueError(f"{label}: field 'prompt' tokenises to nothing")
        content = {r: self._ids(t) for r, t in texts.items()}
        ends = {r: self._eos_tail(targets[r]) for r in RESPONSES}
        return Encoded(index, prompt_ids, targets, content, ends, label)

    def _encode_chat(self, messages: list, texts: dict[str, str], label: str):
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(
                f"{label}: conversational data needs a chat template, and this tokenizer "
                "has none; set tokenizer.chat_template (or the `chat_template` config key) or give "
                "the prompt as a plain string"
            )
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError(f"{label}: field 'prompt' must be a list of {{role, content}} messages")
        prompt_text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = self._ids(prompt_text)
        targets = {}
        for r, text in texts.items():
            full = self.tok.apply_chat_template(
                messages + [{"role": "assistant", "content": text}], tokenize=False
            )
            if not full.startswith(prompt_text):
                raise ValueError(
                    f"{label}: the chat template renders the prompt differently once an "
                    "assistant reply follows, so the reply's tokens cannot be isolated; use a "
                    "template whose generation prompt is a prefix of the rendered conversation"
                )
            targets[r] = self._ids(full[len(prompt_text):])
        return prompt_ids, targets

    def _eos_tail(self, target: list[int]) -> int:
        """How many final tokens are the end of the response: its EOS (end-of-turn) token and, in a chat
        template, the whitespace the template writes after it. 0 when the target has no final EOS."""
        if self.eos_id is None or self.eos_id not in target:
            return 0
        last = len(target) - 1 - target[::-1].index(self.eos_id)
        after = target[last + 1 :]
        return len(target) - last if not after or not self.tok.decode(after).strip() else 0

    # ---- layout and truncation ----------------------------------------------------------------
    def _render(self, enc: Encoded, alt: str, keep: int) -> list[int]:
        """Context tokens for alternative `alt`, its content cut to `keep` tokens."""
        fmt = self.cfg.context_format
        if fmt == "raw":
            return enc.target_ids[alt][:keep]
        body = enc.content_ids[alt][:keep]
        if fmt == "sep":
            return [self.sep_id] + body + [self.sep_id]
        pre, post = self.template_ids
        return pre + body + post

    def _alt_len(self, enc: Encoded, alt: str) -> int:
        return len(enc.target_ids[alt] if self.cfg.context_format == "raw" else enc.content_ids[alt])

    def layout(self, enc: Encoded) -> BuiltPair:
        L, P = self.cfg.max_length, len(enc.prompt_ids)
        flags: set[str] = set()
        if P + 1 > L:
            raise ValueError(
                f"{enc.label}: the prompt has {P} tokens, leaving no room for a response "
                f"within max_length={L}; raise max_length or drop long prompts (length filter)"
            )
        cap = math.floor(self.cfg.alpha_draft * L) if self.cfg.alpha_draft else None
        contexts: dict[str, list[int]] = {}
        for alt in sorted({v.context for v in self.views if v.context}):
            n = self._alt_len(enc, alt)
            keep = n if cap is None else min(n, cap)
            if keep < n:
                flags.add("context_capped")
            overhead = len(self._render(enc, alt, 0))
            room = L - P - overhead - 1  # the target keeps at least one token
            if room < 0:
                raise ValueError(
                    f"{enc.label}: prompt ({P} tokens) plus the context rendering "
                    f"({overhead} tokens) leave no room for the target within max_length={L}; "
                    "raise max_length or use a shorter context_format"
                )
            if keep > room:
                keep = room
                flags.add("context_cut_to_fit")
            contexts[alt] = self._render(enc, alt, keep)
        targets, loss_lengths = {}, {}
        for r in sorted({v.target for v in self.views}):
            budget = min(L - P - (len(contexts[v.context]) if v.context else 0)
                         for v in self.views if v.target == r)
            full = enc.target_ids[r]
            targets[r] = full[:budget]
            truncated = len(targets[r]) < len(full)
            if truncated:
                flags.add(f"{r}_truncated")
            tail = enc.eos_tail[r]
            drop = tail if self.cfg.exclude_eos and tail and not truncated and len(full) > tail else 0
            loss_lengths[r] = len(targets[r]) - drop
        return BuiltPair(enc.index, enc.prompt_ids, targets, contexts, loss_lengths, flags)

    def generation_ids(self, prompt, alternative: str | None = None) -> list[int]:
        """Token ids to generate from: the prompt alone (deployment), or followed by the rendered
        alternative, so the model answers as pi(. | x, y_alt) would."""
        dummy = "placeholder"
        enc = self.encode({"prompt": prompt, "chosen": alternative or dummy, "rejected": dummy})
        if alternative is None:
            return list(enc.prompt_ids)
        return enc.prompt_ids + self._render(enc, "chosen", self._alt_len(enc, "chosen"))

    def build(self, example: dict, index: int = 0) -> BuiltPair:
        return self.layout(self.encode(example, index))

    def build_all(self, examples: Iterable[dict], skip_bad: bool = False) -> tuple[list[BuiltPair], TruncationReport]:
        """Build every example. A bad one raises, or with `skip_bad` is skipped and recorded."""
        report, out = TruncationReport(), []
        for i, ex in enumerate(examples):
            try:
                pair = self.build(ex, i)
            except ValueError as err:
                if not skip_bad:
                    raise
                report.skipped.append((i, str(err)))
                continue
            report.add(pair)
            out.append(pair)
        return out, report


@dataclass
class ViewBatch:
    """Padded rows for (view, pair), view-major: row = view_index * B + pair_index.

    input_ids, attention_mask, target_mask: [R, T], R = len(views) * B. `target_mask` marks the
    scored target tokens; the attention mask comes from lengths, never from the pad id.
    """

    views: list[View]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    lengths: dict[str, torch.Tensor]  # "chosen"/"rejected" -> [B] scored token counts

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // len(self.views)

    def split(self, per_row: torch.Tensor) -> dict[View, torch.Tensor]:
        """[R] -> {view: [B]}."""
        return dict(zip(self.views, per_row.view(len(self.views), -1).unbind(0)))


def collate_views(pairs: list[BuiltPair], views: Iterable[View], pad_id: int = 0) -> ViewBatch:
    views = sorted(set(views))
    rows = [(pair.sequence(v), pair.loss_lengths[v.target]) for v in views for pair in pairs]
    T = max(len(ids) for (ids, _), _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    target_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, ((ids, start), n_scored) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        target_mask[i, start : start + n_scored] = True
    lengths = {
        r: torch.tensor([p.loss_lengths[r] for p in pairs], dtype=torch.long)
        for r in RESPONSES if all(r in p.loss_lengths for p in pairs)
    }
    return ViewBatch(views, input_ids, attention_mask, target_mask, lengths)
