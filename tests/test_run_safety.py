"""Nothing silently wrong, nothing lost: run-directory rules, resume safety, damaged checkpoints and
caches, divergence, clipping of the prepared model. Each test reproduces a case that went wrong
before (issue notes in the docstrings)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from inspo_core.checkpoint import CheckpointError
from inspo_core.trainer import Trainer, TrainingError
from test_trainer import cfg, losses, weights

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---- the method -------------------------------------------------------------------------------------

def test_averaged_with_w_zero_trains_like_none(tmp_path, cache_dir):
    """`--strategy averaged --w 0` crashed with a KeyError (the logged term had weight 0 and its views
    were never scored). Now it trains, and w=0 is plain DPO step by step; w=1 is INS-DPO."""
    a0 = Trainer(cfg(tmp_path / "a0", cache_dir, strategy="averaged", w=0.0)).run()
    none = Trainer(cfg(tmp_path / "n", cache_dir, strategy="none")).run()
    assert_close(torch.tensor(losses(a0.run_dir)), torch.tensor(losses(none.run_dir)), atol=1e-6, rtol=1e-6)
    a1 = Trainer(cfg(tmp_path / "a1", cache_dir, strategy="averaged", w=1.0)).run()
    sym = Trainer(cfg(tmp_path / "s", cache_dir, strategy="symmetric")).run()
    assert_close(torch.tensor(losses(a1.run_dir)), torch.tensor(losses(sym.run_dir)), atol=1e-6, rtol=1e-6)


def test_length_normalize_is_refused_where_it_would_normalise_twice(tmp_path, cache_dir):
    from inspo_core.config import TrainConfig, load_config

    for name in ("simpo", "orpo", "rrhf", "cpo", "slic"):
        with pytest.raises(ValueError, match=f"objective '{name}': {name} already divides by"):
            load_config(TrainConfig, None, {"objective": name, "length_normalize": True})


def test_length_normalized_dpo_in_the_trainer_is_eq_12(tmp_path, cache_dir):
    """The first step's loss of DPO with length_normalize equals -log sigma(beta * margin of mean
    log-probs), computed here from the plan's own reference log-probs and a fresh scoring pass."""
    from inspo_core.scoring import score_views

    t = Trainer(cfg(tmp_path, cache_dir, strategy="none", length_normalize=True, max_steps=1, val_size=0,
                    batch_size=8, beta=0.5))
    t.run()
    plan = t.plan
    idx = t.micro_batches(0)[0]
    from inspo_core.models import load_model

    start = load_model(plan.model_source, dtype=torch.float32)
    with torch.no_grad():
        s = score_views(start, [plan.train_pairs[i] for i in idx], plan.method.policy_views, pad_id=plan.pad_id)
    from inspo_core.strategies import L_PLAIN, W_PLAIN

    lc, lr = s.lengths["chosen"].double(), s.lengths["rejected"].double()
    pol_c, pol_r = s.logps[W_PLAIN].double() / lc, s.logps[L_PLAIN].double() / lr
    ref_c, ref_r = plan.ref_train[W_PLAIN][idx].double() / lc, plan.ref_train[L_PLAIN][idx].double() / lr
    want = torch.nn.functional.softplus(-0.5 * ((pol_c - ref_c) - (pol_r - ref_r))).mean().item()
    assert losses(plan.run.path)[0] == pytest.approx(want, abs=1e-5)


class _ReplacingAccelerator:
    """An Accelerator whose prepare() swaps every parameter for a new tensor and remaps the
    optimizer, as FSDP2's fully_shard does (parameters become DTensors)."""

    def __new__(cls, **kw):
        from accelerate import Accelerator

        class Replacing(Accelerator):
            def prepare(self, model, optimizer):
                new = {}
                for mod in model.modules():
                    for name, p in list(mod._parameters.items()):
                        if p is not None:
                            new.setdefault(id(p), torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                            mod._parameters[name] = new[id(p)]
                for g in optimizer.param_groups:
                    g["params"] = [new[id(p)] for p in g["params"]]
                optimizer.state.clear()
                return super().prepare(model, optimizer)

        return Replacing(**kw)


def test_clipping_acts_on_the_prepared_parameters(tmp_path, cache_dir):
    """Clipping was handed the parameter list captured before `accelerator.prepare`; when prepare
    replaces the parameters (FSDP2) those are stale: grad_norm read 0 and nothing was clipped. With a
    tight limit the run must equal the ordinary one step by step, and report the real norm."""
    kw = dict(max_grad_norm=1e-3, max_steps=3, val_size=0)
    plain = Trainer(cfg(tmp_path / "a", cache_dir, **kw)).run()
    swapped = Trainer(cfg(tmp_path / "b", cache_dir, **kw), accelerator=_ReplacingAccelerator(cpu=True)).run()
    assert_close(torch.tensor(losses(swapped.run_dir)), torch.tensor(losses(plain.run_dir)), atol=1e-6, rtol=1e-6)
    norms = losses(swapped.run_dir, "grad_norm")
    assert all(n > 1e-3 for n in norms), norms  # above the limit: clipping changed every update
    unclipped = Trainer(cfg(tmp_path / "c", cache_dir, **{**kw, "max_grad_norm": 0.0})).run()
    assert losses(unclipped.run_dir)[1:] != losses(plain.run_dir)[1:]


# ---- the run directory ------------------------------------------------------------------------------

def test_fresh_run_refuses_a_finished_run_without_checkpoints(tmp_path, cache_dir):
    """A second fresh run into a finished run's directory (save_every 0: no checkpoints) replaced its
    final/ and metrics.jsonl without a word."""
    Trainer(cfg(tmp_path, cache_dir, max_steps=2)).run()
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds an earlier run \(config.yaml, metrics.jsonl, final.*--overwrite"):
        Trainer(cfg(tmp_path, cache_dir, max_steps=2, lr=5e-4)).run()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="holds no intact checkpoint to continue from"):
        Trainer(cfg(tmp_path, cache_dir, max_steps=2, resume=True)).run()
    Trainer(cfg(tmp_path, cache_dir, max_steps=2, lr=5e-4, overwrite=True)).run()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() != before


def test_output_dir_that_is_a_file_fails_before_setup(tmp_path, cache_dir):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        Trainer(load_cfg(output_dir=str(tmp_path / "afile" / "run"), cache_dir=cache_dir)).run()


def load_cfg(**kw):
    from inspo_core.config import TrainConfig, load_config

    return load_config(TrainConfig, None, kw)


@pytest.mark.parametrize("change", [{"objective": "ipo"}, {"strategy": "none"}, {"max_length": 80},
                                    {"lr": 5e-4, "seed": 3}])
def test_resume_refuses_a_changed_config(tmp_path, cache_dir, change):
    """--resume accepted a changed objective, strategy or max_length and mixed two setups in one
    metrics file. Now it names every key that differs."""
    Trainer(cfg(tmp_path, cache_dir, max_steps=4, save_every=2)).run()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    with pytest.raises(ValueError, match="--resume from .*step-2 with a different config") as err:
        Trainer(cfg(tmp_path, cache_dir, max_steps=4, save_every=2, resume=True, **change)).run()
    for key in change:
        assert f"{key}: " in str(err.value)
    # bookkeeping keys may change
    Trainer(cfg(tmp_path, cache_dir, max_steps=4, save_every=1, log_every=2, resume=True)).run()


def test_failed_final_save_is_loud(tmp_path, cache_dir, monkeypatch):
    """A failed save of final/ (a file in the way) exited 0 saying the model was saved."""
    import inspo_core.trainer as trainer_mod

    orig = trainer_mod.save_model

    def blocked(acc, engine, scorer, lm, tok, path, **kw):
        if path.name == "final":
            path.write_text("in the way")
        return orig(acc, engine, scorer, lm, tok, path, **kw)

    monkeypatch.setattr(trainer_mod, "save_model", blocked)
    with pytest.raises(CheckpointError, match="could not save the model to .*final"):
        Trainer(cfg(tmp_path, cache_dir, max_steps=2, val_size=0)).run()
    assert not any(p.name.startswith(".final") for p in (tmp_path / "run").iterdir())  # no temporary left


def _damage(ckpt: Path, how: str) -> None:
    if how == "truncated_weights":
        w = ckpt / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "zeroed_weights":  # 64 KiB of the tensor data zeroed, the size unchanged
        w = ckpt / "model.safetensors"
        data = bytearray(w.read_bytes())
        start = 8 + int.from_bytes(data[:8], "little")
        n = min(64 << 10, len(data) - start)
        assert any(data[start : start + n])
        data[start : start + n] = bytes(n)
        w.write_bytes(bytes(data))
    elif how == "missing_optimizer":
        (ckpt / "optimizer.pt").unlink()
    elif how == "empty_trainer_state":
        (ckpt / "trainer_state.json").write_text("")


@pytest.mark.parametrize("how", ["truncated_weights", "zeroed_weights", "missing_optimizer", "empty_trainer_state"])
def test_resume_skips_a_damaged_checkpoint(tmp_path, cache_dir, capsys, how):
    """A damaged last checkpoint stopped --resume with a traceback; weights zeroed at the same size
    were resumed from without a word (the manifest held sizes only). Now the newest intact one is
    used, the skipped one is named with the reason, and the result equals the uninterrupted run."""
    full = Trainer(cfg(tmp_path / "a", cache_dir, max_steps=6, save_every=2)).run()
    Trainer(cfg(tmp_path / "b", cache_dir, max_steps=6, save_every=2)).run()
    run_b = tmp_path / "b" / "run"
    _damage(run_b / "checkpoints" / "step-6", how)
    capsys.readouterr()
    Trainer(cfg(tmp_path / "b", cache_dir, max_steps=6, save_every=2, resume=True)).run()
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "step-6" in out
    if how == "zeroed_weights":
        assert "model.safetensors does not hold what was written (sha256" in out
    assert "resumed from" in out and "step-4 at step 4" in out
    assert losses(run_b) == losses(full.run_dir)
    for k, v in weights(full.run_dir / "final").items():
        assert torch.equal(v, weights(run_b / "final")[k]), k


def test_resume_accepts_a_manifest_without_hashes_and_says_so(tmp_path, cache_dir, capsys):
    """Checkpoints written before content hashes were recorded (manifest {file: size}) still resume,
    checked by size, and the log says once that their contents were not checked."""
    full = Trainer(cfg(tmp_path / "a", cache_dir, max_steps=6, save_every=2)).run()
    Trainer(cfg(tmp_path / "b", cache_dir, max_steps=6, save_every=2)).run()
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step-6")
    for step in (2, 4):
        man = ckpts / f"step-{step}" / "manifest.json"
        man.write_text(json.dumps({k: v["bytes"] for k, v in json.loads(man.read_text())["files"].items()}))
    capsys.readouterr()
    Trainer(cfg(tmp_path / "b", cache_dir, max_steps=6, save_every=2, resume=True)).run()
    out = capsys.readouterr().out
    assert out.count("without content hashes") == 1 and "step-2, step-4" in out and "by file size only" in out
    assert "skipping damaged" not in out and "step-4 at step 4" in out
    assert losses(tmp_path / "b" / "run") == losses(full.run_dir)


def test_save_total_limit_keeps_the_newest(tmp_path, cache_dir):
    Trainer(cfg(tmp_path, cache_dir, max_steps=5, save_every=1, save_total_limit=2)).run()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_nan_stop_names_the_real_last_good_checkpoint(tmp_path, cache_dir, monkeypatch, capsys):
    """The NaN stop named as 'last good' the checkpoint holding the weights that gave the NaN, and
    resuming from it diverged again. A NaN loss at step 5 comes from the weights after step 4; the
    good one is step-2, step-4 is marked so that --resume skips it. The CLI prints no traceback."""
    orig = Trainer.loss_terms
    count = {"n": 0}

    def nan_at_step_5(self, *a, **k):
        out = orig(self, *a, **k)  # no validation set: every call is a training micro-batch
        count["n"] += 1
        if count["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Trainer, "loss_terms", nan_at_step_5)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5.*Last good checkpoint: \S*checkpoints/step-2 "):
        Trainer(cfg(tmp_path, cache_dir, max_steps=6, save_every=2, val_size=0)).run()
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-4" / "diverged.txt").exists()
    assert not (run / "final").exists()
    monkeypatch.setattr(Trainer, "loss_terms", orig)
    capsys.readouterr()
    Trainer(cfg(tmp_path, cache_dir, max_steps=6, save_every=2, val_size=0, resume=True)).run()
    out = capsys.readouterr().out
    assert "the run diverged from it" in out and "step-2 at step 2" in out

    # the command line: an expected stop is a message and exit status 1, not a traceback
    from workbench.cli import main

    count["n"] = 0
    monkeypatch.setattr(Trainer, "loss_terms", nan_at_step_5)
    code = main(["train", "--model", "tiny", "--data", str(Path(__file__).resolve().parents[1] / "examples" /
                 "toy_preferences.jsonl"), "--max_steps", "6", "--save_every", "2", "--val_size", "0",
                 "--max_length", "96", "--tiny_hidden", "32", "--lr", "1e-3", "--output_dir", str(tmp_path / "cli"),
                 "--cache_dir", cache_dir])
    err = capsys.readouterr().err
    assert code == 1 and "error: non-finite loss at step 5" in err and "Traceback" not in err


# ---- the reference cache ----------------------------------------------------------------------------

def _save_tiny(path: Path, src: Path, mutate=None, config=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src)
    if mutate:
        mutate(m)
    if config:
        for k, v in config.items():
            setattr(m.config, k, v)
    m.save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


def test_reference_cache_keys_on_full_weights_and_config(tmp_path):
    """Same-size references whose middle weights differ got a cache hit (the fingerprint read the
    first and last MiB); a config change with the same weights hit too."""
    cache = str(tmp_path / "cache")
    first = Trainer(cfg(tmp_path / "a", cache, max_steps=1))
    first.run()
    src = Path(first.plan.model_source)

    def middle(m):
        layer = m.model.layers[len(m.model.layers) // 2].mlp.up_proj.weight
        with torch.no_grad():
            layer[3, 5] += 0.5

    same = _save_tiny(tmp_path / "same", src)
    mid = _save_tiny(tmp_path / "mid", src, mutate=middle)
    conf = _save_tiny(tmp_path / "conf", src, config={"rms_norm_eps": 1e-3})
    assert (same / "model.safetensors").stat().st_size == (mid / "model.safetensors").stat().st_size

    def run(name, model):
        return Trainer(cfg(tmp_path / name, cache, model=str(model), max_steps=1)).run()

    assert run("same", same).ref_stats.cache_hit  # identical weights and config, another directory
    r_mid = run("mid", mid)
    assert not r_mid.ref_stats.cache_hit and r_mid.ref_stats.forwards > 0
    assert not run("conf", conf).ref_stats.cache_hit


def _edit_in_place_keeping_size_and_mtime(f: Path, offset: int, n: int = 64 << 10) -> None:
    """Zero `n` bytes at `offset` through the same inode, then put the old mtime back (os.utime)."""
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(offset)
        assert any(fh.read(n))
        fh.seek(offset)
        fh.write(bytes(n))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = f.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_reference_cache_misses_after_an_in_place_edit_keeping_size_and_mtime(tmp_path):
    """The whole-file hash was memoised by (path, size, mtime, inode): weights edited in place with
    the mtime put back kept the old hash, and the old reference log-probs were used."""
    cache = str(tmp_path / "cache")
    first = Trainer(cfg(tmp_path / "a", cache, max_steps=1))
    first.run()
    ref = _save_tiny(tmp_path / "ref", Path(first.plan.model_source))
    assert Trainer(cfg(tmp_path / "b", cache, model=str(ref), max_steps=1)).run().ref_stats.cache_hit
    w = ref / "model.safetensors"
    header = 8 + int.from_bytes(w.read_bytes()[:8], "little")
    _edit_in_place_keeping_size_and_mtime(w, header + (w.stat().st_size - header) // 2 - (32 << 10))
    c = Trainer(cfg(tmp_path / "c", cache, model=str(ref), max_steps=1)).run()
    assert not c.ref_stats.cache_hit and c.ref_stats.forwards > 0


def test_file_hash_memo_checks_sampled_content_when_ctime_is_not_kept(tmp_path, monkeypatch):
    """Where the file system does not keep ctime apart from mtime (some FUSE mounts report ctime =
    mtime), the memo key alone hits after an in-place edit (shown here with the content check turned
    off); the sampled-content check (the safetensors header and evenly spaced blocks, read on every
    lookup) catches an edit that touches them, and the hash returned is the new content's."""
    import hashlib

    import inspo_core.fingerprint as fp
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(3 << 20)}, str(f))  # 12 MiB: above the size that is always read in full
    assert f.stat().st_size > fp.FULL_READ_BYTES
    monkeypatch.setattr(fp, "_stat_key", lambda st: (st.st_size, st.st_mtime_ns, st.st_ino))  # ctime not kept
    probe = fp.content_probe

    def run(check: bool) -> tuple[str, str]:
        memo = tmp_path / f"memo-{check}"
        shutil.rmtree(memo, ignore_errors=True)
        save_file({"w": torch.arange(3 << 20, dtype=torch.float32)}, str(f))
        monkeypatch.setattr(fp, "content_probe", probe if check else (lambda _p: "no check"))
        before = fp.file_sha256(f, memo)
        assert before == hashlib.sha256(f.read_bytes()).hexdigest()
        _edit_in_place_keeping_size_and_mtime(f, fp._sample_offsets(f.stat().st_size)[10] + 100, 4096)
        return before, fp.file_sha256(f, memo)

    before, after = run(check=False)
    assert after == before  # the bug: a stale hit
    before, after = run(check=True)
    assert after == hashlib.sha256(f.read_bytes()).hexdigest() != before


def test_lora_reference_cache_ignores_the_adapters(tmp_path, cache_dir):
    """With LoRA the key is the base model's: a reseeded LoRA run (other adapters from the start, and
    another lr) on the same base model and data hits the cache. Both runs used to take seed 0, so
    their adapters were identical and a key that covered the adapters hit too; the adapters are
    checked to differ here. (val_size 0: the validation split depends on the seed; the base model is
    given as a path, since `--model tiny` builds it from the seed.)"""
    from safetensors.torch import load_file

    cache = str(tmp_path / "cache")
    first = Trainer(cfg(tmp_path / "a", cache, lora=4, max_steps=1, seed=0, val_size=0, save_every=1))
    a = first.run()
    assert not a.ref_stats.cache_hit
    base = first.plan.model_source
    b = Trainer(cfg(tmp_path / "b", cache, model=base, lora=4, max_steps=1, seed=1, val_size=0, save_every=1,
                    lr=3e-3)).run()
    assert b.ref_stats.cache_hit and b.ref_stats.forwards == 0
    ad_a, ad_b = (load_file(str(tmp_path / r / "run" / "checkpoints" / "step-1" / "adapter_model.safetensors"))
                  for r in "ab")
    lora_a = [k for k in ad_a if "lora_A" in k]
    assert lora_a and sorted(ad_a) == sorted(ad_b)
    # one step at lr <= 3e-3 moves an entry by about lr; the seeds' initial A matrices differ by far more
    assert all((ad_a[k] - ad_b[k]).abs().max() > 0.05 for k in lora_a)


@pytest.mark.parametrize("damage", ["truncated", "zeroed_values"])
def test_damaged_reference_cache_is_recomputed(tmp_path, capsys, damage):
    """A truncated cache file crashed the run; one whose values were zeroed (header intact) was used."""
    cache = str(tmp_path / "cache")
    a = Trainer(cfg(tmp_path / "a", cache, max_steps=2)).run()
    files = sorted((tmp_path / "cache" / "refcache").glob("*.safetensors"))
    assert files
    for f in files:
        data = f.read_bytes()
        if damage == "truncated":
            f.write_bytes(data[: len(data) - 7])
        else:
            header_len = 8 + int.from_bytes(data[:8], "little")
            f.write_bytes(data[:header_len] + bytes(len(data) - header_len))
    capsys.readouterr()
    b = Trainer(cfg(tmp_path / "b", cache, max_steps=2)).run()
    out = capsys.readouterr().out
    assert not b.ref_stats.cache_hit and b.ref_stats.forwards > 0
    assert ("is damaged" if damage == "truncated" else "fails its checksum") in out
    assert losses(b.run_dir) == losses(a.run_dir)


def test_metrics_survive_a_line_cut_by_a_crash(tmp_path):
    from inspo_core.rundir import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 0.5})
    with open(log.path, "a") as f:
        f.write('{"step": 2, "lo')
    assert log.rows() == [{"step": 1, "loss": 0.5}]
    log.truncate_after(5)
    assert json.loads(log.path.read_text()) == {"step": 1, "loss": 0.5}


@pytest.mark.parametrize("model, message", [
    ("/nonexistent/model", "does not exist"),
    ("NOT_A_MODEL_DIR", "is a directory without config.json"),
])
def test_a_model_that_is_not_there_is_a_clear_error(tmp_path, cache_dir, model, message):
    """--model /nonexistent and a non-model directory gave transformers' internals ("install sentencepiece")."""
    if model == "NOT_A_MODEL_DIR":
        model = str(tmp_path / "notes")
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=message):
        Trainer(cfg(tmp_path, cache_dir, model=model)).run()


def test_yaml_values_of_the_wrong_type_are_reported_together(tmp_path):
    """batch_size: 2.5 failed at step 1; lr: [1, 2] with a TypeError."""
    from inspo_core.config import TrainConfig, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 2.5\nlr: [1, 2]\nbf16: maybe\nmax_steps: 3.0\n")
    with pytest.raises(ValueError) as err:
        load_config(TrainConfig, bad)
    msg = str(err.value)
    assert "batch_size: expected an integer, got 2.5" in msg and "lr: expected a number, got [1, 2]" in msg
    assert "bf16: expected true or false, got 'maybe'" in msg and "max_steps" not in msg  # 3.0 is an integer
