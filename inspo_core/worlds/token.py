"""Token worlds: short texts, a tiny causal LM pre-trained offline into pi_ref, an exact oracle.

A prompt asks a shopper's question (one of X contexts); a response recommends one of Y items in
one of a few phrasings. The oracle parses the item named in a text (exactly one known item, else the
text is unparseable and loses every comparison) and returns P(y > y' | x) from the world's
preference family. pi_ref is a tiny Llama trained by next-token prediction on samples of a known
generator pi_gen(item | x), tokenised by the conditioning builder exactly as training will see it
(part of it after an unrelated alternative in the `sep` layout, so the conditioned views start from
a model that can read them); it is cached on disk and rebuilt only when the world's config changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from inspo_core.atomic import atomic_path, atomic_write_text
from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.models import load_model, load_tokenizer, tiny_llama, train_tokenizer
from inspo_core.generation import sample_responses  # noqa: F401  (re-exported: the worlds' sampler)
from inspo_core.strategies import View
from inspo_core.worlds.preferences import FAMILIES, make_preferences

ITEMS = ["apple", "bread", "cheese", "dates", "eggs", "figs", "grapes", "honey", "jam", "kale", "lemon", "mango"]
SHOPPERS = ["Ana", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lea"]
PHRASES = ["I recommend the {item}.", "Take the {item}.", "The {item} is the best choice.", "Go with the {item}."]
PROMPT = "{name} is shopping today. Which single item should {name} buy?"


@dataclass(frozen=True)
class TokenWorldConfig:
    family: str = "cyclic"
    n_contexts: int = 4
    n_items: int = 6
    strength: float = 3.0
    delta: float = 0.3  # salience discount
    bt: float = 0.5  # cyclic: weight of a separable Bradley-Terry component
    ref_concentration: float = 1.0  # Dirichlet concentration of pi_gen(item | x)
    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    vocab_size: int = 512
    pretrain_samples: int = 4000
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    # fraction of pre-training samples shown after an unrelated alternative (x [SEP] y' [SEP] y, with
    # y independent of y'), so pi_ref can read the conditioned layout without preferring anything in it
    pretrain_context_frac: float = 0.5
    # version of the cached pi_ref's layout: bumped when the way pi_ref is built changes, so an older
    # cache is never reused under new rules (2: plain-text prompts, a tokenizer without a chat template)
    layout_version: int = 2

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family={self.family!r}; valid: {', '.join(FAMILIES)}")
        if not 1 <= self.n_contexts <= len(SHOPPERS):
            problems.append(f"n_contexts={self.n_contexts} must be in 1..{len(SHOPPERS)}")
        if not 2 <= self.n_items <= len(ITEMS):
            problems.append(f"n_items={self.n_items} must be in 2..{len(ITEMS)}")
        if problems:
            raise ValueError("invalid token world: " + "; ".join(problems))

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class TokenWorld:
    """A tiny LM pi_ref over shopping recommendations, an exact preference over items."""

    name = "token"
    families = FAMILIES
    config_class = TokenWorldConfig
    demo_defaults = dict(seeds=[0, 1, 2, 3, 4], family="cyclic", strength=3.0, max_steps=375, batch_size=16, lr=3e-4,
                         beta=0.5, max_length=96, n_eval=300, lora=0, context_format="sep", packing="padded")
    prompts_sampled = False  # the prompts are the world's whole population
    table_columns = [("unparseable", "deployed/unparseable", 11, ".3f")]

    def __init__(self, cfg: TokenWorldConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.items = ITEMS[: cfg.n_items]
        self.prompts = [PROMPT.format(name=n) for n in SHOPPERS[: cfg.n_contexts]]
        self.params = make_preferences(cfg.family, cfg.n_contexts, cfg.n_items, rng, strength=cfg.strength,
                                       delta=cfg.delta, bt=cfg.bt)
        self.P = self.params["P"]  # [X, Y, Y]
        self.pi_gen = rng.dirichlet(np.full(cfg.n_items, cfg.ref_concentration), size=cfg.n_contexts)
        self._item_re = re.compile(r"\b(" + "|".join(self.items) + r")\b")
        self.clusters = list(range(len(self.prompts)))

    # ---- the World interface (inspo_core.worlds.base) ---------------------------------------------
    @classmethod
    def from_demo(cls, cfg) -> "TokenWorld":
        steps = min(cfg.pretrain_steps, 200) if cfg.fast else cfg.pretrain_steps
        return cls(TokenWorldConfig(family=cfg.family, n_contexts=cfg.n_contexts, n_items=cfg.n_items,
                                    strength=cfg.strength, seed=cfg.world_seed, pretrain_steps=steps))

    @staticmethod
    def fast(cfg) -> None:
        cfg.seeds = cfg.seeds[:2]
        cfg.n_pairs, cfg.max_steps, cfg.n_eval = min(cfg.n_pairs, 800), min(cfg.max_steps, 120), min(cfg.n_eval, 150)

    def key(self) -> str:
        return self.cfg.key()

    def directory(self, cache_dir: str | Path) -> Path:
        return Path(cache_dir) / "worlds" / self.cfg.key()

    def save(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / "world.json", json.dumps(asdict(self.cfg), indent=1))

    def reference(self, cache_dir: str | Path, log=print) -> Path:
        return build_reference(self, cache_dir, log=log)

    def pairs(self, cache_dir: str | Path, ref_dir: Path, seed: int, n_pairs: int, log=print) -> Path:
        """n_pairs pairs sampled afresh for each training seed."""
        return sample_pairs(self, ref_dir, n_pairs, ref_dir.parent / f"pairs-{n_pairs}-s{seed}.jsonl", seed=seed, log=log)

    def opponents(self, cache_dir: str | Path, ref_dir: Path, n: int, log=print) -> list[list[str]]:
        from inspo_core.worlds.evaluation import reference_samples

        return reference_samples(self, ref_dir, n, seed=12345)  # seconds: not cached

    def ceilings(self, opp: list[list[str]]) -> dict:
        from inspo_core.worlds.evaluation import theory_ceilings

        c = theory_ceilings(self, opp)
        c["header"] = (f"Ceilings against the same opponents: pi_bar {c['identity']['pi_bar']:.3f}, "
                       f"pi_star {c['identity']['pi_star']:.3f}.")
        return c

    def measure_settings(self, cfg) -> dict:
        from inspo_core.conditioning import BuilderConfig

        builder = BuilderConfig(context_format=cfg.context_format, max_length=cfg.max_length, alpha_draft=cfg.alpha_draft)
        return {"temperature": cfg.temperature, "top_p": cfg.top_p, "n_eval": cfg.n_eval, "reflective": cfg.reflective,
                "builder": asdict(builder)}

    def measure(self, model_dir, ref_dir, opp, settings: dict, seed: int, log=print, frontier_only: bool = False) -> dict:
        from inspo_core.worlds.evaluation import world_value

        assert not frontier_only, "the token world has no reward: no frontier"
        return world_value(self, model_dir, opp, seed=seed, reflective=settings["reflective"],
                           builder=BuilderConfig(**settings["builder"]), temperature=settings["temperature"],
                           top_p=settings["top_p"])

    def run_settings(self, cfg) -> dict:
        return dict(val_size=100, eval_every=max(1, cfg.max_steps // 5), log_every=5)

    @staticmethod
    def reference_seeds(seeds: list[int]) -> list[int]:
        return list(seeds)

    def describe(self, summary: dict) -> str:
        import html

        cfg, c = summary["config"], summary["ceilings"]
        ceil = (f"the best context-only policy reaches V(pi_bar) = {c['identity']['pi_bar']:.3f} and the best "
                f"alternative-conditioned one V(pi_star) = {c['identity']['pi_star']:.3f}" if "identity" in c
                else html.escape(c.get("header", "")))
        return (f"<h1>InSPO Workbench demo: {html.escape(self.name)} world ({html.escape(self.cfg.family)})</h1>"
                f"<p>{self.cfg.n_contexts} prompts, {self.cfg.n_items} items, "
                f"{len(cfg['seeds'])} seed(s), {cfg['n_pairs']} pairs and {cfg['max_steps']} steps per run, "
                f"beta {', '.join(map(str, cfg['betas']))}, lr {cfg['lr']}, context format {cfg['context_format']}; "
                f"{summary['minutes']:.1f} minutes. V is the win rate against pi_ref samples under the world's exact "
                f"preference; {ceil}. The deployed model answers from the "
                "prompt alone; 'reflective' lets the same model see a pi_ref sample y' first (not how it is "
                "deployed: it shows what the conditioned views learned).</p>")

    # ---- the oracle -------------------------------------------------------------------------------
    def context(self, prompt: str) -> int:
        try:
            return self.prompts.index(prompt.strip())
        except ValueError:
            raise ValueError(f"prompt {prompt!r} is not one of this world's prompts") from None

    def parse(self, text: str) -> int | None:
        """The item a response names, or None when it names none or several."""
        found = set(self._item_re.findall(text))
        return self.items.index(found.pop()) if len(found) == 1 else None

    def explain(self, prompt: str, a: str, b: str) -> str:
        name = lambda y: "unparseable" if y is None else self.items[y]  # noqa: E731
        return f"oracle: {name(self.parse(a))} vs {name(self.parse(b))}"

    def preference(self, prompt: str, a: str, b: str) -> float:
        """P(a > b | prompt); an unparseable text loses, two unparseable texts tie."""
        x, ya, yb = self.context(prompt), self.parse(a), self.parse(b)
        if ya is None or yb is None:
            return 0.5 if ya is None and yb is None else (0.0 if ya is None else 1.0)
        return float(self.P[x, ya, yb])

    # ---- text generation from pi_gen ---------------------------------------------------------------
    def sample_texts(self, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        xs = rng.integers(0, self.cfg.n_contexts, size=n)
        out = []
        for x in xs:
            item = self.items[rng.choice(self.cfg.n_items, p=self.pi_gen[x])]
            out.append((self.prompts[x], PHRASES[rng.integers(len(PHRASES))].format(item=item)))
        return out

    def corpus(self) -> list[str]:
        return self.prompts + [p.format(item=i) for p in PHRASES for i in ITEMS]


def build_reference(world: TokenWorld, cache_dir: str | Path, log=print) -> Path:
    """Pre-train (or reuse) the tiny LM that is this world's pi_ref; returns its directory."""
    cfg = world.cfg
    path = Path(cache_dir) / "worlds" / cfg.key() / "pi_ref"
    if (path / "config.json").is_file():
        return path
    log(f"pre-training pi_ref for the {cfg.family} world ({cfg.pretrain_steps} steps) -> {path}")
    tok = train_tokenizer(world.corpus(), vocab_size=cfg.vocab_size, chat_template=None)  # prompts are plain text
    model = tiny_llama(len(tok), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                       num_heads=max(1, cfg.hidden_size // 16), max_positions=256, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    samples = world.sample_texts(cfg.pretrain_samples, rng)
    alts = world.sample_texts(cfg.pretrain_samples, rng)  # alternatives drawn independently of the target
    builder = ConditioningBuilder(tok, BuilderConfig(max_length=256, alpha_draft=None), [View("chosen", "rejected")])
    seqs, starts = [], []
    for i, ((prompt, resp), (_, alt)) in enumerate(zip(samples, alts)):
        pair = builder.build({"prompt": prompt, "chosen": resp, "rejected": alt}, i)
        view = View("chosen", "rejected") if rng.random() < cfg.pretrain_context_frac else View("chosen")
        ids, start = pair.sequence(view) if view.context else (pair.prompt_ids + pair.targets["chosen"],
                                                                len(pair.prompt_ids))
        seqs.append(ids)
        starts.append(start)
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    labels = torch.full((len(seqs), T), -100)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, st : len(s)] = torch.tensor(s[st:])
        mask[i, : len(s)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for step in range(cfg.pretrain_steps):
        idx = torch.randint(0, len(seqs), (64,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"pi_ref pre-trained: final next-token loss {loss.item():.3f}")
    model.eval()
    with atomic_path(path, directory=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "world.json").write_text(json.dumps(asdict(cfg), indent=1))
    return path


def sample_pairs(world: TokenWorld, ref_dir: Path, n_pairs: int, out_path: Path, seed: int = 0, log=print) -> Path:
    """n_pairs (x, y_w, y_l): both responses from pi_ref, the winner drawn from the oracle's P.

    Cached at `out_path` (rebuilt when absent). Rows carry `context` and `items` for analysis.
    Pairs where pi_ref produced an empty response are left out and counted in the log line.
    """
    if out_path.is_file():
        return out_path
    model, tok = load_model(str(ref_dir), dtype=torch.float32), load_tokenizer(str(ref_dir))
    model.eval()
    rng = np.random.default_rng(seed)
    per_context = np.bincount(rng.integers(0, len(world.prompts), size=n_pairs), minlength=len(world.prompts))
    rows, empty = [], 0
    for x, k in enumerate(per_context):
        if k == 0:
            continue
        texts = sample_responses(model, tok, world.prompts[x], 2 * int(k), seed=seed * 1000 + x)
        for a, b in zip(texts[0::2], texts[1::2]):
            if not a or not b:  # an immediate EOS: no text to train on
                empty += 1
                continue
            p = world.preference(world.prompts[x], a, b)
            a_wins = rng.random() < p
            w, l_ = (a, b) if a_wins else (b, a)
            rows.append({"prompt": world.prompts[x], "chosen": w, "rejected": l_, "context": x,
                         "items": [world.parse(w), world.parse(l_)]})
    rng.shuffle(rows)
    atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in rows))
    log(f"sampled {len(rows)} labelled pairs from pi_ref ({empty} pairs with an empty response left out) "
        f"-> {out_path}")
    return out_path
