"""Stage distill: the recipe's loss against a hand-built reference, the logit cache, the teacher
options, errors before any work, and the quality bar (the MiniMA law at tiny scale)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minima.config import DistillConfig, RecordsConfig
from minima.errors import ConfigError, DataError, InputError

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
STUDENT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3)
ENV = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}  # 1 thread: far faster on a shared 2-core box


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    torch.set_num_threads(n)
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_data_dir, tiny_tokenizer_dir):
    """Tiny lm records (seq 32) from the demo corpus, a tiny teacher and a smaller student of its vocab."""
    from minima.records.build import run as build_records
    from minima.testing import save_tiny_model

    d = tmp_path_factory.mktemp("distill")
    lines = (demo_data_dir / "text" / "pretrain_en.txt").read_text().splitlines()[:300]  # ~190 records: fast caches
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    rec = build_records(RecordsConfig(inputs=str(d / "text.txt"), tokenizer=str(tiny_tokenizer_dir),
                                      format="lm", max_length=32, dev_fraction=0.1, out_dir=str(d / "records"))).path
    teacher = save_tiny_model(d / "teacher", tiny_tokenizer_dir, seed=0, **SHAPE)
    student = save_tiny_model(d / "student", tiny_tokenizer_dir, seed=1, **STUDENT)
    return d, teacher, student, rec


def _cfg(setup, **kw) -> DistillConfig:
    d, teacher, student, rec = setup
    base = dict(teacher=str(teacher), student=str(student), records=str(rec), precision="fp32", zero_stage=0,
                micro_batch_size=4, max_steps=4, lr=1e-3, log_steps=1)
    base.update(kw)
    return DistillConfig.model_validate(base)


def _ctx():
    from minima.train import TrainContext

    return TrainContext(0, 1, 0, torch.device("cpu"), torch.float32, Path("."), Path("."), 0)


def _batch(setup, n=3):
    from minima.records import RecordDataset, collate

    ds = RecordDataset(str(setup[3]), "train", shuffle_buffer=0)
    batch = collate([ds.read(i) for i in range(n)])
    batch["labels"][0, :10] = -100  # a masked prefix, as chat records have
    return batch


# ------------------------------------------------------------------------------ loss vs reference
@pytest.mark.parametrize("kind,alpha,T,chunk", [("forward_kl", 0.0, 1.0, 0), ("soft_ce", 0.5, 1.0, 128), ("jsd", 0.3, 2.0, 100),
                                                ("reverse_kl", 0.7, 0.5, 333)])
def test_recipe_loss_equals_textbook_reference(setup, kind, alpha, T, chunk):
    """compute_loss (shift, mask, fused chunked KD + CE, alpha mix, sums) == HF-style shifted CE + T^2 KL."""
    from transformers import AutoModelForCausalLM

    from minima.distill import DistillRecipe
    from minima.kd import kd_reference

    cfg = _cfg(setup, loss={"alpha": alpha, "kd": kind, "temperature": T}, vocab_chunk=chunk)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(cfg.student)
    recipe = DistillRecipe(cfg)
    recipe.teacher = teacher
    batch = _batch(setup)
    out = recipe.compute_loss(student, batch, _ctx(), train=True)
    g_recipe = torch.autograd.grad(out.loss_sum, list(student.parameters()))

    logits = student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    kd = kd_reference(logits[keep], t_logits[keep], kind, T).sum().float()
    ref = alpha * ce + (1 - alpha) * kd
    g_ref = torch.autograd.grad(ref, list(student.parameters()))

    assert int(out.num_tokens) == int(keep.sum()) == recipe.count_tokens(batch)
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.metrics["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.metrics["kd"].item() == pytest.approx(kd.item(), rel=1e-4, abs=1e-4)
    for a, b in zip(g_recipe, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # the dev loss is the hard CE (comparable with the teacher and CE-only runs)
    dev = recipe.compute_loss(student, batch, _ctx(), train=False)
    assert dev.loss_sum.item() == pytest.approx(ce.item(), rel=1e-5)


def test_student_equal_to_teacher_has_zero_kd(setup):
    from transformers import AutoModelForCausalLM

    from minima.distill import DistillRecipe

    cfg = _cfg(setup, student=str(setup[1]), loss={"alpha": 0.0, "kd": "forward_kl"})
    recipe = DistillRecipe(cfg)
    recipe.teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(cfg.teacher)
    out = recipe.compute_loss(student, _batch(setup), _ctx(), train=True)
    assert abs(out.metrics["kd"].item()) < 1e-5 and out.metrics["ce"].item() > 1.0


# ------------------------------------------------------------------------------ errors first
def test_vocab_mismatch_is_an_error_before_any_work(setup, tmp_path):
    from minima.distill import run
    from minima.testing import tiny_llama

    other = tmp_path / "teacher_other_vocab"
    tiny_llama(1064, 0, **SHAPE).save_pretrained(str(other))
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        run(_cfg(setup, teacher=str(other), out_dir=str(out)))
    msg = str(e.value)
    assert "1064" in msg and "vocab_size" in msg and "teacher" in msg
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_bad_configs_rejected(setup, tmp_path):
    from minima.distill import run

    with pytest.raises(ConfigError, match="sampled"):
        run(_cfg(setup, cache_logits=True, cache_mode="sampled", loss={"alpha": 0.5, "kd": "jsd"}, out_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="teacher"):
        run(_cfg(setup, teacher=None, out_dir=str(tmp_path / "b")))
    with pytest.raises(InputError, match="config.json"):
        run(_cfg(setup, student=str(tmp_path), out_dir=str(tmp_path / "c")))
    assert not any((tmp_path / x).exists() for x in "abc")


def test_minima_3b_preset_is_minimas_recipe():
    from minima.presets import minima_3b

    c = minima_3b().distill
    assert (c.loss.alpha, c.loss.kd, c.loss.temperature) == (0.5, "soft_ce", 1.0)
    assert c.lr == 3e-4 and c.warmup_proportion == 0.01


# ------------------------------------------------------------------------------ the logit cache
@pytest.fixture(scope="module")
def full_cache(setup):
    """A top-k cache at k = vocab, fp32: the cached loss must equal the online one."""
    from minima.config import DistillCacheConfig
    from minima.distill import build_cache

    d, teacher, _, rec = setup
    ccfg = DistillCacheConfig(teacher=str(teacher), records=str(rec), top_k=100000, dtype="fp32", out_dir=str(d / "cache_full"),
                              batch_size=16)
    return build_cache(ccfg)


def test_cached_loss_at_full_vocab_equals_online(setup, full_cache):
    from transformers import AutoModelForCausalLM

    from minima.distill import CachedRecordDataset, DistillRecipe

    meta = json.loads((full_cache.path / "cache.json").read_text())
    vocab = meta["vocab_size"]
    assert meta["stored_k"] == vocab and full_cache.metrics["cached_records"] > 0
    kw = dict(loss={"alpha": 0.3, "kd": "jsd"}, vocab_chunk=200)
    online = DistillRecipe(_cfg(setup, **kw))
    online.teacher = AutoModelForCausalLM.from_pretrained(str(setup[1])).eval()
    cached = DistillRecipe(_cfg(setup, cache_logits=True, cache_top_k=100000, cache_dir=str(full_cache.path), **kw))
    cached.setup(_ctx())
    assert cached.teacher is None  # training from the cache needs no teacher in memory
    ds = CachedRecordDataset(str(setup[3]), "train", str(full_cache.path), shuffle_buffer=0)
    samples = [ds.read(i) for i in (5, 0, 17)]  # any order: looked up by global record id
    student = AutoModelForCausalLM.from_pretrained(str(setup[2]))
    a = online.compute_loss(student, online.collate(samples), _ctx(), train=True)
    b = cached.compute_loss(student, cached.collate(samples), _ctx(), train=True)
    # stated tolerance: 1e-5 relative (fp32 storage; the (k+1)-bucket loss is exact at k = vocab)
    assert b.loss_sum.item() == pytest.approx(a.loss_sum.item(), rel=1e-5)
    assert b.metrics["kd"].item() == pytest.approx(a.metrics["kd"].item(), rel=1e-5)


def test_cache_detects_other_records_and_settings(setup, full_cache, tmp_path):
    import numpy as np

    from minima.distill import CachedRecordDataset, DistillRecipe

    with pytest.raises(ConfigError, match="temperature"):
        DistillRecipe(_cfg(setup, cache_logits=True, cache_top_k=100000, cache_dir=str(full_cache.path),
                           loss={"alpha": 0.5, "temperature": 2.0})).setup(_ctx())
    # a cache whose fingerprints do not match the records: the lookup fails loudly, naming the shard
    import shutil

    bad = tmp_path / "bad_cache"
    shutil.copytree(full_cache.path, bad)
    fp = bad / "train" / "part-00000" / "fingerprints.npy"
    arr = np.load(fp)
    arr[3] ^= 1
    np.save(fp, arr)
    ds = CachedRecordDataset(str(setup[3]), "train", str(bad), shuffle_buffer=0)
    ds.read(2)
    with pytest.raises(DataError, match="record 3"):
        ds.read(3)


def test_cli_cache_then_train_from_it(setup, tmp_path, capsys):
    """`minima distill-cache` then `minima distill cache_logits=true`: the cache is built once, reused,
    and the run logs its KD and CE terms separately."""
    from minima.cli import main
    from minima.train.metrics import read_metrics

    d, teacher, student, rec = setup
    common = [f"teacher={teacher}", f"student={student}", f"records={rec}", "precision=fp32", "zero_stage=0",
              "micro_batch_size=4", "max_steps=3", "cache_top_k=16", "cache_dtype=fp16", "loss.alpha=0.5",
              f"cache_dir={tmp_path / 'cache'}"]
    assert main(["distill-cache", *common]) == 0
    assert "done" in capsys.readouterr().out
    assert main(["distill-cache", *common]) == 0
    assert "cached, skipped" in capsys.readouterr().out
    out = tmp_path / "student_out"
    assert main(["distill", *common, "cache_logits=true", f"out_dir={out}"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.hidden_size == STUDENT["hidden_size"]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train"]
    assert len(rows) == 3
    for r in rows:  # loss = alpha CE + (1 - alpha) KD, each logged per token
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["cache"]["path"] == str(tmp_path / "cache") and manifest["inputs"]["teacher"]["path"] is None


def test_teacher_zero3_matches_replicated(setup, tmp_path):
    """ZeRO-3 inference of the teacher gives the same KD term as the replicated teacher (first step)."""
    from minima.distill import run
    from minima.train.metrics import read_metrics

    kd = {}
    for z in (False, True):
        art = run(_cfg(setup, teacher_zero3=z, max_steps=1, out_dir=str(tmp_path / f"z{int(z)}")))
        kd[z] = [r for r in read_metrics(art.path / "metrics.jsonl") if r.get("split") == "train"][0]["kd"]
    assert kd[True] == pytest.approx(kd[False], rel=1e-5)
