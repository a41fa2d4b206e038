"""Tree packing gives the padded path's log-probs (1e-5, fp32) for every view, rendering and chat."""

import pytest
import torch
from torch.testing import assert_close

from conftest import CHAT_EXAMPLES, PLAIN_EXAMPLES
from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.packing import build_tree, pack_pairs
from inspo_core.scoring import score_views
from inspo_core.strategies import L_GIVEN_L, L_GIVEN_W, L_PLAIN, W_GIVEN_L, W_PLAIN

ALL = [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W, L_GIVEN_L]


@pytest.fixture(scope="module", params=["segments", "dense"])
def model(request, tiny_model):
    """The tiny model with tree attention per segment (inspo_tree), or on SDPA with a dense 4-D mask."""
    import copy

    from inspo_core.tree_attention import use_tree_attention

    if request.param == "dense":
        return tiny_model
    m = copy.deepcopy(tiny_model)
    assert use_tree_attention(m)
    return m


def both_paths(model, pairs, views, pad_id=0, row_tokens=None):
    padded = score_views(model, pairs, views, packing="padded", pad_id=pad_id).logps
    packed = score_views(model, pairs, views, packing="tree", pad_id=pad_id, pack_tokens=row_tokens).logps
    return padded, packed


@pytest.mark.parametrize("fmt", ["sep", "raw", "template"])
@pytest.mark.parametrize("examples", [PLAIN_EXAMPLES, CHAT_EXAMPLES], ids=["plain", "chat"])
@pytest.mark.parametrize("row_tokens", [None, 60, 10**6])
def test_tree_equals_padded(tokenizer, model, fmt, examples, row_tokens):
    b = ConditioningBuilder(tokenizer, BuilderConfig(fmt, max_length=256, alpha_draft=0.5, exclude_eos=True), ALL)
    pairs, _ = b.build_all(examples * 2)
    with torch.no_grad():
        padded, packed = both_paths(model, pairs, ALL, tokenizer.pad_token_id, row_tokens)
    for v in ALL:
        assert_close(packed[v], padded[v], atol=1e-5, rtol=1e-6, msg=str(v))


LONG_PROMPT = {"prompt": "answer the question about apples, oranges and pears " * 3, "chosen": "An apple, crisp and sweet.",
               "rejected": "A cat sat on the mat."}


@pytest.mark.parametrize("fmt", ["sep", "raw", "template"])
@pytest.mark.parametrize("case", ["draft_cap_zero", "draft_cap_small", "no_room_for_context", "targets_truncated"])
def test_tree_equals_padded_when_truncated(tokenizer, model, fmt, case):
    """Table 3's cuts: a draft cap of 0 tokens (a raw context becomes an empty segment), a cap of
    2, a prompt that leaves the context no room, targets cut by max_length."""
    P = len(tokenizer(LONG_PROMPT["prompt"])["input_ids"])
    settings = {"draft_cap_zero": dict(max_length=256, alpha_draft=0.001),
                "draft_cap_small": dict(max_length=256, alpha_draft=2 / 256),
                "no_room_for_context": dict(max_length=P + 3 + (2 if fmt == "sep" else 0), alpha_draft=None),
                "targets_truncated": dict(max_length=P + 6 + (2 if fmt == "sep" else 0), alpha_draft=0.5)}[case]
    if fmt == "template":  # the template's own tokens need room
        settings["max_length"] += len(tokenizer(BuilderConfig().template)["input_ids"])
    b = ConditioningBuilder(tokenizer, BuilderConfig(fmt, prompt_format="plain", **settings), ALL)
    pairs, report = b.build_all([LONG_PROMPT, PLAIN_EXAMPLES[0], PLAIN_EXAMPLES[1]])
    if case != "draft_cap_small":
        assert report.counts, "the case must actually cut something"
    if case == "draft_cap_zero" and fmt == "raw":
        assert any(p.contexts["chosen"] == [] for p in pairs)  # an empty context segment
    with torch.no_grad():
        padded, packed = both_paths(model, pairs, ALL, tokenizer.pad_token_id)
    for v in ALL:
        assert_close(packed[v], padded[v], atol=1e-5, rtol=1e-6, msg=str(v))


def test_every_query_of_a_packed_row_attends_somewhere(tokenizer):
    """Padding at the end of a row attends to itself: a fully masked query row is NaN in CUDA's
    memory-efficient SDPA, and its NaN reaches the gradients."""
    b = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=256), ALL)
    pairs, _ = b.build_all([LONG_PROMPT, PLAIN_EXAMPLES[0], PLAIN_EXAMPLES[1]])
    batch = pack_pairs(pairs, ALL, row_tokens=80)
    assert batch.input_ids.shape[0] > 1 and batch.tokens < batch.input_ids.numel()  # rows with tail padding
    mask = batch.dense_mask()
    allowed = torch.isfinite(mask[:, 0])  # [R, N, N]
    assert allowed.any(-1).all()
    # and the result is unchanged: padding never feeds a scored position
    q = torch.nn.functional.scaled_dot_product_attention(torch.randn(batch.input_ids.shape[0], 1, batch.input_ids.shape[1], 8),
                                                         torch.randn(batch.input_ids.shape[0], 1, batch.input_ids.shape[1], 8),
                                                         torch.randn(batch.input_ids.shape[0], 1, batch.input_ids.shape[1], 8),
                                                         attn_mask=mask)
    assert torch.isfinite(q).all()


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


@pytest.mark.parametrize("attention", ["segments", "dense"])
def test_gradients_match(tokenizer, attention):
    from inspo_core.models import tiny_llama
    from inspo_core.tree_attention import use_tree_attention

    views = [W_GIVEN_L, L_GIVEN_W]
    b = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=256), views)
    pairs, _ = b.build_all(PLAIN_EXAMPLES)
    grads = []
    for packed in (False, True):
        model = tiny_llama(len(tokenizer), seed=5)
        if attention == "segments":
            use_tree_attention(model)
        out = score_views(model, pairs, views, packing="tree" if packed else "padded").logps
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
    assert torch.isinf(one_row.dense_mask()[0, 0, a:, :a]).all()
    # tree attention never computes across trees: each segment's path lies inside its own tree
    for seg in one_row.segments:
        inside = [0, a] if seg.start < a else [a, one_row.tokens]
        assert all(inside[0] <= c < inside[1] for c in seg.path.tolist())


def test_tree_layout_pieces_and_malformed_paths():
    """The layout splits each row into segment pieces (and a padding piece) and names each segment's
    ancestors as pieces; a path that is not whole segments of its row, or overlapping segments, is refused."""
    from inspo_core.tree_attention import Segment, TreeLayout

    cols = lambda *r: torch.tensor([c for a, b in r for c in range(a, b)], dtype=torch.long)  # noqa: E731
    # row 0: prompt [0, 3), context [3, 5), target [5, 9) after the context, target [9, 11) after the prompt
    segs = [Segment(0, 0, 3, cols()), Segment(0, 3, 5, cols((0, 3))), Segment(0, 5, 9, cols((0, 3), (3, 5))),
            Segment(0, 9, 11, cols((0, 3)))]
    sizes, attn = TreeLayout(segs, 12).rows[0]
    assert sizes == [3, 2, 4, 2, 1]  # the last column is padding
    assert attn == [(0, []), (1, [0]), (2, [0, 1]), (3, [0])]
    with pytest.raises(ValueError, match="not made of whole segments"):
        TreeLayout([Segment(0, 0, 3, cols()), Segment(0, 3, 5, cols((0, 2)))])
    with pytest.raises(ValueError, match="overlap"):
        TreeLayout([Segment(0, 0, 3, cols()), Segment(0, 2, 5, cols())])


# --- sliding-window attention (issue 23, item 16) -------------------------------------------------

WINDOW = 16


def windowed_model(arch: str, vocab_size: int, window: int = WINDOW):
    """A tiny model with sliding-window layers, built from its config (no download), fp32, SDPA:
    Mistral (every layer windowed), Qwen2 (layers from max_window_layers on) and Gemma-3 (local and
    global layers)."""
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    if arch == "mistral":
        model_cls, cfg = T.MistralForCausalLM, T.MistralConfig(**common, sliding_window=window)
    elif arch == "qwen2":
        model_cls, cfg = T.Qwen2ForCausalLM, T.Qwen2Config(**common, use_sliding_window=True, sliding_window=window,
                                                           max_window_layers=1)
    elif arch == "gemma3":
        model_cls, cfg = T.Gemma3ForCausalLM, T.Gemma3TextConfig(**common, head_dim=8, sliding_window=window,
                                                                 layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(arch)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return model_cls(cfg).eval()


LONG_PAIR = {"prompt": "answer the question about apples, oranges and pears " * 2,
             "chosen": "An apple, crisp and sweet, and a pear.",
             "rejected": "The sea is a large body of salt water that covers most of the planet."}


def plain_logp(model, prompt_ids, target_ids, n_scored):
    """Summed log-probs of the first n_scored target tokens from one ordinary forward of the sequence."""
    ids = torch.tensor([prompt_ids + target_ids])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    P = len(prompt_ids)
    return sum(logp[P - 1 + t, target_ids[t]] for t in range(n_scored))


@pytest.mark.parametrize("attention", ["segments", "dense"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3"])
def test_tree_honours_sliding_windows(tokenizer, arch, attention):
    """Paths 3-4x longer than the window: the tree's log-probs (what the trainer uses) are the padded
    path's and a plain per-sequence forward's. Before the fix the tree ignored the window (Mistral:
    up to 0.13 nats per sequence at this size, Gemma-3: 0.64)."""
    from inspo_core.scoring import layer_windows
    from inspo_core.tree_attention import use_tree_attention

    model = windowed_model(arch, len(tokenizer))
    assert WINDOW in layer_windows(model)
    if attention == "segments":
        assert use_tree_attention(model)
    b = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=256, alpha_draft=0.5), ALL)
    pairs, _ = b.build_all([LONG_PAIR] + PLAIN_EXAMPLES)
    assert int(pack_pairs(pairs, ALL).position_ids.max()) + 1 > 3 * WINDOW
    with torch.no_grad():
        padded, packed = both_paths(model, pairs, ALL, tokenizer.pad_token_id)
        for v in ALL:
            assert_close(packed[v], padded[v], atol=1e-5, rtol=1e-6, msg=str(v))
        p = pairs[0]
        ref = plain_logp(model, p.prompt_ids, p.targets["chosen"], p.loss_lengths["chosen"])
    assert_close(packed[W_PLAIN][0], ref, atol=1e-5, rtol=1e-6)


def test_tree_gradients_match_under_a_window(tokenizer):
    """The window's key slice per segment keeps the gradients of the padded path (Gemma-3)."""
    from inspo_core.tree_attention import use_tree_attention

    views = [W_GIVEN_L, L_GIVEN_W, W_PLAIN]
    b = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=256), views)
    pairs, _ = b.build_all([LONG_PAIR, PLAIN_EXAMPLES[1]])
    grads = []
    for packed in (False, True):
        model = windowed_model("gemma3", len(tokenizer))
        use_tree_attention(model)
        out = score_views(model, pairs, views, packing="tree" if packed else "padded").logps
        (out[W_GIVEN_L] - 0.5 * out[L_GIVEN_W] + out[W_PLAIN]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def test_models_without_a_window_keep_tree_attention(tokenizer, tiny_model, monkeypatch):
    """A Llama (no window) and a Mistral whose window is longer than every path still run tree
    attention per segment, with no refusal."""
    import copy

    import inspo_core.scoring as scoring
    from inspo_core.tree_attention import TreeLayout, use_tree_attention

    layouts = []

    class Recorder(TreeLayout):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            layouts.append(self)

    monkeypatch.setattr(scoring, "TreeLayout", Recorder)
    b = ConditioningBuilder(tokenizer, BuilderConfig("sep", max_length=256), ALL)
    pairs, _ = b.build_all(PLAIN_EXAMPLES)
    for model in (copy.deepcopy(tiny_model), windowed_model("mistral", len(tokenizer), window=4096)):
        assert scoring.tree_supported(model) is None
        assert use_tree_attention(model)
        layouts.clear()
        with torch.no_grad():
            padded, packed = both_paths(model, pairs, ALL, tokenizer.pad_token_id)
        assert len(layouts) == 1 and layouts[0].windows_seen  # the forward went through tree attention
        for v in ALL:
            assert_close(packed[v], padded[v], atol=1e-5, rtol=1e-6, msg=str(v))
    assert scoring.layer_windows(tiny_model) == [None, None]


def test_tree_refuses_what_it_cannot_honour():
    """Layer kinds other than full and sliding attention are refused by name; a window that never
    reached tree attention (an architecture applying it some other way) is an error, not a silent
    full-attention score."""
    from types import SimpleNamespace

    from inspo_core.scoring import check_windows_honoured, tree_supported
    from inspo_core.tree_attention import Segment, TreeLayout

    cfg = SimpleNamespace(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    assert "linear_attention" in tree_supported(cfg)
    layout = TreeLayout([Segment(0, 0, 3, torch.zeros(0, dtype=torch.long))], 3)
    layout.windows_seen.add(None)
    with pytest.raises(RuntimeError, match="sliding_window"):
        check_windows_honoured(layout, [None, 16], "SomeConfig")
    check_windows_honoured(layout, [None, None], "SomeConfig")
