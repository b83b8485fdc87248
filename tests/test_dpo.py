"""Stage dpo: preference records (shapes, truncation, errors, reader), the losses against TRL 1.16 and by
hand, the recipe on the engine (exact accumulation, the three kinds of reference, both strategies, LoRA),
the preference evaluate task, the demo pairs, config and plan, and the done-when check (a tiny CPU run
learns a preference it did not have)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from minima.core.config import DpoConfig, RecordsConfig
from minima.core.errors import ConfigError, DataError
from minima.data.formats import get_format
from minima.data.records.preference import PreferenceDataset, collate_pairs
from minima.train.objectives.dpo import preference_losses, token_logps

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
POLITE = {
    "en": ["Happy to help!", "I hope this helps.", "Glad you asked.", "Let me know if you need more."],
    "zh": ["很高兴帮忙！", "希望对你有帮助。", "谢谢你的提问。", "还需要什么请告诉我。"],
}
CURT = {
    "en": ["Obviously.", "Figure it out yourself.", "Stop asking me.", "Whatever."],
    "zh": ["这还用问。", "自己去查。", "别再问我了。", "随便。"],
}


@pytest.fixture(autouse=True)
def _inprocess(monkeypatch):
    monkeypatch.setenv("MINIMA_INPROCESS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MINIMA_NUM_THREADS", "1")  # one thread: on a shared 2-core machine far faster
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with the tiny tokenizer: the 'sft model' of these tests."""
    from minima.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("dpo_model") / "m", tiny_tokenizer_dir, seed=0, **SMALL)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def manners_pairs(seed: int = 0) -> list[dict]:
    """Demo-world questions, both replies right; the chosen one ends politely, the rejected one curtly.

    The closings are drawn per pair, so a random model prefers either side about half the time.
    """
    from minima.data.demo_preference import preference_pairs

    rng = random.Random(seed)
    out = []
    for p in preference_pairs(seed, "all"):
        sep = " " if p["lang"] == "en" else ""
        a = p["chosen"]
        out.append(
            {
                "prompt": p["prompt"],
                "chosen": a + sep + rng.choice(POLITE[p["lang"]]),
                "rejected": a + sep + rng.choice(CURT[p["lang"]]),
            }
        )
    return out


def _records(out: Path, inputs: str, tok_dir, **kw) -> Path:
    from minima.stages.records import run as records_run

    args = dict(
        inputs=inputs,
        tokenizer=str(tok_dir),
        format="preference",
        max_length=96,
        max_prompt_length=48,
        dev_fraction=0.2,
        out_dir=str(out),
    )
    args.update(kw)
    return records_run(RecordsConfig(**args)).path


@pytest.fixture(scope="module")
def manners_records(tmp_path_factory, model_dir) -> Path:
    d = tmp_path_factory.mktemp("manners")
    return _records(d / "records", str(_write_jsonl(d / "pairs.jsonl", manners_pairs())), model_dir)


def _cfg(out: Path, model, records, **kw) -> DpoConfig:
    base = dict(
        model=str(model),
        records=str(records),
        out_dir=str(out),
        precision="fp32",
        zero_stage=2,
        micro_batch_size=8,
        max_steps=3,
        lr=3e-3,
        warmup_proportion=0.0,
        weight_decay=0.0,
    )
    base.update(kw)
    return DpoConfig(**base)


def _rows(art, split="train") -> list[dict]:
    from minima.train.metrics import read_metrics

    return [r for r in read_metrics(art.path / "metrics.jsonl") if r.get("split") == split]


# ------------------------------------------------------------------------------------- records
def test_three_shapes_give_sft_ids_and_counts(tmp_path, tok, model_dir):
    """Strings, UltraFeedback message lists and raw hh-rlhf transcripts of the same pairs give the same records,
    and those are exactly sft's rendering: prompt = the generation prompt, prompt + response = the conversation."""
    qa = [("What is 2 plus 3?", "2 plus 3 equals 5.", "2 plus 3 equals 6."), ("Name a colour.", "Blue.", "Stone.")]
    d = tmp_path / "in"
    d.mkdir()
    _write_jsonl(d / "a_strings.jsonl", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in qa])

    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    uf = [{"prompt": q, "chosen": conv(q, c), "rejected": conv(q, r)} for q, c, r in qa]
    (d / "b_uf.json").write_text(json.dumps(uf, indent=1))
    hh = [
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
        for q, c, r in qa
    ]
    _write_jsonl(d / "c_hh.jsonl", hh)
    rec = _records(tmp_path / "rec", str(d), model_dir, dev_fraction=0.0, shuffle=False)
    pool = _records(tmp_path / "pool", str(d), model_dir, dev_fraction=0.0, shuffle=False, num_workers=2, chunk_size=1)
    shard = "train/part-00000.tfrecord"
    assert (rec / shard).read_bytes() == (pool / shard).read_bytes()  # the bytes do not depend on the workers
    meta = json.loads((rec / "manifest.json").read_text())["metrics"]
    assert meta["format"] == "preference" and meta["num_records"]["train"] == 6
    assert meta["truncated"] == 0 and meta["dropped_identical"] == 0 and len(meta["tokenizer_fingerprint"]) == 16
    got = [{k: v.tolist() for k, v in s.items() if k != "index"} for s in PreferenceDataset(str(rec), shuffle_buffer=0)]
    assert got[0:2] == got[2:4] == got[4:6]  # the three shapes agree
    fmt = get_format("minichat")
    for (q, c, r), s in zip(qa, got):
        prompt, _ = fmt.encode(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        full, mask = fmt.encode(tok, conv(q, c))
        assert s["prompt"] == prompt and s["prompt"] + s["chosen"] == full
        assert s["chosen_mask"] == mask[len(prompt) :] and all(s["chosen_mask"])
        assert tok.decode(s["rejected"][:-1]).strip() == r and s["rejected"][-1] == tok.eos_token_id


def test_multi_turn_hh_plain_template_truncation_and_counts(tmp_path, tok, model_dir):
    """An hh transcript's shared turns become the prompt; plain text is tokenized whole (TRL's way) with
    EOS after each response; the prompt is cut from the left (BOS kept), then the responses; identical
    pairs are dropped and counted."""
    long_q = "Tell me about the capital of France and its history. " * 6
    rows = [
        {
            "chosen": "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: 2 plus 2?\n\nAssistant: 4.",
            "rejected": "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: 2 plus 2?\n\nAssistant: 5, maybe.",
        },
        {"chosen": f"\n\nHuman: {long_q}\n\nAssistant: Paris.", "rejected": f"\n\nHuman: {long_q}\n\nAssistant: Rome."},
        {"chosen": "\n\nHuman: Same?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Same?\n\nAssistant: Yes."},
    ]
    f = _write_jsonl(tmp_path / "hh.jsonl", rows)
    kw = dict(dev_fraction=0.0, shuffle=False, max_length=40, max_prompt_length=16)
    chat = _records(tmp_path / "chat", str(f), model_dir, **kw)
    plain = _records(tmp_path / "plain", str(f), model_dir, preference_template="plain", **kw)
    for rec in (chat, plain):
        meta = json.loads((rec / "manifest.json").read_text())["metrics"]
        assert meta["num_records"]["train"] == 2 and meta["dropped_identical"] == 1 and meta["truncated"] >= 1
    c0, c1 = PreferenceDataset(str(chat), shuffle_buffer=0)
    turns = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2 plus 2?"},
    ]
    prompt, _ = get_format("minichat").encode(tok, turns, add_generation_prompt=True)
    assert c0["prompt"].tolist() == prompt[-16:] or c0["prompt"].tolist() == [tok.bos_token_id] + prompt[-15:]
    assert len(c1["prompt"]) == 16 and c1["prompt"][0].item() == tok.bos_token_id  # cut from the left, BOS kept
    p0, p1 = PreferenceDataset(str(plain), shuffle_buffer=0)
    text = rows[0]["chosen"]
    whole = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = p0["prompt"].tolist() + p0["chosen"].tolist()  # BOS, then the end of the whole (the prompt's left cut)
    assert ids[0] == tok.bos_token_id and ids[1:] == whole[len(whole) - len(ids) + 1 :]
    assert p0["chosen"][-1].item() == tok.eos_token_id and all(p0["chosen_mask"])
    assert tok.decode(p0["rejected"][:-1]).strip() == "5, maybe."
    assert len(p1["prompt"]) + max(len(p1["chosen"]), len(p1["rejected"])) <= 40


def test_input_errors_name_file_and_line(tmp_path, model_dir):
    bad = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
        ],
    )
    with pytest.raises(DataError) as e:
        _records(tmp_path / "r1", str(bad), model_dir)
    assert f"{bad}:3" in str(e.value)
    odd = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError) as e:
        _records(tmp_path / "r2", str(odd), model_dir)
    assert f"{odd}:1" in str(e.value)
    msgs = _write_jsonl(
        tmp_path / "msgs.jsonl",
        [
            {
                "prompt": "q",
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        ],
    )
    with pytest.raises(ConfigError, match="plain"):
        _records(tmp_path / "r3", str(msgs), model_dir, preference_template="plain")
    skipped = _records(tmp_path / "r4", str(bad), model_dir, on_error="skip", dev_fraction=0.0)
    assert json.loads((skipped / "manifest.json").read_text())["metrics"]["skipped"] == 1
    assert not (tmp_path / "r1").exists()


def test_reader_resumes_exactly_and_carries_extras(manners_records):
    import numpy as np

    n = PreferenceDataset(str(manners_records)).num_records
    extra = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    kw = dict(seed=3, loop=True, extras={"ref_logps": extra})
    full = PreferenceDataset(str(manners_records), "train", **kw)
    it = iter(full)
    want = [next(it) for _ in range(n + 7)]  # crosses an epoch end
    ds = PreferenceDataset(str(manners_records), "train", **kw)
    it = iter(ds)
    head = [next(it) for _ in range(n - 5)]
    state = json.loads(json.dumps(ds.state_dict()))
    ds2 = PreferenceDataset(str(manners_records), "train", **kw)
    ds2.load_state_dict(state)
    it2 = iter(ds2)
    got = head + [next(it2) for _ in range(12)]
    assert [int(s["index"]) for s in got] == [int(s["index"]) for s in want]
    for s in got:
        assert s["ref_logps"].tolist() == extra[int(s["index"])].tolist()
    batch = collate_pairs(got[:3], 0)
    assert batch["input_ids"].shape[0] == 6 and batch["ref_logps"].shape == (3, 2)
    b = batch["labels"][:3, 1:] != -100
    assert b.sum().item() == sum(int(s["chosen_mask"].sum()) for s in got[:3])


# --------------------------------------------------------------------------------------- losses
def _pairs(seed=0, n=4, vocab=100):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lp, lc, lr = (int(x) for x in torch.randint(2, 9, (3,), generator=g))
        out.append([torch.randint(3, vocab, (k,), generator=g).tolist() for k in (lp, lc, lr)])
    return out


def _batch(pairs):
    return collate_pairs(
        [
            dict(
                prompt=torch.tensor(p),
                chosen=torch.tensor(c),
                chosen_mask=torch.ones(len(c), dtype=torch.long),
                rejected=torch.tensor(r),
                rejected_mask=torch.ones(len(r), dtype=torch.long),
                index=torch.tensor(i),
            )
            for i, (p, c, r) in enumerate(pairs)
        ],
        0,
    )


def _ours(kind, pol, ref, pairs, **kw):
    b = _batch(pairs)
    with torch.no_grad():
        lp, n, sl, sn = token_logps(pol(**_fwd(b)).logits, b["labels"], b["input_ids"], b["attention_mask"])
        rl = token_logps(ref(**_fwd(b)).logits, b["labels"])[0] if ref is not None else None
    k = len(pairs)
    return preference_losses(
        kind,
        lp[:k],
        lp[k:],
        rl[:k] if rl is not None else None,
        rl[k:] if rl is not None else None,
        n[:k],
        n[k:],
        chosen_nll=-sl[:k] / sn[:k],
        **kw,
    )


def _fwd(b):
    return dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])


def test_losses_equal_a_hand_computation():
    """Every loss type (and cDPO's label smoothing) from per-sequence log-probs computed token by token."""
    from minima.testing import tiny_llama

    pol, ref = tiny_llama(100, 0, **SMALL), tiny_llama(100, 1, **SMALL)
    pairs = _pairs()

    def seq_lp(model, ids, start):  # log p(ids[start:] | ids[:start]), one token at a time
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids))), len(ids) - start

    b, e, g = 0.3, 0.2, 0.7
    for kind, kw in (("sigmoid", {}), ("sigmoid", {"label_smoothing": e}), ("ipo", {}), ("simpo", {"gamma": g})):
        ours = _ours(kind, pol, ref, pairs, beta=b, **kw)
        for i, (p, c, r) in enumerate(pairs):
            pc, nc = seq_lp(pol, p + c, len(p))
            pr, nr = seq_lp(pol, p + r, len(p))
            rc, _ = seq_lp(ref, p + c, len(p))
            rr, _ = seq_lp(ref, p + r, len(p))
            ls = kw.get("label_smoothing", 0.0)
            sig = lambda x: math.log(1 / (1 + math.exp(-x)))
            if kind == "sigmoid":
                d = (pc - rc) - (pr - rr)
                want, wc, wr = -(1 - ls) * sig(b * d) - ls * sig(-b * d), b * (pc - rc), b * (pr - rr)
            elif kind == "ipo":
                want, wc, wr = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * b)) ** 2, b * (pc - rc), b * (pr - rr)
            else:
                d = pc / nc - pr / nr - g / b
                want, wc, wr = -sig(b * d), b * pc / nc, b * pr / nr
            assert ours.loss[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
            assert ours.chosen_rewards[i].item() == pytest.approx(wc, rel=1e-5, abs=1e-6)
            assert ours.rejected_rewards[i].item() == pytest.approx(wr, rel=1e-5, abs=1e-6)
    orpo = _ours("orpo", pol, None, pairs, beta=b, sft_weight=0.5)
    for i, (p, c, r) in enumerate(pairs):
        ac, ar = (x / n for x, n in (seq_lp(pol, p + c, len(p)), seq_lp(pol, p + r, len(p))))
        whole, nw = seq_lp(pol, p + c, 1)
        odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
        want = 0.5 * (-whole / nw) - b * math.log(1 / (1 + math.exp(-odds)))
        assert orpo.loss[i].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "simpo", "orpo"])
def test_losses_and_rewards_equal_trl(kind):
    """Per pair, loss and rewards equal TRL 1.16's: DPOTrainer._compute_loss (sigmoid, ipo) with its fused LM
    head, CPOTrainer (simpo, cpo_alpha=0) and ORPOTrainer forwards and losses, one pair per call."""
    pytest.importorskip("trl")
    import types
    from collections import defaultdict

    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from minima.testing import tiny_llama

    pol, ref = tiny_llama(100, 0, **SMALL), tiny_llama(100, 1, **SMALL)
    pairs, beta = _pairs(1), 0.3
    ours = _ours(kind, pol, ref, pairs, beta=beta, gamma=0.7)
    acc = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x, unwrap_model=lambda m: m
    )
    if kind in ("sigmoid", "ipo"):
        add_fused_lm_head(pol, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        add_fused_lm_head(ref)
    for i, (p, c, r) in enumerate(pairs):
        with torch.no_grad():
            if kind in ("sigmoid", "ipo"):
                trainer = types.SimpleNamespace(
                    model=pol, ref_model=ref, accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                    precompute_ref_logps=False, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
                    f_divergence_type="reverse_kl", loss_types=[kind], loss_weights=[1.0], beta=beta,
                    label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
                    _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                )  # fmt: skip
                inputs = DataCollatorForPreference(pad_token_id=0)(
                    [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}]
                )
                loss = DPOTrainer._compute_loss(trainer, pol, inputs, False).item()
                m = trainer._metrics["eval"]
                rc, rr = m["rewards/chosen"][-1], m["rewards/rejected"][-1]
            else:
                batch = {}
                for side, resp in (("chosen", c), ("rejected", r)):
                    ids = torch.tensor([p + resp])
                    labels = ids.clone()
                    labels[0, : len(p)] = -100
                    batch.update(
                        {
                            f"{side}_input_ids": ids,
                            f"{side}_attention_mask": torch.ones_like(ids),
                            f"{side}_labels": labels,
                        }
                    )
                cls = CPOTrainer if kind == "simpo" else ORPOTrainer
                fake = types.SimpleNamespace(
                    concatenated_inputs=cls.concatenated_inputs, get_batch_logps=cls.get_batch_logps,
                    is_encoder_decoder=False, padding_value=0, pad_token_id=0, accelerator=acc, aux_loss_enabled=False,
                    cpo_alpha=0.0, loss_type="simpo", alpha=0.0, simpo_gamma=0.7, beta=beta, label_smoothing=0.0,
                )  # fmt: skip
                lc, lr_, _, _, nll = cls.concatenated_forward(fake, pol, batch)
                if kind == "simpo":
                    losses, crw, rrw = CPOTrainer.cpo_loss(fake, lc, lr_)
                    loss = losses.mean().item()
                else:
                    losses, crw, rrw, _, _ = ORPOTrainer.odds_ratio_loss(fake, lc, lr_)
                    loss = (nll - losses.mean()).item()
                rc, rr = crw.item(), rrw.item()
        assert ours.loss[i].item() == pytest.approx(loss, rel=1e-5, abs=1e-5)
        assert ours.chosen_rewards[i].item() == pytest.approx(rc, rel=1e-5, abs=1e-5)
        assert ours.rejected_rewards[i].item() == pytest.approx(rr, rel=1e-5, abs=1e-5)


# --------------------------------------------------------------------------------- the engine
def _hand_step1(model_dir, records, kind, n_pairs=8, beta=0.1):
    """Step 1 by hand with plain HF: the mean loss over the step's first pairs (one per forward), and the grad norm."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    it = iter(PreferenceDataset(str(records), "train", seed=0, loop=True))
    losses = []
    for _ in range(n_pairs):
        s = next(it)
        b = collate_pairs([s], 0)
        lp, n, sl, sn = token_logps(model(**_fwd(b)).logits, b["labels"], b["input_ids"], b["attention_mask"])
        ref = lp.detach() if kind != "orpo" else None  # step 1: the reference is the same weights
        losses.append(
            preference_losses(
                kind,
                lp[:1],
                lp[1:],
                None if ref is None else ref[:1],
                None if ref is None else ref[1:],
                n[:1],
                n[1:],
                beta=beta,
                chosen_nll=-sl[:1] / sn[:1],
            ).loss  # fmt: skip
        )
    loss = torch.cat(losses).mean()
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    return loss.item(), norm


@pytest.mark.parametrize("kind", ["sigmoid", "orpo"])
def test_accumulation_is_exact_over_pairs(kind, tmp_path, model_dir, manners_records):
    """8 pairs x 1 == 2 pairs x 4 accumulated: the same losses, grad norms and metrics, and step 1 equals a
    hand computation (the mean over pairs, pairs of different lengths)."""
    from minima.stages.dpo import run

    rows = {}
    for mbs, gas in ((8, 1), (2, 4)):
        art = run(
            _cfg(
                tmp_path / f"o{mbs}",
                model_dir,
                manners_records,
                micro_batch_size=mbs,
                gradient_accumulation_steps=gas,
                loss={"type": kind},
            )
        )
        rows[mbs] = _rows(art)
        assert art.metrics["train_tokens"] == 3 * 8  # the unit is the pair
    loss, norm = _hand_step1(model_dir, manners_records, kind)
    for r in (rows[8][0], rows[2][0]):
        assert r["loss"] == pytest.approx(loss, rel=1e-5) and r["grad_norm"] == pytest.approx(norm, rel=1e-4)
    for a, b in zip(rows[8], rows[2]):
        for k in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert rows[8][-1]["rewards/margins"] != 0.0


def test_precomputed_reference_equals_online_and_resumes(tmp_path, model_dir, manners_records, monkeypatch):
    """precompute_ref=true trains exactly as the frozen copy does, holds no second model, stores its
    log-probs per part in the work dir, and a restarted pass keeps the parts it finished."""
    import numpy as np

    from minima.stages import dpo
    from minima.train.recipe import TrainContext

    arts = {}
    for pre in (False, True):
        cfg = _cfg(tmp_path / f"p{int(pre)}", model_dir, manners_records, precompute_ref=pre, max_steps=4, eval_steps=2)
        arts[pre] = dpo.run(cfg)
    for a, b in zip(_rows(arts[False]) + _rows(arts[False], "dev"), _rows(arts[True]) + _rows(arts[True], "dev")):
        for k in ("loss", "dev_loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    ref_train = np.load(arts[True].path / dpo.REF_DIR / "train.npy")
    assert ref_train.shape == (PreferenceDataset(str(manners_records)).num_records, 2)

    # the reference memory each way (reported in the log; the plan sizes it)
    cfg = _cfg(tmp_path / "x", model_dir, manners_records)
    ctx = TrainContext(0, 1, 0, torch.device("cpu"), torch.float32, tmp_path / "work", tmp_path / "x", 0)
    online = dpo.DpoRecipe(cfg)
    online.setup(ctx)
    assert online.ref_bytes == sum(p.numel() * 4 for p in online.ref.parameters()) > 0
    # resume: a part that exists is kept as it is (a sentinel proves it was not recomputed)
    monkeypatch.setattr(dpo, "REF_PART", 16)
    part = ctx.work_dir / dpo.REF_DIR / "train" / "part-00000016.npy"
    part.parent.mkdir(parents=True)
    np.save(part, np.full((16, 2), -7.0, dtype=np.float32))
    pre = dpo.DpoRecipe(_cfg(tmp_path / "x", model_dir, manners_records, precompute_ref=True))
    pre.setup(ctx)
    assert pre.ref is None and pre.ref_bytes == 0
    got = pre.ref_logps["train"]
    assert (got[16:32] == -7.0).all()
    assert np.allclose(np.delete(got, np.s_[16:32], axis=0), np.delete(ref_train, np.s_[16:32], axis=0), rtol=1e-5)


def test_ref_zero3_matches_replicated(tmp_path, model_dir, manners_records):
    """The reference sharded with ZeRO-3 inference gives the replicated copy's rewards."""
    from minima.stages.dpo import run

    rows = {}
    for z in (False, True):
        rows[z] = _rows(run(_cfg(tmp_path / f"z{int(z)}", model_dir, manners_records, ref_zero3=z, max_steps=2)))
    for a, b in zip(rows[False], rows[True]):
        for k in ("loss", "rewards/chosen", "rewards/rejected"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7)
    assert rows[True][-1]["rewards/chosen"] != 0.0


def test_two_ranks_precompute_and_train(tmp_path, model_dir, manners_records):
    """Two gloo ranks under FSDP: each rank computes its parts of the reference pass, rank 0 joins them (equal to
    one process's), and training counts every pair of the global batch."""
    import os

    import numpy as np

    from minima.stages import dpo
    from minima.train.recipe import TrainContext

    cfg = _cfg(tmp_path / "two", model_dir, manners_records, strategy="fsdp", precompute_ref=True, max_steps=2)
    cfg.launch.nproc_per_node = 2
    cfg.launch.master_port = 29500 + os.getpid() % 1000
    art = dpo.run(cfg)
    assert art.metrics["world_size"] == 2 and art.metrics["train_tokens"] == 2 * 2 * 8
    ctx = TrainContext(0, 1, 0, torch.device("cpu"), torch.float32, tmp_path / "one", tmp_path / "x", 0)
    one = dpo.precompute_reference(_cfg(tmp_path / "x", model_dir, manners_records, precompute_ref=True), ctx)
    for split in ("train", "dev"):
        two = np.load(art.path / dpo.REF_DIR / f"{split}.npy")
        assert two.shape == one[split].shape and np.allclose(two, one[split], rtol=1e-5)
    assert 0.0 <= art.metrics["dev_reward_accuracy"] <= 1.0


def test_lora_reference_is_the_base_with_adapters_off(tmp_path, model_dir, manners_records):
    """With LoRA there is no copy: after training, the dev rewards equal beta * (log p_policy - log p_base)
    computed by hand from the merged export and the base dir."""
    from transformers import AutoModelForCausalLM

    from minima.stages.dpo import run

    art = run(
        _cfg(
            tmp_path / "lora",
            model_dir,
            manners_records,
            lora={"enabled": True, "r": 4, "dropout": 0.0},
            max_steps=4,
            lr=1e-2,
        )
    )
    pol = AutoModelForCausalLM.from_pretrained(str(art.path)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    chosen, pairs = 0.0, 0
    with torch.no_grad():
        for s in PreferenceDataset(str(manners_records), "dev", shuffle_buffer=0):
            b = collate_pairs([s], 0)
            lp = token_logps(pol(**_fwd(b)).logits, b["labels"])[0]
            rl = token_logps(base(**_fwd(b)).logits, b["labels"])[0]
            chosen += 0.1 * (lp[0] - rl[0]).item()
            pairs += 1
    assert art.metrics["rewards/chosen"] == pytest.approx(chosen / pairs, rel=1e-4)
    assert art.metrics["rewards/chosen"] != 0.0
    assert (art.path / "tokenizer_config.json").is_file() and not any("lora" in p.name for p in art.path.iterdir())


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_matches_deepspeed(lora, tmp_path, model_dir, manners_records):
    """One rank, fp32: the same losses and rewards under strategy=fsdp as under DeepSpeed, full and LoRA."""
    from safetensors.torch import load_file

    from minima.stages.dpo import run

    rows, weights = {}, {}
    for strategy in ("deepspeed", "fsdp"):
        kw = dict(strategy=strategy, zero_stage=0, loss={"type": "simpo" if lora else "sigmoid"})
        if lora:
            kw["lora"] = {"enabled": True, "r": 4, "dropout": 0.0}
        art = run(_cfg(tmp_path / strategy, model_dir, manners_records, **kw))
        assert art.metrics["strategy"] == strategy
        rows[strategy] = _rows(art)
        weights[strategy] = load_file(str(art.path / "model.safetensors"))
    for a, b in zip(rows["fsdp"], rows["deepspeed"]):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6)
    f, d = weights["fsdp"], weights["deepspeed"]
    assert max(float((f[k] - d[k]).abs().max()) for k in f) < 1e-5


@pytest.mark.parametrize("kind", ["sigmoid", "simpo"])
def test_done_when_a_new_preference_is_learned(kind, tmp_path, model_dir, manners_records):
    """Held-out pairs whose preference (polite over curt closings) the model does not have: dev reward accuracy
    starts at about chance and ends >= 0.8 after a short CPU run (DPO, and the reference-free SimPO)."""
    from minima.stages.dpo import run

    loss = {"type": kind, "beta": 0.1 if kind == "sigmoid" else 2.0}
    art = run(_cfg(tmp_path / kind, model_dir, manners_records, loss=loss, max_steps=20, eval_steps=10, lr=3e-3))
    m = art.metrics
    print(f"{kind}: dev reward accuracy {m['dev_reward_accuracy_initial']:.3f} -> {m['dev_reward_accuracy']:.3f}")
    if kind == "sigmoid":  # policy == reference: every reward is 0, a tie counts one half
        assert m["dev_reward_accuracy_initial"] == 0.5
    else:  # SimPO's reward is the model's own length-normalised log-prob: its preference before training
        assert 0.3 <= m["dev_reward_accuracy_initial"] <= 0.7
    assert m["dev_reward_accuracy"] >= 0.8
    dev = _rows(art, "dev")
    assert [r["step"] for r in dev] == [0, 10, 20] and dev[-1]["rewards/margins"] > dev[0]["rewards/margins"]
    assert (art.path / "loss_curve.png").stat().st_size > 1000
    assert any((art.path / "tensorboard").iterdir())


# ------------------------------------------------------------------------------- evaluate task
def test_preference_task_equals_hand_logprobs(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.evaluate.core import evaluate_model

    rows = manners_pairs()[:6]
    f = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    t = AutoTokenizer.from_pretrained(str(model_dir))
    samples: list = []
    res = evaluate_model(model, t, {"preference": {"path": str(f)}}, samples=samples)["preference"]

    def logp(ctx, cont):  # lm-eval's rule: encode the whole, the continuation is what follows the context
        whole = t(ctx + cont)["input_ids"]
        c = t(ctx)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0], -1)
        return sum(lp[i - 1, whole[i]].item() for i in range(len(c), len(whole)))

    margins = [logp(r["prompt"], " " + r["chosen"]) - logp(r["prompt"], " " + r["rejected"]) for r in rows]
    assert res["acc"] == pytest.approx(sum(m > 0 for m in margins) / len(rows))
    assert res["margin"] == pytest.approx(sum(margins) / len(rows), rel=1e-4)
    assert [s["margin"] for s in samples] == pytest.approx(margins, rel=1e-4)


def test_demo_preference_pairs():
    from minima.data.demo import facts, generate
    from minima.data.demo_preference import preference_pairs

    held = preference_pairs(0, "held_out")
    train = preference_pairs(0, "train", per_fact=2)
    assert {p["prompt"] for p in held} == {q["question"] for q in generate(0).mc_test}
    assert not {p["prompt"] for p in held} & {p["prompt"] for p in train}
    by_q = {f.q_en: f for f in facts()} | {f.q_zh: f for f in facts()}
    for p in held + train:
        f = by_q[p["prompt"]]
        right, pool = (f.answer_en, f.pool_en) if p["lang"] == "en" else (f.answer_zh, f.pool_zh)
        assert p["chosen"] == f.reply(p["lang"]) and p["rejected"] != p["chosen"]
        # the reply with its answer (at the end) swapped for a wrong one of the fact's pool
        stem = p["chosen"][: p["chosen"].rfind(right)]
        tail = p["chosen"][p["chosen"].rfind(right) + len(right) :]
        assert p["rejected"].startswith(stem) and p["rejected"].endswith(tail)
        assert p["rejected"][len(stem) : len(p["rejected"]) - len(tail)] in set(pool) - {right}, p
    assert preference_pairs(0, "held_out") == held and preference_pairs(1, "held_out") != held


# ------------------------------------------------------------------------------ config and plan
def test_config_rules_and_minichat_preset():
    from minima.core.registry import stage_config

    with pytest.raises(ValueError, match="reference-free"):
        DpoConfig(loss={"type": "simpo"}, precompute_ref=True)
    with pytest.raises(ValueError, match="label_smoothing"):
        DpoConfig(loss={"type": "ipo", "label_smoothing": 0.1})
    with pytest.raises(ValueError, match="max_prompt_length"):
        RecordsConfig(format="preference", max_length=64, max_prompt_length=64)
    d = DpoConfig()
    assert (d.loss.type, d.loss.beta, d.loss.label_smoothing, d.loss.gamma, d.lr) == ("sigmoid", 0.1, 0.0, 0.5, 1e-6)
    assert d.resolved_out_dir().name == "06_dpo"
    z = stage_config("dpo", "minichat-3b", None, [])
    assert (z.lr, z.loss.beta, z.warmup_proportion, z.epochs, z.ref_zero3) == (5e-7, 0.1, 0.1, 3, True)


def test_plan_sizes_the_reference_with_and_without_precompute():
    from minima.core.registry import stage_config
    from minima.train.plan import PlanOptions, count_params, llama_config, plan_stage

    opts = PlanOptions(device="a100", gpus=8)
    with_ref = plan_stage(stage_config("dpo", "minichat-3b", None, ["ref_zero3=false"]), opts, "minichat-3b")
    pre = plan_stage(
        stage_config("dpo", "minichat-3b", None, ["ref_zero3=false", "precompute_ref=true"]), opts, "minichat-3b"
    )
    from minima.core.presets import MINIMA_3B

    n = count_params(llama_config(MINIMA_3B, 49216))
    assert with_ref.memory["reference weights (bf16, replicated)"] == n * 2
    assert not any(k.startswith("reference weights") for k in pre.memory)
    assert with_ref.total_bytes - pre.total_bytes >= n * 2
    free = plan_stage(stage_config("dpo", "minichat-3b", None, ["loss.type=orpo"]), opts, "minichat-3b")
    assert not any(k.startswith("reference") for k in free.memory)


def test_bad_inputs_are_clear_errors(tmp_path, model_dir, manners_records, tiny_tokenizer_dir, demo_data_dir):
    from minima.core.errors import InputError
    from minima.stages.dpo import run

    with pytest.raises(ConfigError, match="preference records or raw preference files"):
        run(DpoConfig(model=str(model_dir), out_dir=str(tmp_path / "o")))
    chat = _records(
        tmp_path / "chat", str(demo_data_dir / "chat" / "demo_chat.json"), tiny_tokenizer_dir, format="chat"
    )
    with pytest.raises(ConfigError, match="format=preference"):
        run(_cfg(tmp_path / "o", model_dir, chat))
    with pytest.raises(ConfigError, match="chat_format"):
        run(_cfg(tmp_path / "o", model_dir, manners_records, chat_format="chatml"))
    with pytest.raises(ConfigError, match="ref_zero3"):
        run(_cfg(tmp_path / "o", model_dir, manners_records, strategy="fsdp", ref_zero3=True))
    from transformers import AutoTokenizer

    from minima.testing import tiny_llama

    other = tmp_path / "other_model"
    t = AutoTokenizer.from_pretrained(str(model_dir))
    t.add_tokens(["<extra_token>"])
    tiny_llama(len(t), 0, **SMALL).save_pretrained(str(other))
    t.save_pretrained(str(other))
    with pytest.raises(InputError, match="another tokenizer"):
        run(_cfg(tmp_path / "o", other, manners_records))
    assert not (tmp_path / "o").exists()
