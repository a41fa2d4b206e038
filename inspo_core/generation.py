"""Generation from checkpoints for interactive use: a small model cache and token streaming."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.strategies import View
from inspo_core.threads import governor


def sampling_kwargs(tok, *, temperature: float, top_p: float, max_new_tokens: int, n: int = 1) -> dict:
    """`generate` arguments for nucleus sampling (temperature 0: greedy), pad and EOS from `tok`."""
    sample = temperature > 0
    return dict(do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                top_k=0 if sample else None, max_new_tokens=max_new_tokens, num_return_sequences=n,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


@torch.no_grad()
def sample_from_ids(model, tok, ids: list[int], *, seed: int, **sampling) -> list[str]:
    """Completions of one token sequence (no padding needed), decoded and stripped."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    torch.manual_seed(seed)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **sampling_kwargs(tok, **sampling))
    return [tok.decode(g[x.shape[1]:], skip_special_tokens=True).strip() for g in out]


def sample_responses(model, tok, prompt: str, n: int, *, temperature: float = 1.0, top_p: float = 1.0,
                     max_new_tokens: int = 16, seed: int = 0) -> list[str]:
    """n sampled completions of one prompt (a single batch, no padding needed), the prompt rendered
    as the conditioning builder renders it in training."""
    ids = ConditioningBuilder(tok, BuilderConfig(), [View("chosen")]).generation_ids(prompt)
    return sample_from_ids(model, tok, ids, seed=seed, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, n=n)


def context_length(model) -> int:
    """Tokens the model can attend to (its position table), 2048 when the config does not say."""
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def rendering_of(model_dir: str | Path, model) -> BuilderConfig:
    """How prompts (and alternatives) were laid out when `model_dir` was trained: the builder settings
    of its run's config when it belongs to a run, else the defaults (string prompts in the chat
    template when the tokenizer has one). `max_length` is the model's context length."""
    from inspo_core.rundir import RunDir

    run = RunDir.of_model(model_dir)
    return BuilderConfig.from_mapping(run.read_config() if run else {}, max_length=context_length(model))


def prompt_ids(builder: ConditioningBuilder, prompt, max_new_tokens: int, alternative: str | None = None) -> list[int]:
    """Token ids to generate from; ValueError when the prompt and the answer cannot fit the model's
    context (the builder's max_length)."""
    ids = builder.generation_ids(prompt, alternative)
    limit = builder.cfg.max_length
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens it exceeds the model's "
                         f"context of {limit} tokens: shorten it or lower max_new_tokens")
    return ids


@torch.no_grad()
def sample_batch(model, tok, prompts_ids: list[list[int]], *, n: int, seed: int, batch_prompts: int = 8,
                 **sampling) -> list[list[str]]:
    """n completions of each of several token sequences, several prompts per `generate` call (left
    padding with an attention mask; positions follow the mask). [len(prompts_ids)][n] stripped texts."""
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[list[str]] = []
    for s in range(0, len(prompts_ids), batch_prompts):
        chunk = prompts_ids[s : s + batch_prompts]
        L = max(map(len, chunk))
        ids = torch.tensor([[pad] * (L - len(c)) + c for c in chunk], device=dev)
        mask = torch.tensor([[0] * (L - len(c)) + [1] * len(c) for c in chunk], device=dev)
        torch.manual_seed(seed * 7_919 + s)
        gen = model.generate(input_ids=ids, attention_mask=mask, **sampling_kwargs(tok, n=n, **sampling))
        texts = [tok.decode(g[L:], skip_special_tokens=True).strip() for g in gen]
        out += [texts[i * n : (i + 1) * n] for i in range(len(chunk))]
    return out


class ModelCache:
    """Keeps the last `size` (model, tokenizer, builder) triples loaded; thread-safe. An entry is keyed
    by the directory and its model fingerprint (config and weight content), so a checkpoint retrained
    in place is loaded again, never served with its old weights."""

    def __init__(self, size: int = 4, trust_remote_code: bool = False):
        self.size, self.trust = size, trust_remote_code
        self._items: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._fingerprints: dict[str, tuple[tuple, str]] = {}  # path -> (files' stat signature, fingerprint)
        self._lock = threading.Lock()

    def get(self, path: str | Path):
        return self.get_with_fingerprint(path)[0]

    def fingerprint(self, path: str | Path) -> str:
        """`model_fingerprint` of the directory, hashed again only when a file's stat signature (size,
        mtime, ctime, inode) changed since the last call."""
        from inspo_core.fingerprint import model_fingerprint

        key = str(Path(path).resolve())
        sig = _stat_signature(Path(key))
        with self._lock:
            known = self._fingerprints.get(key)
        if known is not None and known[0] == sig:
            return known[1]
        fp = model_fingerprint(key)
        with self._lock:
            self._fingerprints[key] = (sig, fp)
        return fp

    def get_with_fingerprint(self, path: str | Path) -> tuple[tuple, str]:
        """((model, tokenizer, builder), the fingerprint of the weights that were loaded)."""
        from inspo_core.models import is_model_dir, load_model, load_tokenizer

        key = str(Path(path).resolve())
        if not is_model_dir(key):
            raise ValueError(f"{path}: not a model directory (no config.json or LoRA adapter_config.json)")
        for _ in range(3):  # a checkpoint rewritten while it loads is loaded again
            fp = self.fingerprint(key)
            with self._lock:
                if (key, fp) in self._items:
                    self._items.move_to_end((key, fp))
                    return self._items[key, fp], fp
            tok = load_tokenizer(key, trust_remote_code=self.trust)
            model = load_model(key, dtype=torch.float32, trust_remote_code=self.trust).eval()
            builder = ConditioningBuilder(tok, rendering_of(key, model), [View("chosen")])
            if self.fingerprint(key) == fp:
                break
        with self._lock:
            for old in [k for k in self._items if k[0] == key]:  # the same directory's earlier weights
                del self._items[old]
            self._items[key, fp] = (model, tok, builder)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return (model, tok, builder), fp


def _stat_signature(d: Path) -> tuple:
    from inspo_core.fingerprint import WEIGHT_PATTERNS

    files = sorted({d / "config.json", d / "adapter_config.json", *(f for pat in WEIGHT_PATTERNS for f in d.glob(pat))})
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)


class _SampleWithGenerator:
    """A logits processor that draws the next token itself, from the temperature/top-p warped
    distribution, with its own `torch.Generator`, and leaves only that token: `generate` then runs
    greedy and takes it. (generate's own sampling draws from the process-wide RNG, which every other
    thread seeds and consumes too, so a seed would not reproduce an answer.)"""

    def __init__(self, *, temperature: float, top_p: float, generator: torch.Generator):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
        self.generator = generator

    def __call__(self, input_ids, scores):
        for w in self.warpers:
            scores = w(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picked = torch.multinomial(probs, 1, generator=self.generator)  # [B, 1]
        return torch.full_like(scores, float("-inf")).scatter_(1, picked, 0.0)


def stream_generate(model, tok, builder, prompt, *, temperature: float = 0.7, top_p: float = 0.95,
                    max_new_tokens: int = 128, seed: int = 0, stop: threading.Event | None = None) -> Iterator[str]:
    """Yields the growing response text, generated from the prompt alone (deployment). Sampling uses
    a generator of its own seeded with `seed`: the same seed gives the same answer whatever other
    threads do with the process-wide RNG."""
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return bool(stop is not None and stop.is_set())

    dev = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(builder, prompt, max_new_tokens)], device=dev)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=120)
    processors = LogitsProcessorList()
    if temperature > 0:
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        processors.append(_SampleWithGenerator(temperature=temperature, top_p=top_p, generator=gen))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([_Stop()]), logits_processor=processors,
                  **sampling_kwargs(tok, temperature=0.0, top_p=top_p, max_new_tokens=max_new_tokens))
    errors: list[BaseException] = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as e:  # surfaced to the caller below
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if errors:
        raise errors[0]


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, V] raw logits -> (weights [B, k], token ids [B, k]): the temperature/top-p distribution as
    transformers' TemperatureLogitsWarper + TopPLogitsWarper define it (a token is kept when the mass of
    the tokens above it is below top_p; the top token always), unnormalised, over k candidates.

    Only the `candidates` most likely tokens are ranked (a top-k, far cheaper than sorting the whole
    vocabulary); a row whose candidates hold less than top_p of the mass is ranked in full, so the
    result is exact either way. With top_p >= 1 nothing is cut and every token is a candidate."""
    lp = (logits.float() / temperature).log_softmax(-1)
    B, V = lp.shape
    if top_p >= 1.0:
        return lp.exp(), torch.arange(V, device=lp.device).expand(B, V)
    k = min(candidates, V)
    top, idx = lp.topk(k, dim=-1)  # descending
    p = top.exp()
    short = p.sum(-1) < top_p
    if bool(short.any()):  # the nucleus reaches past the candidates: rank these rows in full
        full_top, full_idx = lp[short].sort(-1, descending=True)
        pad = V - k
        p = torch.cat([p, p.new_zeros(B, pad)], 1)
        idx = torch.cat([idx, idx.new_zeros(B, pad)], 1)
        p[short], idx[short] = full_top.exp(), full_idx
    above = p.cumsum(-1) - p
    return p * (above < top_p), idx


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """[B, V]: the normalised distribution `NucleusSampler` draws from (for tests and inspection)."""
    w, idx = _nucleus(logits, temperature, top_p, candidates)
    out = torch.zeros_like(logits, dtype=torch.float32).scatter_add_(1, idx, w)
    return out / out.sum(-1, keepdim=True)


class NucleusSampler:
    """A logits processor that draws the next token itself from the temperature/top-p distribution
    (`_nucleus`: exact, ranking only the top candidates) by inverse-CDF sampling with its own
    `torch.Generator`, and leaves only that token, so `generate` run greedy takes it. On SmolLM2's
    49k vocabulary this replaces a full sort and an exponential draw over [B, V] per step (37% of a
    sampling call, profiled) with a top-k and a cumulative sum over the candidates."""

    def __init__(self, *, temperature: float, top_p: float, generator: torch.Generator | None = None,
                 generators: list[torch.Generator] | None = None, candidates: int = 1024):
        """One `generator` for the whole batch, or `generators`, one per row: then a row's draws depend on its
        own seed alone, not on which rows share its batch."""
        assert temperature > 0 and (generator is None) != (generators is None)
        self.temperature, self.top_p, self.candidates = temperature, top_p, candidates
        self.generator, self.generators = generator, generators

    def __call__(self, input_ids, scores):
        w, idx = _nucleus(scores, self.temperature, self.top_p, self.candidates)
        c = w.cumsum(-1)
        if self.generators is None:
            u = torch.rand(w.shape[0], 1, generator=self.generator, device=w.device, dtype=c.dtype)
        else:
            assert len(self.generators) == w.shape[0], (len(self.generators), w.shape)
            u = torch.cat([torch.rand(1, 1, generator=g, device=w.device, dtype=c.dtype) for g in self.generators])
        j = torch.searchsorted(c, u * c[:, -1:]).clamp_(max=w.shape[1] - 1)
        picked = idx.gather(1, j)
        return torch.full_like(scores, float("-inf")).scatter_(1, picked, 0.0)


class Sampled(NamedTuple):
    """One sampled answer: its text, the generated token ids (through the end token when the answer
    ended by itself, so that the sequence's probability includes stopping) and whether it ended."""

    text: str
    ids: list[int]
    ended: bool
    logp: float | None = None  # log pi(ids | row) from the model's raw logits while sampling, when asked for


def end_ids(model, tok) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS, the one `sampling_kwargs` hands to generate."""
    return {tok.eos_token_id} if tok.eos_token_id is not None else set()


def answer_seed(seed: int, row: int, sample: int) -> int:
    """The seed of answer `sample` to row `row` of a `sample_sequences` call with `seed`."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed) % 2**63, row, sample]).generate_state(1, np.uint64)[0] % 2**63)


def _own_sampling(tok, *, seeds: list[int], device, temperature: float, top_p: float, max_new_tokens: int) -> dict:
    """`generate` arguments that sample with `NucleusSampler`, row b of the batch from a generator seeded
    with seeds[b] (temperature 0: greedy)."""
    from transformers import LogitsProcessorList

    kw = sampling_kwargs(tok, temperature=0.0, top_p=top_p, max_new_tokens=max_new_tokens)
    if temperature > 0:
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        kw["logits_processor"] = LogitsProcessorList([NucleusSampler(temperature=temperature, top_p=top_p,
                                                                     generators=gens)])
    return kw


def _shared_prefix(model, ids: torch.Tensor, mask: torch.Tensor, n: int):
    """The key/value cache of every column of `ids` [B, L] (left padded, `mask`) but the last, computed
    once per row and repeated n times along the batch ([B * n] rows, in `repeat_interleave` order), for
    `generate` to continue from: it then runs only the last prompt token and the answer. Positions
    follow the mask as `generate` sets them (first real token at 0). None (generate reads the prompt
    itself) when there is nothing to share: n = 1, a one-token column, or a model without a cache."""
    from transformers import DynamicCache

    if n <= 1 or ids.shape[1] < 2 or not getattr(model.config, "use_cache", True):
        return None
    head, head_mask = ids[:, :-1], mask[:, :-1]
    positions = (head_mask.cumsum(-1) - 1).masked_fill_(head_mask == 0, 1)
    cache = DynamicCache(config=model.config)
    kw = dict(input_ids=head, attention_mask=head_mask, position_ids=positions, cache=cache, use_cache=True)
    try:
        model(**kw, logits_to_keep=1)  # the head at one position: its logits are not used
    except TypeError:  # a model whose forward takes no logits_to_keep
        cache = kw["cache"] = DynamicCache(config=model.config)
        model(**kw)
    cache.batch_repeat_interleave(n)
    return cache


@torch.no_grad()
def sample_sequences(model, tok, rows: list[list[int]], *, n: int, seed: int, batch_size: int = 96, progress=None,
                     score: bool = False, **sampling) -> list[list[Sampled]]:
    """n answers to each of several token sequences, as texts and token ids: [len(rows)][n] Sampled.

    Rows are generated several at a time (about `batch_size` sequences per `generate` call, left padded
    with an attention mask), longest first so that each call pads little; the results come back in the
    order of `rows`. `progress(done, total)` is called after each call. Tokens are drawn by
    `NucleusSampler`, answer j to row i from a generator of its own seeded by `answer_seed(seed, i, j)`: the
    same call gives the same answers whatever `batch_size` is (up to float rounding: a batch's padding can
    move a logit in its last bits) and whatever else uses the process-wide RNG. With `score`, each answer
    carries log pi(ids | row) summed from the model's raw (unwarped) logits at every sampled step, the
    end token included: the log-prob a separate scoring pass would give, without that pass."""
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ends = end_ids(model, tok)
    per_call = max(1, batch_size // max(n, 1))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[list[Sampled] | None] = [None] * len(rows)
    threads = governor() if dev.type == "cpu" else None
    for s in range(0, len(order), per_call):
        if threads is not None:
            threads.tick()
        chunk = [rows[i] for i in order[s : s + per_call]]
        L = max(map(len, chunk))
        ids = torch.tensor([[pad] * (L - len(r)) + r for r in chunk], device=dev)
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in chunk], device=dev)
        # each row repeated n times (greedy generate takes no num_return_sequences; the sampler draws),
        # its prompt read once: the cache of all but its last token is computed per row, then repeated
        res = model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                             cache=_shared_prefix(model, ids, mask, n),
                             return_dict_in_generate=True, output_logits=score,
                             **_own_sampling(tok, seeds=[answer_seed(seed, i, j) for i in order[s : s + per_call]
                                                         for j in range(n)], device=dev, **sampling))
        gen = res.sequences.tolist()
        if score:  # [B, steps] log-softmax of the raw logits at each sampled token
            new_ids = res.sequences[:, L:]
            step_logps = torch.stack([lg.float().log_softmax(-1).gather(-1, new_ids[:, t : t + 1]).squeeze(-1)
                                      for t, lg in enumerate(res.logits)], 1).double().tolist()
        for j, i in enumerate(order[s : s + per_call]):
            got = []
            for b in range(j * n, (j + 1) * n):
                new = gen[b][L:]
                stop = next((k for k, t in enumerate(new) if t in ends), None)
                kept = new if stop is None else new[: stop + 1]
                text = tok.decode(kept if stop is None else kept[:-1], skip_special_tokens=True).strip()
                got.append(Sampled(text, kept, stop is not None, sum(step_logps[b][: len(kept)]) if score else None))
            out[i] = got
        if progress is not None:
            progress(min(s + per_call, len(rows)) * n, len(rows) * n)
    return out  # type: ignore[return-value]


@torch.no_grad()
def answer_logps(model, rows: list[list[int]], answers: list[list[int]], batch_size: int = 16) -> list[float]:
    """log pi(answer | row) summed over the answer's token ids (scored as sampled, not re-tokenised; an
    end token at the end is part of the answer and is scored). [len(rows)] floats; an answer of no
    tokens scores 0."""
    from inspo_core.logps import sequence_logps

    assert len(rows) == len(answers)
    dev = next(model.parameters()).device
    out = [0.0] * len(rows)
    todo = [i for i in range(len(rows)) if answers[i]]
    for s in range(0, len(todo), batch_size):
        idx = todo[s : s + batch_size]
        seqs = [rows[i] + answers[i] for i in idx]
        T = max(map(len, seqs))
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        target = torch.zeros(len(idx), T, dtype=torch.bool)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[r])] = torch.tensor(seqs[r])
            mask[r, : len(seqs[r])] = 1
            target[r, len(rows[i]) : len(seqs[r])] = True
        got = sequence_logps(model, ids.to(dev), mask.to(dev), target.to(dev)).sum.double().cpu().tolist()
        for r, i in enumerate(idx):
            out[i] = got[r]
    return out
