"""Shape search under a parameter budget: exact candidate counts within the tolerance, a search on a
trained tiny teacher that does no worse than a hand-picked shape of the same size, the stage artifact
(search.json, search.png) and the dry run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA

from minima.compress.prune import Shape, prune_model, student_config
from minima.compress.search import adapt_multiple, approx_params, candidate_shapes, retrain, search_shape
from minima.core.config import PruneConfig, PruneSearchConfig
from minima.core.errors import ConfigError
from minima.core.presets import TINY_STUDENT
from minima.models.counts import count_params
from minima.testing import lm_blocks, perplexity, tiny_llama, tiny_llama_config, train_tiny_lm

VOCAB = 256  # byte-level ids
HAND = Shape(
    TINY_STUDENT["num_hidden_layers"],
    TINY_STUDENT["num_attention_heads"],
    TINY_STUDENT["num_key_value_heads"],
    TINY_STUDENT["intermediate_size"],
    TINY_STUDENT["hidden_size"],
)
SHAKESPEARE = SHARED_DATA / "text" / "tinyshakespeare.txt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_multiple_adapts_to_the_teacher():
    assert adapt_multiple(4096, 128) == 128 and adapt_multiple(11008, 128) == 128
    assert adapt_multiple(128, 128) == 16 and adapt_multiple(256, 128) == 32
    assert adapt_multiple(96, 64) == 8 and adapt_multiple(7, 64) == 1


def test_candidates_are_exact_counts_within_the_tolerance_and_include_the_hand_picked_shape():
    cfg = tiny_llama_config(VOCAB)
    target = count_params(student_config(cfg, HAND))
    s = PruneSearchConfig()
    cands = candidate_shapes(cfg, target, s)
    assert HAND in [c.shape for c in cands]
    for c in cands:
        assert c.params == count_params(student_config(cfg, c.shape)) == approx_params(cfg, c.shape)
        assert abs(c.params - target) <= s.tolerance * target
        assert c.shape.hidden_size % 16 == 0 and c.shape.intermediate_size % 32 == 0
        assert c.shape.num_layers >= 2 and c.shape.hidden_size >= 64
    assert len({c.shape for c in cands}) == len(cands) > 1
    with pytest.raises(ConfigError, match="no shape within"):
        candidate_shapes(cfg, target / 10, s)


def test_dry_run_lists_7b_candidates_at_multiples_of_128(capsys):
    from minima.cli import main

    assert main(["prune", "dry_run=true", "target_params=3.0e9", "search.max_candidates=6"]) == 0
    out = capsys.readouterr().out
    rows = [r.split() for r in out.splitlines() if r.strip().endswith("-") and r.split()[0].isdigit()]
    assert len(rows) == 6 and "nothing loaded" in out
    for r in rows:
        assert int(r[3]) % 128 == 0 and int(r[4]) % 128 == 0 and r[5].startswith(("2.9", "3.0"))
    with pytest.raises(Exception, match="either the budget or the dims"):
        PruneConfig(target_params=3e9, num_layers=24)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny teacher trained on real text (200 AdamW steps); calibration batches and held-out blocks.

    The same teacher as test_prune's (same data, steps and seed), so the session trains it once.
    """
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    ids = torch.tensor(list(SHAKESPEARE.read_bytes()[:300_000]), dtype=torch.long)
    split = int(len(ids) * 0.9)
    train, held = lm_blocks(ids[:split], 64), lm_blocks(ids[split:], 64)[:48]
    cache = tmp_path_factory.getbasetemp() / "prune_trained_teacher.pt"
    if cache.is_file():
        teacher = tiny_llama(VOCAB, seed=0)
        teacher.load_state_dict(torch.load(cache, weights_only=True))
    else:
        teacher = train_tiny_lm(train, VOCAB, steps=200, batch_size=8, lr=3e-3)
        torch.save(teacher.state_dict(), cache)
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": train[torch.randint(0, len(train), (4,), generator=g)]} for _ in range(24)]
    return teacher, calib, held


def test_search_finds_a_shape_no_worse_than_the_hand_picked_one(trained):
    """Budget = the hand-picked shape's count. After pruning alone, and after the same short retraining,
    the searched shape's held-out perplexity is no worse than the hand-picked shape's."""
    teacher, calib, held = trained
    target = count_params(student_config(teacher.config, HAND))
    rest = calib[8:]  # score_samples=32 holds out the first 8 batches of 4 to score candidates
    for steps in (0, 30):
        s = PruneSearchConfig(top_k=5, retrain_steps=steps, lr=1e-3, score_samples=32)
        res = search_shape(teacher, calib, target, s)
        assert sum(c.chosen for c in res.candidates) == 1 and HAND in [c.shape for c in res.candidates]
        hand, _ = prune_model(teacher, rest, HAND)  # same importance data as the search
        hand = retrain(hand, teacher, rest, s)
        found, ref = perplexity(res.student, held), perplexity(hand, held)
        assert found <= ref, (steps, res.chosen.shape, found, ref)
        assert count_params(res.student) == res.chosen.params
        if steps:
            assert all(c.loss_retrained is not None for c in res.candidates)  # top_k covers all
            # the retrained winner's score is the lowest; retraining lowered every loss
            assert res.chosen.loss_retrained == min(c.loss_retrained for c in res.candidates)
            assert all(c.loss_retrained < c.loss_pruned for c in res.candidates)


@pytest.fixture(scope="module")
def records(tmp_path_factory, tiny_tokenizer_dir, demo_data_dir):
    """Small lm records (the first 300 lines of the demo corpus, 32 tokens each)."""
    from minima.core.config import RecordsConfig
    from minima.stages.records import run as build_records

    d = tmp_path_factory.mktemp("search_records")
    lines = (demo_data_dir / "text" / "pretrain_en.txt").read_text().splitlines()[:300]
    (d / "text.txt").write_text("\n".join(lines))
    cfg = RecordsConfig(
        inputs=str(d / "text.txt"),
        tokenizer=str(tiny_tokenizer_dir),
        format="lm",
        max_length=32,
        dev_fraction=0.05,
        out_dir=str(d / "records"),
    )
    return build_records(cfg).path


def test_stage_writes_search_json_and_the_chosen_shape(tmp_path, tiny_model_dir, records):
    from transformers import AutoModelForCausalLM

    from minima.stages.prune import run

    teacher_cfg = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    target = count_params(student_config(teacher_cfg, HAND))
    cfg = PruneConfig(
        teacher=str(tiny_model_dir),
        records=str(records),
        out_dir=str(tmp_path / "pruned"),
        num_samples=16,
        max_length=32,
        batch_size=4,
        target_params=target,
        search=PruneSearchConfig(top_k=2, retrain_steps=2, score_samples=8, tolerance=0.02),
    )
    art = run(cfg)
    out = art.path
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "search.json").read_text())
    rows = doc["candidates"]
    assert len(rows) > 1 and sum(r["chosen"] for r in rows) == 1
    assert sum(r["loss_retrained"] is not None for r in rows) == 2
    assert all(r["loss_pruned"] is not None and abs(r["params"] - target) <= 0.02 * target for r in rows)
    chosen = next(r for r in rows if r["chosen"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert Shape.of(model.config) == Shape(*(chosen[k] for k in Shape.__dataclass_fields__))
    assert count_params(model) == chosen["params"] == art.metrics["params_after"]
    with pytest.raises(ConfigError, match="no shape within"):  # before any weight is loaded
        run(cfg.model_copy(update={"target_params": target / 20, "out_dir": str(tmp_path / "y")}))
    assert not (tmp_path / "y").exists()


def test_retraining_from_a_full_vocab_logit_cache_equals_retraining_against_the_teacher(
    tmp_path, tiny_model_dir, records
):
    """A top-k cache with k = vocab (fp32) holds the teacher's whole distribution, so the search's
    retraining steps from it must give the same student as running the teacher; the stage uses it."""
    from transformers import AutoModelForCausalLM

    from minima.core.config import DistillCacheConfig
    from minima.stages.distill import build_cache
    from minima.stages.prune import cached_batches, run

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cache = build_cache(
        DistillCacheConfig(
            teacher=str(tiny_model_dir),
            records=str(records),
            top_k=teacher.config.vocab_size,
            dtype="fp32",
            out_dir=str(tmp_path / "cache"),
            batch_size=8,
        )
    ).path
    batches = cached_batches(records, cache, 3, 4)
    assert len(batches) == 3 and batches[0]["kd_ids"].shape[-1] == teacher.config.vocab_size
    plain = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    s = PruneSearchConfig(retrain_steps=3, lr=1e-3)
    target = {"num_layers": 3, "intermediate_size": 192}
    p0 = prune_model(teacher, plain, target)[0]
    a = retrain(prune_model(teacher, plain, target)[0], teacher, batches, s)
    b = retrain(prune_model(teacher, plain, target)[0], teacher, plain, s)
    moved = 0.0
    for (name, pa), pb, q in zip(a.named_parameters(), b.parameters(), p0.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4, msg=name)
        moved = max(moved, float((pa - q).detach().abs().max()))
    assert moved > 1e-4  # the steps did train

    target = count_params(student_config(teacher.config, HAND))
    art = run(
        PruneConfig(
            teacher=str(tiny_model_dir),
            records=str(records),
            out_dir=str(tmp_path / "pruned"),
            num_samples=16,
            max_length=32,
            batch_size=4,
            target_params=target,
            search=PruneSearchConfig(top_k=1, retrain_steps=2, score_samples=8, tolerance=0.02, logit_cache=str(cache)),
        )
    )
    assert art.metrics["search_retrain_targets"] == "logit_cache"
