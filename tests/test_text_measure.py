"""The text worlds' measurement (inspo_core.worlds.sentiment_eval, inspo_core.generation): sampled
token ids, the sequence-level KL estimate against an exact enumeration, empty answers, and the
measured V against a slow per-pair recomputation. Tiny models on a four-word vocabulary: no download."""

import itertools
import math

import numpy as np
import pytest
import torch

EOS, A, B, PAD, X = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def word_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"<eos>": EOS, "a": A, "b": B, "<pad>": PAD, "x": X}, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")


def _model(seed: int):
    from inspo_core.models import tiny_llama

    m = tiny_llama(5, hidden_size=16, num_layers=1, num_heads=2, seed=seed).eval()
    with torch.no_grad():  # sharper than the default init, so the two models differ by a measurable KL
        m.lm_head.weight.mul_(12.0)
    return m


def _exact_logp(model, prefix: list[int], seq: list[int]) -> float:
    """log p(seq | prefix), one token at a time with a full forward each (the slow obvious way)."""
    total = 0.0
    for i, tok in enumerate(seq):
        with torch.no_grad():
            logits = model(torch.tensor([prefix + seq[:i]])).logits[0, -1]
        total += float(logits.double().log_softmax(-1)[tok])
    return total


def _outcomes(L: int):
    """Every answer of at most L new tokens: ending with EOS at step <= L, or L tokens without EOS.
    Generation's vocabulary: EOS, a, b, pad, x (all five can be sampled)."""
    out = []
    for n in range(L + 1):
        for body in itertools.product([A, B, PAD, X], repeat=n):
            if n < L:
                out.append(list(body) + [EOS])
            else:
                out.append(list(body))
    return out


def test_sampled_ids_and_sequence_kl_match_exact_enumeration(word_tok):
    """KL(p || q) of the answer distribution (at most 2 new tokens) by enumerating every outcome, against
    the estimator the measurement uses: sampled ids (end token kept when sampled), scored by answer_logps.
    Also: the sampler's outcome frequencies match p (chi-square-like bound), and `ended` says whether EOS
    was sampled."""
    from inspo_core.generation import answer_logps, sample_sequences

    p, q = _model(0), _model(1)
    prefix = [X]
    L = 2
    outs = _outcomes(L)
    lp = np.array([_exact_logp(p, prefix, o) for o in outs])
    lq = np.array([_exact_logp(q, prefix, o) for o in outs])
    assert math.isclose(np.exp(lp).sum(), 1.0, rel_tol=1e-9)
    kl = float((np.exp(lp) * (lp - lq)).sum())
    assert kl > 0.05
    n = 3000
    got = sample_sequences(p, word_tok, [prefix], n=n, seed=3, batch_size=500, temperature=1.0, top_p=1.0,
                           max_new_tokens=L)[0]
    assert all(s.ended == (s.ids[-1:] == [EOS]) for s in got)
    assert all(s.ended or len(s.ids) == L for s in got)
    index = {tuple(o): i for i, o in enumerate(outs)}
    freq = np.bincount([index[tuple(s.ids)] for s in got], minlength=len(outs)) / n
    assert np.abs(freq - np.exp(lp)).max() < 4 * math.sqrt(0.25 / n)
    ratio = np.array(answer_logps(p, [prefix] * n, [s.ids for s in got])) - np.array(
        answer_logps(q, [prefix] * n, [s.ids for s in got]))
    assert ratio.mean() == pytest.approx(kl, abs=4 * ratio.std() / math.sqrt(n))
    # each sampled answer's score is its exact log-prob
    for s in got[:5]:
        assert answer_logps(p, [prefix], [s.ids])[0] == pytest.approx(lp[index[tuple(s.ids)]], abs=1e-4)
    # log-probs taken while sampling (raw logits, several rows left padded together) are the same numbers
    scored = sample_sequences(p, word_tok, [prefix, [X, X, X]], n=50, seed=4, batch_size=100, temperature=1.0,
                              top_p=1.0, max_new_tokens=L, score=True)
    for row, pre in zip(scored, (prefix, [X, X, X])):
        want = answer_logps(p, [pre] * len(row), [s.ids for s in row])
        assert [s.logp for s in row] == pytest.approx(want, abs=1e-4)


def test_an_empty_answer_is_scored(word_tok):
    """An answer that is the end token alone has a log-prob (that of stopping at once); the text
    measurement used to turn "" into " ", which the builder refused, and the evaluation stopped."""
    from inspo_core.generation import answer_logps

    p = _model(0)
    got = answer_logps(p, [[X]], [[EOS]])[0]
    assert got == pytest.approx(_exact_logp(p, [X], [EOS]), abs=1e-5) and got < 0
    assert answer_logps(p, [[X]], [[]]) == [0.0]


class _WordWorld:
    """A text world on the four-word vocabulary: more a's than b's is better (Bradley-Terry)."""

    name = "words"
    prompts = ["x", "x x"]
    clusters = [0, 1]

    class cfg:
        max_new_tokens = 3

    @staticmethod
    def reward(text: str) -> float:
        return text.split().count("a") - text.split().count("b")

    def preference(self, prompt, a, b):
        return 1 / (1 + math.exp(-(self.reward(a) - self.reward(b))))


def test_measure_text_values_against_a_slow_recount(word_tok, tmp_path):
    """measure_text's V cells are the mean of P over every (answer, opponent) pair of a prompt; the
    reflective V pairs answer i with the opponent it saw, V_others with the rest; the KL of pi_ref
    against itself is 0 exactly (not estimated) and of another model is the mean log-ratio."""
    from inspo_core.conditioning import BuilderConfig
    from inspo_core.worlds import sentiment_eval as se

    world = _WordWorld()
    ref, pol = tmp_path / "ref", tmp_path / "pol"
    for seed, d in ((0, ref), (1, pol)):
        _model(seed).save_pretrained(d)
        word_tok.save_pretrained(d)
    opp = [["a a", "b", "", "a b"], ["b b", "a", "a", "b"]]
    m = se.TextMeasure(samples=3, kl_samples=5, batch_size=8, n_boot=200)
    builder = BuilderConfig(context_format="raw", prompt_format="plain", max_length=64)
    out = se.measure_text(world, pol, ref, opp, m, builder=builder, seed=0, log=lambda s: None)
    d, r = out["deployed"], out["reflective"]
    for x in range(2):
        want = np.mean([world.preference("", a, o) for a in d["answers"][x] for o in opp[x]])
        assert d["cells"]["V_identity"][x] == pytest.approx(want)
        want = np.mean([world.preference("", a, opp[x][i]) for i, a in enumerate(r["answers"][x])])
        assert r["cells"]["V_identity"][x] == pytest.approx(want)
        want = np.mean([world.preference("", a, opp[x][j]) for i, a in enumerate(r["answers"][x])
                        for j in range(4) if j != i])
        assert r["cells"]["V_others_identity"][x] == pytest.approx(want)
    assert d["V_identity"] == pytest.approx(np.mean(d["cells"]["V_identity"]))
    assert len(d["answers"][0]) == 3 and d["kl_samples"] == 5
    assert d["kl"] != 0.0 and np.isfinite(d["kl"])
    same = se.measure_text(world, ref, ref, opp, m, builder=builder, seed=0, log=lambda s: None, frontier_only=True)
    assert same["deployed"]["kl"] == 0.0 and "V_identity" not in same["deployed"]


@pytest.mark.parametrize("temperature,top_p,candidates", [(0.7, 0.95, 1024), (1.0, 1.0, 1024), (0.5, 0.9, 3),
                                                          (1.3, 0.6, 2)])
def test_nucleus_distribution_is_transformers_top_p(temperature, top_p, candidates):
    """The sampler's distribution equals softmax of transformers' own temperature and top-p warpers, also
    when the nucleus reaches past the ranked candidates (candidates 2-3 of 50: the full-sort fallback)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from inspo_core.generation import nucleus_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    torch.testing.assert_close(nucleus_probs(logits, temperature, top_p, candidates), want.softmax(-1),
                               atol=1e-6, rtol=1e-5)


def test_nucleus_sampler_draws_from_that_distribution():
    """Frequencies of 20000 draws per row match the distribution (4 binomial sd), and a seed reproduces
    the draws whatever the process-wide RNG does."""
    from inspo_core.generation import NucleusSampler, nucleus_probs

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0], [0.0, 0.0, 0.1, 0.2, -5.0]])
    n = 20000
    rows = logits.repeat_interleave(n, 0)
    out = NucleusSampler(temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))(None, rows.clone())
    picked = out.argmax(-1).view(2, n)
    assert torch.isinf(out).sum(-1).eq(4).all()
    want = nucleus_probs(logits, 0.8, 0.9)
    for r in range(2):
        freq = torch.bincount(picked[r], minlength=5).float() / n
        assert (freq - want[r]).abs().max() < 4 * math.sqrt(0.25 / n)
        assert freq[want[r] == 0].sum() == 0
    torch.manual_seed(123)
    again = NucleusSampler(temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))(None, rows.clone())
    assert torch.equal(again.argmax(-1).view(2, n), picked)


def test_each_prompt_is_read_once_for_its_n_answers(word_tok, monkeypatch):
    """sample_sequences reads a prompt once and continues n answers from its cache: the same answers
    (ids, ended, log-probs while sampling) as reading it n times, for left-padded rows of several
    lengths, and B (L - 1) (n - 1) fewer prompt tokens embedded, counted at the embedding."""
    import inspo_core.generation as g
    from inspo_core.models import tiny_llama

    model = tiny_llama(5, hidden_size=32, num_layers=2, num_heads=4, seed=7).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    rows = [[X, A, B, X, X], [X], [B, X, A], [X, X]]
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(inp[0].numel()))
    kw = dict(n=4, seed=11, batch_size=16, temperature=1.0, top_p=0.9, max_new_tokens=6, score=True)
    shared = g.sample_sequences(model, word_tok, rows, **kw)
    shared_tokens = sum(seen)
    seen.clear()
    monkeypatch.setattr(g, "_shared_prefix", lambda *a: None)
    plain = g.sample_sequences(model, word_tok, rows, **kw)
    plain_tokens = sum(seen)
    assert [[s.ids for s in r] for r in shared] == [[s.ids for s in r] for r in plain]
    assert [[s.ended for s in r] for r in shared] == [[s.ended for s in r] for r in plain]
    assert [s.logp for r in shared for s in r] == pytest.approx([s.logp for r in plain for s in r], abs=1e-5)
    assert len({len(s.ids) for r in plain for s in r}) > 1  # some answers ended early: the comparison covers it
    rows_n, L, n = len(rows), max(map(len, rows)), 4  # one generate call: every row fits batch_size // n
    assert plain_tokens - shared_tokens == rows_n * (L - 1) * (n - 1)


def test_answers_do_not_depend_on_the_batching(word_tok):
    """Each answer draws from its own seed (answer_seed(seed, row, sample)): the same answers whether
    the rows go through generate one at a time or all together, and another seed gives others."""
    from inspo_core.generation import sample_sequences
    from inspo_core.models import tiny_llama

    model = tiny_llama(5, hidden_size=32, num_layers=2, num_heads=4, seed=3).eval()
    rows = [[X, A, B, X, X], [X], [B, X, A], [X, X], [A, A]]
    kw = dict(n=3, seed=5, temperature=1.0, top_p=0.95, max_new_tokens=5)
    ids = lambda got: [[s.ids for s in r] for r in got]  # noqa: E731
    together = ids(sample_sequences(model, word_tok, rows, batch_size=64, **kw))
    alone = ids(sample_sequences(model, word_tok, rows, batch_size=3, **kw))  # one row per call
    assert together == alone
    assert ids(sample_sequences(model, word_tok, rows[::-1], batch_size=64, **kw)) != together[::-1]  # row index is part of the seed
    assert ids(sample_sequences(model, word_tok, rows, batch_size=64, **{**kw, "seed": 6})) != together
    assert len({tuple(a) for r in together for a in r}) > 3  # the answers vary: the comparison is not vacuous
