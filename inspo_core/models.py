"""Loading causal LMs and tokenizers, and building tiny ones offline.

`load_model` / `load_tokenizer` take a hub name or a local directory (transformers Auto classes,
safetensors, no remote code unless asked). A directory may also hold a LoRA adapter in peft's format
(what a LoRA run writes to `final/` and `best/`): `load_model` then loads its base model with the
adapter folded in (`AutoPeftModelForCausalLM` + `merge_and_unload`), a plain causal LM like any other. `train_tokenizer` and `tiny_llama` build a byte-level
BPE tokenizer and a small Llama from a config with no download, for tests, worlds and the demo.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

from inspo_core.atomic import atomic_path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<sep>", "<unk>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus` (well under a second).

    Special tokens: <pad>, <s> (BOS, added to plain text), </s> (EOS), <sep>, <unk>. Pad and EOS
    are distinct here, but nothing in the project relies on that.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", sep_token="<sep>",
        unk_token="<unk>",
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_llama(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
               max_positions: int = 512, seed: int = 0, tie_word_embeddings: bool = False, **overrides):
    """A randomly initialised `LlamaForCausalLM` built from a config (no download), fp32, SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=overrides.pop("intermediate_size", hidden_size * 2),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=overrides.pop("num_key_value_heads", max(1, num_heads // 2)),
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
        **overrides,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def _load_error(what: str, name: str, e: Exception) -> ValueError:
    local = Path(name).exists()
    hint = ("the directory must hold what save_pretrained writes" if local else
            "a hub name needs network access (HF_HUB_OFFLINE is set here?) or the files in the local hub cache")
    return ValueError(f"could not load the {what} {name!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]} "
                      f"({hint})")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise _load_error("tokenizer", name_or_path, e) from None
    if chat_template:
        tok.chat_template = chat_template
    if tok.pad_token is None:  # padding never decides attention here, so EOS is a safe pad
        tok.pad_token = tok.eos_token
    return tok


ADAPTER_CONFIG = "adapter_config.json"  # peft's adapter directory


def is_adapter_dir(path: str | Path) -> bool:
    """A peft adapter directory (adapter_config.json, no config.json of a whole model)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def is_model_dir(path: str | Path) -> bool:
    """A directory `load_model` opens: a saved model (config.json) or a LoRA adapter (adapter_config.json)."""
    p = Path(path)
    return (p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory names (peft's base_model_name_or_path)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}: {ADAPTER_CONFIG} names no base_model_name_or_path; the adapter cannot be loaded")
    return base


def load_model(name_or_path: str, *, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = "sdpa"):
    """`AutoModelForCausalLM.from_pretrained` with safetensors only and no remote code by default; a LoRA adapter
    directory gives its base model with the adapter merged."""
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if is_adapter_dir(name_or_path):
        from peft import AutoPeftModelForCausalLM

        base = adapter_base(name_or_path)
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(name_or_path, dtype=dtype,
                                                             trust_remote_code=trust_remote_code, **kw)
        except (OSError, ValueError, ImportError, KeyError) as e:
            raise ValueError(f"could not load the LoRA adapter {name_or_path!r} over its base model {base!r}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:300]} (the base must still be there: "
                             "an adapter holds only the LoRA weights)") from None
        return model.merge_and_unload()
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kw
        )
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise _load_error("model", name_or_path, e) from None


def build_tiny(cache_dir: str | Path, texts: list[str], *, vocab_size: int = 512, hidden_size: int = 64,
               num_layers: int = 2, max_positions: int = 1024, seed: int = 0) -> Path:
    """A tiny Llama and a tokenizer trained on `texts`, saved under `cache_dir/tiny/<hash>`.

    Rebuilt only when the settings or the corpus change; the directory loads with the Auto classes.
    """
    spec = json.dumps([vocab_size, hidden_size, num_layers, max_positions, seed,
                       hashlib.sha256("\x00".join(texts).encode()).hexdigest()])
    path = Path(cache_dir) / "tiny" / hashlib.sha256(spec.encode()).hexdigest()[:16]
    if (path / "config.json").is_file():
        return path
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_llama(len(tok), hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=max(1, hidden_size // 16), max_positions=max_positions, seed=seed)
    with atomic_path(path, directory=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return path
