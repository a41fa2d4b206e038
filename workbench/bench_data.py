"""The benchmark's data: fixed-length pairs laid out directly, or realistic-length rows of words that
our conditioning builder and TRL tokenise to the same ids; and the model FLOPs of a layout."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from inspo_core.conditioning import BuilderConfig, BuiltPair, ConditioningBuilder
from inspo_core.strategies import resolve_method


def synthetic_pairs(cfg, vocab: int) -> list[BuiltPair]:
    """Fixed lengths: random tokens laid out directly (every pair the same shape)."""
    g = torch.Generator().manual_seed(cfg.seed)
    rand = lambda n: torch.randint(5, vocab, (n,), generator=g).tolist()  # noqa: E731
    sep, eos = 3, 2
    pairs = []
    for i in range(cfg.batch_size):
        prompt = [1] + rand(cfg.prompt_len - 1)
        targets = {r: rand(cfg.response_len - 1) + [eos] for r in ("chosen", "rejected")}
        if cfg.context_format == "raw":
            contexts = {r: list(t) for r, t in targets.items()}
        else:
            contexts = {r: [sep] + t[:-1] + [sep] for r, t in targets.items()}
        pairs.append(BuiltPair(i, prompt, targets, contexts, {r: len(t) for r, t in targets.items()}))
    return pairs


SPECIALS = ("<pad>", "<s>", "</s>", "<sep>", "<unk>")  # ids 0-4, as in synthetic_pairs


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose word `w<i>` is token i: text written from token ids tokenises back
    to exactly those ids, in our builder and in TRL alike."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {t: i for i, t in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), vocab)}
    tk = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   sep_token="<sep>", unk_token="<unk>")


def realistic_rows(cfg, vocab: int) -> list[dict]:
    """Preference rows of words: prompts 16-256, responses 20-400 tokens, log-uniform and independent."""
    import numpy as np

    g = np.random.default_rng(cfg.seed)
    length = lambda lo, hi: int(round(math.exp(g.uniform(math.log(lo), math.log(hi)))))  # noqa: E731
    words = lambda n: " ".join(f"w{i}" for i in g.integers(len(SPECIALS), vocab, n))  # noqa: E731
    return [{"prompt": words(length(16, 256)), "chosen": words(length(20, 400)),
             "rejected": words(length(20, 400))} for _ in range(cfg.batch_size * cfg.n_batches)]


def realistic_batches(cfg, rows: list[dict], tok, views) -> list[list[BuiltPair]]:
    """The rows built for `views` as the trainer would (truncation, the alternative capped at 0.4 of
    max_length), cut into batches of batch_size pairs."""
    builder = ConditioningBuilder(tok, BuilderConfig(context_format=cfg.context_format, max_length=cfg.max_length),
                                  views)
    pairs, _ = builder.build_all(rows)
    return [pairs[i: i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size)]


class Matmuls(NamedTuple):
    """Matmul weights (2 FLOPs per token each in the forward) of the decoder body and of the LM head, and how
    many of each are frozen (LoRA's base weights): a frozen weight's backward computes the gradient of its
    input only (2 FLOPs per token), a trained one's of its input and itself (4)."""

    body: int
    head: int
    body_frozen: int = 0
    head_frozen: int = 0
    no_input_grad: int = 0  # weights whose input carries no gradient: no backward to it (LoRA's first layer)


def matmul_params(model) -> Matmuls:
    """The model's `Matmuls`. Embedding lookups and norm weights are no matmuls (and biases are additions);
    under LoRA the adapters' A and B are matmuls of their own (trained) beside the frozen base weight."""
    from torch import nn

    decoder = model.get_decoder()
    linears = [m.weight for m in decoder.modules() if isinstance(m, nn.Linear)]
    head = model.get_output_embeddings().weight
    first = []  # with the embedding frozen, the first layer's q, k, v (and LoRA's A there) read an input without a gradient
    if not model.get_input_embeddings().weight.requires_grad:
        first = [m.weight for name, m in decoder.layers[0].self_attn.named_modules()
                 if isinstance(m, nn.Linear) and name.split(".")[0] in ("q_proj", "k_proj", "v_proj")
                 and "lora_B" not in name]
    return Matmuls(sum(w.numel() for w in linears), head.numel(),
                   sum(w.numel() for w in linears if not w.requires_grad), 0 if head.requires_grad else head.numel(),
                   sum(w.numel() for w in first))


def model_flops(pairs: list[BuiltPair], views, matmul: Matmuls, layers: int, hidden: int, train: bool) -> float:
    """Model FLOPs of scoring `views` of `pairs`, each view's sequence on its own and without padding
    (what the work is, however it is laid out). Forward: 2 per body matmul weight per token, 2 per LM
    head weight per *scored* token (scoring needs the logits there only, and the scorer computes no
    others: `inspo_core.logps`), and causal attention, 2 n^2 hidden per layer (the lower triangle of
    QK^T and AV, each 2 n^2 hidden in full). The backward: attention 2x its forward, a trained weight 4 per
    token, a frozen one 2 (its input's gradient only), 2 fewer where the input needs no gradient (under LoRA
    the first layer's q, k, v read the frozen embedding's output). `matmul` is `matmul_params(model)`.
    tests/test_bench.py checks it against torch's FlopCounterMode, full fine-tuning and LoRA."""
    m = matmul if isinstance(matmul, Matmuls) else Matmuls(*matmul)
    body_mult = (3 * (m.body - m.body_frozen) + 2 * m.body_frozen - m.no_input_grad) if train else m.body
    head_mult = (3 * (m.head - m.head_frozen) + 2 * m.head_frozen) if train else m.head
    total = 0.0
    for p in pairs:
        for v in views:
            n = len(p.sequence(v)[0])
            total += (2 * body_mult * n + 2 * head_mult * p.loss_lengths[v.target]
                      + 2 * layers * hidden * n * n * (3 if train else 1))
    return total


class Data:
    """The pairs every configuration trains on: per strategy, a list of batches."""

    def __init__(self, cfg, vocab: int):
        self.cfg = cfg
        if cfg.lengths == "realistic":
            self.tok = word_tokenizer(vocab)
            self.rows = realistic_rows(cfg, vocab)
        else:
            self.tok, self.rows = None, None
            self.fixed = synthetic_pairs(cfg, vocab)

    def batches(self, strategy: str) -> list[list[BuiltPair]]:
        if self.rows is None:
            return [self.fixed]
        m = resolve_method("dpo", strategy)
        return realistic_batches(self.cfg, self.rows, self.tok, set(m.policy_views) | set(m.ref_views))
