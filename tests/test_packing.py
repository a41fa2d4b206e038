"""Tree packing gives the padded path's log-probs (1e-5, fp32) for every view, rendering and chat."""

import pytest
import torch
from torch.testing import assert_close

from conftest import CHAT_EXAMPLES, PLAIN_EXAMPLES
from inspo_core.conditioning import BuilderConfig, ConditioningBuilder, collate_views
from inspo_core.logps import view_logps
from inspo_core.packing import build_tree, pack_pairs, packed_view_logps
from inspo_core.strategies import L_GIVEN_L, L_GIVEN_W, L_PLAIN, W_GIVEN_L, W_PLAIN

ALL = [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W, L_GIVEN_L]


@pytest.mark.parametrize("fmt", ["sep", "raw", "template"])
@pytest.mark.parametrize("examples", [PLAIN_EXAMPLES, CHAT_EXAMPLES], ids=["plain", "chat"])
@pytest.mark.parametrize("row_tokens", [None, 60, 10**6])
def test_tree_equals_padded(tokenizer, tiny_model, fmt, examples, row_tokens):
    b = ConditioningBuilder(tokenizer, BuilderConfig(fmt, max_length=256, alpha_draft=0.5, exclude_eos=True), ALL)
    pairs, _ = b.build_all(examples * 2)
    with torch.no_grad():
        padded = view_logps(tiny_model, collate_views(pairs, ALL, tokenizer.pad_token_id))
        packed = packed_view_logps(tiny_model, pack_pairs(pairs, ALL, row_tokens=row_tokens), ALL, len(pairs))
    for v in ALL:
        assert_close(packed[v], padded[v], atol=1e-5, rtol=1e-6, msg=str(v))


def test_raw_contexts_share_the_plain_branch(tokenizer):
    """raw and uncut: [x | y_w | y_l | y_w after y_l | y_l after y_w], five segments, no copies."""
    b = ConditioningBuilder(tokenizer, BuilderConfig("raw", max_length=512, alpha_draft=None),
                            [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W])
    pair = b.build(PLAIN_EXAMPLES[0])
    tree = build_tree(pair, b.views)
    assert len(tree) == 5
    total = sum(len(s.tokens) for s in tree)
    P, W, L = len(pair.prompt_ids), len(pair.targets["chosen"]), len(pair.targets["rejected"])
    assert total == P + 2 * W + 2 * L  # versus 4P + 3W + 3L padded
    sep = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=512, alpha_draft=None), b.views)
    assert len(build_tree(sep.build(PLAIN_EXAMPLES[0]), b.views)) == 7  # contexts are separate segments


def test_gradients_match(tokenizer):
    from inspo_core.models import tiny_llama

    views = [W_GIVEN_L, L_GIVEN_W]
    b = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=256), views)
    pairs, _ = b.build_all(PLAIN_EXAMPLES)
    grads = []
    for packed in (False, True):
        model = tiny_llama(len(tokenizer), seed=5)
        out = (packed_view_logps(model, pack_pairs(pairs, views), views, len(pairs)) if packed
               else view_logps(model, collate_views(pairs, views)))
        (out[W_GIVEN_L] - 0.5 * out[L_GIVEN_W]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def test_rows_hold_several_trees_without_padding(tokenizer):
    b = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=256), ALL)
    pairs, _ = b.build_all(PLAIN_EXAMPLES * 3)
    one_row = pack_pairs(pairs, ALL, row_tokens=10**6)
    assert one_row.input_ids.shape[0] == 1 and one_row.tokens == one_row.input_ids.numel()
    # trees never see each other: the mask is block diagonal
    sizes = [sum(len(s.tokens) for s in build_tree(p, ALL)) for p in pairs]
    a = sizes[0]
    assert torch.isinf(one_row.attention_mask[0, 0, a:, :a]).all()
