"""Builder + engine against a slow obvious computation: token ids written out by hand, one model
call per sequence, target log-probs summed in a Python loop."""

import copy

import pytest
import torch
from torch.testing import assert_close

from conftest import CHAT_EXAMPLES, PLAIN_EXAMPLES
from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.logps import TokenLogps
from inspo_core.scoring import score_views
from inspo_core.strategies import L_GIVEN_L, L_GIVEN_W, L_PLAIN, W_GIVEN_L, W_PLAIN

ALL_VIEWS = [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W, L_GIVEN_L]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def slow_logp(model, seq, n_target):
    """Sum of log pi(seq[t] | seq[:t]) over the last n_target tokens, one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    total = 0.0
    for t in range(len(seq) - n_target, len(seq)):
        total += torch.log_softmax(logits[t - 1], -1)[seq[t]].item()
    return total


def expected_plain(tok, ex, fmt, view):
    """Hand-built sequence for plain-text data: [BOS] prompt | context | response [EOS]."""
    bos, eos, sep = tok.bos_token_id, tok.eos_token_id, tok.sep_token_id
    prompt = [bos] + ids(tok, ex["prompt"])
    target = ids(tok, ex[view.target]) + [eos]
    ctx = []
    if view.context:
        alt = ex[view.context]
        ctx = {"sep": [sep] + ids(tok, alt) + [sep],
               "raw": ids(tok, alt) + [eos],
               "template": ids(tok, "<<") + ids(tok, alt) + ids(tok, ">>\n")}[fmt]
    return prompt + ctx + target, len(target)


def expected_chat(tok, ex, fmt, view):
    """Hand-rendered chat text for conftest's CHAT_TEMPLATE."""
    msgs = "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in ex["prompt"])
    prompt = ids(tok, "<s>" + msgs + "<|assistant|>\n")

    def text(r):
        v = ex[r]
        return v if isinstance(v, str) else v[0]["content"]

    target = ids(tok, text(view.target) + "</s>\n")
    ctx = []
    if view.context:
        alt = text(view.context)
        ctx = {"sep": [tok.sep_token_id] + ids(tok, alt) + [tok.sep_token_id],
               "raw": ids(tok, alt + "</s>\n"),
               "template": ids(tok, "<<") + ids(tok, alt) + ids(tok, ">>\n")}[fmt]
    return prompt + ctx + target, len(target)


@pytest.mark.parametrize("fmt", ["sep", "raw", "template"])
@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_builder_and_engine_match_slow_path(tokenizer, tiny_model, fmt, kind):
    examples, expect = (PLAIN_EXAMPLES, expected_plain) if kind == "plain" else (CHAT_EXAMPLES, expected_chat)
    cfg = BuilderConfig(context_format=fmt, max_length=256, alpha_draft=None, template="<<{alternative}>>\n",
                        prompt_format="plain" if kind == "plain" else "auto")
    builder = ConditioningBuilder(tokenizer, cfg, ALL_VIEWS)
    pairs, report = builder.build_all(examples)
    assert report.examples == len(examples) and not report.counts
    with torch.no_grad():
        chunked = score_views(tiny_model, pairs, ALL_VIEWS, pad_id=tokenizer.pad_token_id).logps
        full = score_views(TokenLogps(tiny_model, method="full"), pairs, ALL_VIEWS, pad_id=tokenizer.pad_token_id).logps
    for view in ALL_VIEWS:
        for i, ex in enumerate(examples):
            seq, n_target = expect(tokenizer, ex, fmt, view)
            built, start = pairs[i].sequence(view)
            assert built == seq, (view, i)
            assert len(built) - start == n_target
            want = slow_logp(tiny_model, seq, n_target)
            # fp32 model vs a float64 sum: 1e-5 absolute plus fp32 rounding of a ~100-nat total
            assert_close(chunked[view][i].item(), want, atol=1e-5, rtol=1e-6)
            assert_close(full[view][i].item(), want, atol=1e-5, rtol=1e-6)
        assert_close(chunked[view], full[view], atol=1e-5, rtol=1e-6)


def test_string_prompts_render_as_a_user_turn_when_the_tokenizer_has_a_template(tokenizer):
    """prompt_format auto: a string prompt becomes one user turn of the chat template with the
    generation prompt (what an instruct model expects), for training and generation alike; plain
    keeps the raw text; a tokenizer without a template falls back to plain."""
    ex = PLAIN_EXAMPLES[0]
    as_chat = {**ex, "prompt": [{"role": "user", "content": ex["prompt"]}]}
    auto = ConditioningBuilder(tokenizer, BuilderConfig(), [W_PLAIN, W_GIVEN_L])
    seq, n = expected_chat(tokenizer, as_chat, "sep", W_PLAIN)
    assert auto.build(ex).sequence(W_PLAIN)[0] == seq
    assert auto.generation_ids(ex["prompt"]) == seq[: len(seq) - n]
    plain = ConditioningBuilder(tokenizer, BuilderConfig(prompt_format="plain"), [W_PLAIN])
    assert plain.generation_ids(ex["prompt"]) == [tokenizer.bos_token_id] + ids(tokenizer, ex["prompt"])
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    assert ConditioningBuilder(bare, BuilderConfig(), [W_PLAIN]).generation_ids(ex["prompt"]) == \
        plain.generation_ids(ex["prompt"])
    with pytest.raises(ValueError, match="prompt_format='chat' needs a tokenizer with a chat template"):
        ConditioningBuilder(bare, BuilderConfig(prompt_format="chat"), [W_PLAIN])


@pytest.mark.parametrize("packing", ["padded", "tree"])
def test_padding_never_decides_attention_when_pad_is_eos(tokenizer, tiny_model, packing):
    """pad == EOS with `raw` contexts, so the alternative's own EOS sits in the middle of a row and
    rows are padded with EOS: every view scores exactly what the slow path gives for its unpadded
    sequence. (A mask derived from `input_ids != pad_id` would hide the mid-row EOS and fail.)"""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    builder = ConditioningBuilder(tok, BuilderConfig("raw", max_length=256, alpha_draft=None), ALL_VIEWS)
    pairs, _ = builder.build_all(PLAIN_EXAMPLES)
    seq, start = pairs[0].sequence(W_GIVEN_L)
    assert tok.eos_token_id in seq[1:start]  # the alternative's EOS is mid-row
    with torch.no_grad():
        got = score_views(tiny_model, pairs, ALL_VIEWS, packing=packing, pad_id=tok.pad_token_id).logps
    for i, p in enumerate(pairs):
        for v in ALL_VIEWS:
            seq, start = p.sequence(v)
            assert_close(got[v][i].item(), slow_logp(tiny_model, seq, len(seq) - start), atol=1e-5, rtol=1e-6)


def test_targets_are_the_same_tokens_in_every_view(tokenizer):
    builder = ConditioningBuilder(tokenizer, BuilderConfig(max_length=60, alpha_draft=0.3), ALL_VIEWS)
    pair = builder.build(PLAIN_EXAMPLES[1])
    for v in ALL_VIEWS:
        seq, start = pair.sequence(v)
        assert seq[start:] == pair.targets[v.target]
        assert len(seq) <= 60


def test_truncation_rules_table3(tokenizer):
    """max_length caps each sequence; the alternative is capped at floor(alpha * max_length) tokens
    and keeps its start; each target keeps its start, cut to its tightest view."""
    ex = PLAIN_EXAMPLES[1]
    L, alpha = 64, 0.25
    builder = ConditioningBuilder(tokenizer, BuilderConfig("raw", max_length=L, alpha_draft=alpha, prompt_format="plain"),
                                  [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W])
    pair = builder.build(ex)
    P = 1 + len(ids(tokenizer, ex["prompt"]))
    chosen = ids(tokenizer, ex["chosen"]) + [tokenizer.eos_token_id]
    rejected = ids(tokenizer, ex["rejected"]) + [tokenizer.eos_token_id]
    cap = int(alpha * L)  # 16
    assert pair.contexts["rejected"] == rejected[:cap]  # long alternative capped, start kept
    assert pair.contexts["chosen"] == chosen[:cap]
    assert pair.targets["chosen"] == chosen[: L - P - cap]
    assert pair.targets["rejected"] == rejected[: L - P - len(pair.contexts["chosen"])]
    assert {"context_capped", "rejected_truncated"} <= pair.flags
    # plain-only strategies do not pay for contexts they never use
    plain = ConditioningBuilder(tokenizer, BuilderConfig("raw", max_length=L, alpha_draft=alpha, prompt_format="plain"), [W_PLAIN, L_PLAIN])
    assert plain.build(ex).targets["chosen"] == chosen[: L - P]


def test_uncapped_context_is_cut_to_leave_a_target_token(tokenizer):
    ex = {"prompt": "Hi", "chosen": "yes", "rejected": " ".join(["the sea is blue"] * 20)}
    b = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=20, alpha_draft=None, prompt_format="plain"), [W_GIVEN_L])
    pair = b.build(ex)
    seq, start = pair.sequence(W_GIVEN_L)
    assert len(seq) == 20 and len(seq) - start == 1
    assert "context_cut_to_fit" in pair.flags and "chosen_truncated" in pair.flags


def test_exclude_eos_drops_the_final_token_from_the_score(tokenizer, tiny_model):
    views = [W_PLAIN, L_PLAIN]
    with_eos = ConditioningBuilder(tokenizer, BuilderConfig(max_length=64, prompt_format="plain"), views).build(PLAIN_EXAMPLES[0])
    no_eos = ConditioningBuilder(tokenizer, BuilderConfig(max_length=64, exclude_eos=True, prompt_format="plain"), views).build(PLAIN_EXAMPLES[0])
    assert no_eos.loss_lengths["chosen"] == with_eos.loss_lengths["chosen"] - 1
    with torch.no_grad():
        a = score_views(tiny_model, [with_eos], views).logps[W_PLAIN]
        b = score_views(tiny_model, [no_eos], views).logps[W_PLAIN]
    seq, start = with_eos.sequence(W_PLAIN)
    eos_term = slow_logp(tiny_model, seq, 1)
    assert_close(a.item() - b.item(), eos_term, atol=1e-5, rtol=0)


def test_exclude_eos_in_a_chat_template_drops_the_end_of_turn(tokenizer):
    """In a chat template the response ends with the EOS (end of turn) and the template's newline:
    exclude_eos leaves both out of the score, and nothing when the target was truncated."""
    ex = CHAT_EXAMPLES[0]
    keep = ConditioningBuilder(tokenizer, BuilderConfig(max_length=64), [W_PLAIN]).build(ex)
    drop = ConditioningBuilder(tokenizer, BuilderConfig(max_length=64, exclude_eos=True), [W_PLAIN]).build(ex)
    target = keep.targets["chosen"]
    assert target[-2:] == [tokenizer.eos_token_id] + ids(tokenizer, "\n")
    assert drop.targets["chosen"] == target and drop.loss_lengths["chosen"] == len(target) - 2
    cut = ConditioningBuilder(tokenizer, BuilderConfig(max_length=len(keep.prompt_ids) + 3, exclude_eos=True),
                              [W_PLAIN]).build(ex)
    assert cut.loss_lengths["chosen"] == 3


# ---- bad input ----------------------------------------------------------------------------------

def test_empty_response_names_the_example(tokenizer):
    b = ConditioningBuilder(tokenizer, BuilderConfig(), [W_PLAIN])
    with pytest.raises(ValueError, match=r"example 3: field 'rejected' is empty"):
        b.build({"prompt": "x", "chosen": "a", "rejected": "  "}, 3)
    pairs, report = b.build_all([PLAIN_EXAMPLES[0], {"prompt": "x", "chosen": "", "rejected": "b"}], skip_bad=True)
    assert len(pairs) == 1 and report.skipped[0][0] == 1 and "skipped" in report.summary()


def test_prompt_longer_than_max_length(tokenizer):
    b = ConditioningBuilder(tokenizer, BuilderConfig(max_length=8), [W_PLAIN])
    with pytest.raises(ValueError, match=r"example 5: the prompt has \d+ tokens.*max_length=8; raise max_length"):
        b.build({"prompt": "the cat sat on the mat and looked at the dog", "chosen": "a", "rejected": "b"}, 5)


def test_missing_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    b = ConditioningBuilder(tok, BuilderConfig(), [W_PLAIN])
    with pytest.raises(ValueError, match=r"example 0: conversational data needs a chat template"):
        b.build(CHAT_EXAMPLES[0])


def test_bad_fields(tokenizer):
    b = ConditioningBuilder(tokenizer, BuilderConfig(), [W_PLAIN])
    with pytest.raises(ValueError, match=r"example 2: missing field 'chosen'"):
        b.build({"prompt": "x", "rejected": "b"}, 2)
    with pytest.raises(ValueError, match=r"example 0: field 'prompt' must be a string or a list"):
        b.build({"prompt": 3, "chosen": "a", "rejected": "b"})
    with pytest.raises(ValueError, match="invalid builder settings: context_format='xml'"):
        BuilderConfig(context_format="xml")
    with pytest.raises(ValueError, match="sep_token 'no such sep' is not a single token"):
        ConditioningBuilder(tokenizer, BuilderConfig(sep_token="no such sep"), [W_GIVEN_L])
