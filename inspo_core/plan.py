"""Prepare once, then loop: everything a training run needs, resolved before the first step.

`prepare(cfg, accelerator, say)` checks the run directory (a fresh run never mixes with an
earlier one; a resume continues only the same run, from its newest intact checkpoint), loads and
filters the data, loads the tokenizer and the policy, builds the token layout of every pair,
computes (or reads) the reference log-probs, and returns one frozen `TrainPlan` together with the
policy model. The training loop (`inspo_core.trainer`) only trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from inspo_core.catalog import resolve_model
from inspo_core.checkpoint import intact_checkpoints, read_state
from inspo_core.conditioning import BuilderConfig, BuiltPair, ConditioningBuilder
from inspo_core.config import TrainConfig
from inspo_core.distributed import check_shared_directory
from inspo_core.engines import Engine
from inspo_core.data import load_rows, prepare_rows, split_rows
from inspo_core.models import build_tiny, is_model_dir, load_model, load_tokenizer
from inspo_core.refcache import RefCache, RefStats, compute_ref_logps
from inspo_core.rundir import RESUME_FREE_KEYS, RunDir
from inspo_core.strategies import L_PLAIN, W_PLAIN, Method, View, resolve_method
from inspo_core.logps import TokenLogps
from inspo_core.tree_attention import use_tree_attention

PLAIN_VIEWS = (W_PLAIN, L_PLAIN)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class TrainPlan:
    cfg: TrainConfig
    method: Method  # objective x strategy, resolved once
    engine: Engine  # how the policy is held across processes, chosen once (inspo_core.engines)
    eval_views: tuple[View, ...]  # validation scores the plain views too, for the reflection metrics
    run: RunDir
    model_source: str  # a directory or hub name the policy (and the reference) come from
    tokenizer: object
    pad_id: int
    train_pairs: list[BuiltPair]
    val_pairs: list[BuiltPair]
    ref_train: dict[View, torch.Tensor]  # view -> [N] reference log-probs, pair order
    ref_val: dict[View, torch.Tensor]
    ref_stats: RefStats
    per_epoch: int  # optimizer steps per pass over the data
    total_steps: int
    global_batch: int  # pairs per optimizer step, all processes and micro-batches
    resume_from: Path | None
    config_record: dict  # what config.yaml and every checkpoint record
    # the reference log-probs are scored by the engine-wrapped sharded policy, before a resume's state is read
    # into it (`score_pending_reference`); until then ref_train and ref_val are empty
    reference_pending: bool = False


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant, so LoRA's frozen inputs need
    no gradient); the layer boundaries alone are kept."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare(cfg: TrainConfig, acc, engine: Engine, say=print, launcher: str = "",
            mark=lambda phase: None) -> tuple[TrainPlan, torch.nn.Module]:
    """(plan, the policy's TokenLogps on the accelerator's device, sharded by the engine, its optimizer not yet
    built). `cfg` is resolved (its sharding names `engine`); `launcher` describes what chose it, for the run's
    record. An engine that `loads_into_shards` builds the model on the meta device and each rank reads only its
    shards from the safetensors files, unless `_whole_load_reason` names why it cannot. `mark(phase)` is called
    when the model is loaded ("load") and the reference scored ("reference"), for the memory record."""
    assert cfg.sharding == engine.name, (cfg.sharding, engine)
    run = RunDir(cfg.output_dir)
    run.check_usable()
    resume_from = _choose_start(cfg, run, acc, say)
    check_shared_directory(acc, run.path)
    method = resolve_method(cfg.objective, cfg.strategy, w=cfg.w, ref_conditioning=cfg.ref_conditioning,
                            length_normalize=cfg.length_normalize, **cfg.objective_hparams())
    train_rows, val_rows = _load_data(cfg, say)
    source = _model_source(cfg, train_rows + val_rows, acc)
    tokenizer = load_tokenizer(cfg.tokenizer or source, trust_remote_code=cfg.trust_remote_code,
                               chat_template=cfg.chat_template)
    train_rows = _length_filter(cfg, train_rows, tokenizer, say)
    if cfg.max_rows:
        train_rows = train_rows[: cfg.max_rows]
    eval_views = tuple(sorted(set(method.policy_views) | (set(PLAIN_VIEWS) if method.conditioned else set())))
    builder = ConditioningBuilder(tokenizer, BuilderConfig.from_mapping(dataclasses.asdict(cfg)),
                                  sorted(set(eval_views) | set(method.ref_views)))
    train_pairs, rep = builder.build_all(train_rows, skip_bad=cfg.skip_bad_rows)
    say(f"builder (train): {rep.summary()}")
    val_pairs, vrep = builder.build_all(val_rows, skip_bad=cfg.skip_bad_rows)
    if val_pairs:
        say(f"builder (validation): {vrep.summary()}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    world = acc.num_processes
    global_batch = cfg.batch_size * cfg.grad_accum * world
    if len(train_pairs) < global_batch:
        raise ValueError(
            f"the training set has {len(train_pairs)} pairs, fewer than one global batch of {global_batch} "
            f"(batch_size x grad_accum x processes); lower batch_size/grad_accum or add data")
    per_epoch = len(train_pairs) // global_batch
    total = cfg.max_steps or max(1, int(cfg.epochs * per_epoch))

    # a sharded checkpoint (FSDP2, ZeRO-3) holds shards, not a model: start from the source; the engine reads
    # the shards into the sharded model
    from_ckpt = resume_from if engine.checkpoint_holds_model else None
    why = _whole_load_reason(cfg, method, source, engine) if engine.loads_into_shards else None
    if why:
        say(f"engine {engine.name}: every rank loads the whole weights ({why})")
    into_shards = why == ""
    if into_shards:  # parameters exist only as this rank's shards (the meta device until they are filled)
        policy = engine.sharded_policy(cfg, source)
    else:
        with engine.load_context(acc):
            policy = _load_policy(cfg, source, from_ckpt)
    if cfg.packing == "tree":  # attention per tree segment instead of a dense mask over packed rows
        use_tree_attention(policy)
    if cfg.gradient_checkpointing:
        enable_checkpointing(policy)
    scorer = TokenLogps(policy, chunk_mb=cfg.logps_chunk_mb)
    if into_shards:  # the reference is scored by the wrapped, sharded policy (`score_pending_reference`)
        scorer = engine.shard(acc, scorer)
        engine.fill_shards(acc, scorer, source, say)
        mark("load")
        ref_train, ref_val, ref_stats = {}, {}, RefStats()
    else:  # the reference pass on whole weights, then the engine's wrapping
        policy.to(acc.device)
        mark("load")
        ref_train, ref_val, ref_stats = _reference(cfg, method, source, policy, train_pairs, val_pairs, pad_id, acc,
                                                   engine, say, fresh=resume_from is None)
        mark("reference")
        scorer = engine.shard(acc, scorer)
    record = dataclasses.asdict(cfg) | {"resolved_model": source,
                                        # how it was launched: not part of the config hash (one process = two)
                                        "_launch": {"launcher": launcher, "processes": world}}
    plan = TrainPlan(cfg, method, engine, eval_views, run, source, tokenizer, pad_id, train_pairs, val_pairs, ref_train,
                     ref_val, ref_stats, per_epoch, total, global_batch, resume_from, record,
                     reference_pending=into_shards and method.objective.needs_reference)
    return plan, scorer


# ---- the run directory -----------------------------------------------------------------------------

def _choose_start(cfg: TrainConfig, run: RunDir, acc, say) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), after the directory rules."""
    if cfg.resume:
        found = intact_checkpoints(run, say if acc.is_main_process else (lambda _m: None))
        if found:
            ckpt = found[-1][1]
            check_resume_config(cfg, read_state(ckpt).get("config"), ckpt)
            return ckpt
        if run.artifacts() and not cfg.overwrite:
            raise ValueError(f"--resume: {run.path} holds no intact checkpoint to continue from (it holds "
                             f"{', '.join(run.artifacts())}); pass --overwrite to start afresh there, or choose "
                             "another output_dir")
        say(f"resume: no checkpoint in {run.checkpoints_dir}, starting fresh")
    leftover = run.artifacts()
    if leftover:
        if not cfg.overwrite:
            raise ValueError(f"{run.path} holds an earlier run ({', '.join(leftover)}); pass --resume to continue it "
                             "from its last checkpoint, --overwrite to start afresh there (deletes them), or choose "
                             "another output_dir")
        if acc.is_main_process:
            run.clear()
    acc.wait_for_everyone()
    return None


def check_resume_config(cfg: TrainConfig, saved: dict | None, ckpt: Path) -> None:
    """A resume continues the same run: every key that changes the run must equal the checkpoint's. `cfg` is
    resolved (`inspo_core.launch.resolve_launch`: sharding auto and bf16 null as this launch resolves them), and
    resolved before an Accelerator exists: accelerate writes `ACCELERATE_USE_DEEPSPEED` / `ACCELERATE_USE_FSDP` into
    the process's environment when given a plugin, so reading the launcher again afterwards misreads it."""
    if saved is None:
        return  # a checkpoint from before configs were recorded in it
    if cfg.sharding == "auto" or cfg.bf16 is None:
        raise ValueError("check_resume_config needs a resolved config (inspo_core.launch.resolve_launch)")
    now = dataclasses.asdict(cfg)
    differ = sorted(k for k in now if k not in RESUME_FREE_KEYS and k in saved and saved[k] != now[k])
    if differ:
        parts = [f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in differ]
        raise ValueError(f"--resume from {ckpt} with a different config ({'; '.join(parts)}); a resume must continue "
                         "the same run: restore these values, or start a new run in another output_dir")


# ---- data and model ------------------------------------------------------------------------------------

def _load_data(cfg: TrainConfig, say) -> tuple[list[dict], list[dict]]:
    train_rows, report = prepare_rows(load_rows(cfg.data, cfg.data_split), skip_bad_rows=cfg.skip_bad_rows,
                                      dedup=cfg.dedup, min_margin=cfg.min_margin)
    say(f"data {cfg.data}: {report.summary()}")
    if not train_rows:
        raise ValueError(f"data {cfg.data}: no usable rows left ({report.summary()})")
    if cfg.eval_data:
        val_rows, vrep = prepare_rows(load_rows(cfg.eval_data, cfg.eval_split), skip_bad_rows=cfg.skip_bad_rows,
                                      dedup=cfg.dedup, min_margin=cfg.min_margin)
        say(f"eval data {cfg.eval_data}: {vrep.summary()}")
        return train_rows, val_rows
    if cfg.val_size > 0:
        return split_rows(train_rows, cfg.val_size, cfg.seed)
    return train_rows, []


def _row_texts(row: dict) -> list[str]:
    p = row["prompt"]
    prompt = p if isinstance(p, str) else " ".join(m["content"] for m in p)
    return [prompt, row["chosen"], row["rejected"]]


def check_model_source(source: str, what: str = "model") -> None:
    """A clear error for a path that is not a model, before transformers' own messages."""
    p = Path(source)
    if p.is_dir():
        if not is_model_dir(p):
            raise ValueError(f"{what} {source!r} is a directory without config.json (or a LoRA adapter's "
                             "adapter_config.json), not a saved model; point it at a directory written by "
                             "save_pretrained (a run's final/), or a hub name")
        return
    if p.exists():
        raise ValueError(f"{what} {source!r} is a file; give the directory that holds the model")
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not _HUB_ID.match(source):
        raise ValueError(f"{what} {source!r} does not exist (and is not a hub name like org/model)")


def _model_source(cfg: TrainConfig, rows: list[dict], acc) -> str:
    if cfg.model != "tiny":
        with acc.main_process_first():  # a named model or a .gguf is materialised once, by the main process
            source = resolve_model(cfg.model, cfg.cache_dir)
        check_model_source(source)
        if cfg.ref_model:
            check_model_source(resolve_model(cfg.ref_model, cfg.cache_dir), "ref_model")
        return source
    texts = [t for r in rows for t in _row_texts(r)]
    with acc.main_process_first():
        return str(build_tiny(cfg.cache_dir, texts, vocab_size=cfg.tiny_vocab, hidden_size=cfg.tiny_hidden,
                              num_layers=cfg.tiny_layers, max_positions=max(1024, cfg.max_length), seed=cfg.seed))


def _length_filter(cfg: TrainConfig, rows: list[dict], tokenizer, say) -> list[dict]:
    if not (cfg.max_response_tokens or cfg.min_response_tokens):
        return rows
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    kept, rep = prepare_rows(rows, dedup=False, token_count=count, max_response_tokens=cfg.max_response_tokens,
                             min_response_tokens=cfg.min_response_tokens)
    say(f"length filter: {rep.summary()}")
    return kept


def _whole_load_reason(cfg: TrainConfig, method: Method, source: str, engine: Engine) -> str:
    """Why an engine that loads into shards must load whole weights on every rank instead ('' when it need not)."""
    if cfg.lora:
        return "LoRA adapters are added to whole weights"
    if cfg.ref_model and method.objective.needs_reference:
        return "a separate ref_model is scored before sharding"
    return engine.cannot_load_into_shards(cfg, source)


def _load_policy(cfg: TrainConfig, source: str, resume_from: Path | None):
    dtype = torch.float32  # master weights in fp32; bf16 runs use autocast
    if cfg.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        base = load_model(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        if resume_from is not None:
            return PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
        torch.manual_seed(cfg.seed)
        lcfg = LoraConfig(r=cfg.lora, lora_alpha=cfg.lora_alpha or 2 * cfg.lora, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(base, lcfg)
        # what a saved adapter names as its base: absolute, so it loads from any working directory
        model.peft_config["default"].base_model_name_or_path = str(Path(source).resolve()) if Path(source).is_dir() \
            else source
        return model
    return load_model(str(resume_from or source), dtype=dtype, trust_remote_code=cfg.trust_remote_code)


# ---- the reference -------------------------------------------------------------------------------------

def _ref_dtype(cfg: TrainConfig) -> str:
    """The precision the reference is scored in, as its cache key names it."""
    return "bf16" if cfg.bf16 else "fp32"


def _score_reference(cfg: TrainConfig, engine: Engine, acc, model, pairs, views, pad_id: int):
    """compute_ref_logps of `pairs` with the run's batching, packing and precision (the engine's autocast)."""
    with engine.reference_autocast(acc, cfg.bf16):
        return compute_ref_logps(model, pairs, views, batch_size=cfg.batch_size, pad_id=pad_id,
                                 chunk_mb=cfg.logps_chunk_mb, packing=cfg.packing,
                                 mask_dtype=torch.bfloat16 if cfg.bf16 else torch.float32)


def score_pending_reference(plan: TrainPlan, scorer, acc, say) -> TrainPlan:
    """The plan with its reference log-probs, scored by `scorer` (the engine-wrapped sharded policy, still holding
    the source's weights) when the cache does not hold them. Every rank scores every pair in the same batches
    (each forward gathers the shards): the pass takes what one process's would and no rank holds a whole model.
    The ranks agree on what the cache holds before any computes; the main process writes it."""
    if not plan.reference_pending:
        return plan
    cfg, views = plan.cfg, plan.method.ref_views
    cache = RefCache(cfg.cache_dir)
    with acc.main_process_first():
        ref_id = cache.model_id(plan.model_source)
    splits = (plan.train_pairs, plan.val_pairs)
    keys = [cache.key(ref_id, pairs, views, _ref_dtype(cfg)) for pairs in splits]
    found = [cache.load(k, views) for k in keys]
    hits = torch.tensor([float(got is not None) for got, _ in found], device=acc.device)
    everywhere = acc.reduce(hits, "sum").tolist()  # a file one rank read and another did not is computed again
    results, forwards = [], 0
    for pairs, key, (got, why), n in zip(splits, keys, found, everywhere):
        if n == acc.num_processes:
            results.append(got)
            continue
        got, f = _score_reference(cfg, plan.engine, acc, scorer, pairs, views, plan.pad_id)
        forwards += f
        if acc.is_main_process:
            cache.store(key, got)
        if why:
            say(why)
        results.append(got)
    plan.engine.after_forward(scorer)
    acc.wait_for_everyone()
    path = str(cache.dir / f"{keys[0]}.safetensors")
    stats = RefStats(forwards, forwards == 0, path)
    say(f"reference log-probs: {'cache hit' if stats.cache_hit else 'computed'} ({forwards} reference forwards, "
        f"the sharded policy on every rank) {path}")
    return dataclasses.replace(plan, ref_train=results[0], ref_val=results[1], ref_stats=stats,
                               reference_pending=False)


def _reference(cfg: TrainConfig, method: Method, source: str, policy, train_pairs, val_pairs, pad_id, acc, engine,
               say, fresh: bool = True):
    """Reference log-probs of train and validation pairs, from the cache when possible, computed before
    the policy is sharded or wrapped. The cache key is the reference's files (config + full weights;
    with LoRA the base model, adapters excluded), the scored token sequences and the dtype. The
    reference is the policy itself when it still holds the reference's weights (LoRA with adapters
    disabled, or a fresh run from the same model): no second model per process. (An engine that loads into
    shards scores it later, with the sharded policy: `score_pending_reference`.)"""
    if not method.objective.needs_reference:
        return {}, {}, RefStats(cache_hit=True)
    cache = RefCache(cfg.cache_dir)
    ref_source = source if cfg.lora else (resolve_model(cfg.ref_model, cfg.cache_dir) if cfg.ref_model else source)
    views = method.ref_views
    ref_model = None

    def get_ref():
        nonlocal ref_model
        if ref_model is None:
            if cfg.lora or (fresh and ref_source == source):  # the policy holds the reference's weights now
                ref_model = policy
            else:
                with engine.load_context(acc):
                    ref_model = load_model(ref_source, dtype=torch.float32,
                                           trust_remote_code=cfg.trust_remote_code).to(acc.device)
                if cfg.packing == "tree":
                    use_tree_attention(ref_model)
        return ref_model

    results = []
    with acc.main_process_first():
        ref_id = cache.model_id(ref_source)
        for pairs in (train_pairs, val_pairs):
            key = cache.key(ref_id, pairs, views, _ref_dtype(cfg))

            def compute(pairs=pairs):
                model = get_ref()
                ctx = model.disable_adapter() if cfg.lora else contextlib.nullcontext()  # LoRA: the base model
                with ctx:
                    return _score_reference(cfg, engine, acc, model, pairs, views, pad_id)

            results.append(cache.get_or_compute(key, views, compute))
    (ref_train, s1), (ref_val, s2) = results
    for note in {s1.note, s2.note} - {""}:
        say(note)
    stats = RefStats(s1.forwards + s2.forwards, s1.cache_hit and s2.cache_hit, s1.path)
    say(f"reference log-probs: {'cache hit' if stats.cache_hit else 'computed'} ({stats.forwards} reference "
        f"forwards) {s1.path}")
    return ref_train, ref_val, stats
