"""Hand-computed checks of the number-computing helpers, at the edges the larger tests don't reach
(empty inputs, ties, defaults, boundaries): each assertion here fails for some wrong formula."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from minima.evaluate import metrics


def test_means_and_stderrs_equal_hand_computations():
    assert metrics.mean([1.0, 2.0, 6.0]) == 3.0
    assert math.isnan(metrics.mean([]))
    assert math.isnan(metrics.stderr([]))
    assert math.isnan(metrics.stderr([1.0]))
    # two items: sample std of (0, 2) is sqrt(2), stderr sqrt(2)/sqrt(2) = 1
    assert metrics.stderr([0.0, 2.0]) == pytest.approx(1.0)
    xs = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert metrics.stderr(xs) == pytest.approx(np.std(xs, ddof=1) / math.sqrt(len(xs)))
    # unweighted: sqrt(0.3^2 + 0.4^2) / 2 = 0.25, nan entries dropped
    assert metrics.unweighted_stderr([0.3, float("nan"), 0.4]) == pytest.approx(0.25)
    assert metrics.unweighted_stderr([0.5]) == pytest.approx(0.5)
    assert math.isnan(metrics.unweighted_stderr([]))
    assert math.isnan(metrics.unweighted_stderr([float("nan")]))
    # pooled over subtasks (sizes 2 and 3): var = (1*0.1^2*2 + 2*0.2^2*3) / (5 - 2); stderr sqrt(var / 5)
    want = math.sqrt((1 * 0.01 * 2 + 2 * 0.04 * 3) / 3 / 5)
    assert metrics.pooled_stderr([0.1, 0.2], [2, 3]) == pytest.approx(want)
    assert metrics.pooled_stderr([0.1, float("nan"), 0.2], [2, 7, 3]) == pytest.approx(want)
    assert math.isnan(metrics.pooled_stderr([], []))
    assert math.isnan(metrics.pooled_stderr([float("nan")], [4]))
    assert math.isnan(metrics.pooled_stderr([0.1], [1]))  # n - k = 0: no degrees of freedom
    # n - k = 1: defined (a boundary of the <= 0 check)
    assert metrics.pooled_stderr([0.5], [2]) == pytest.approx(math.sqrt(1 * 0.25 * 2 / 1 / 2))


def test_argmax_ties_and_choice_predictions():
    assert metrics.argmax([1.0, 3.0, 3.0, 2.0]) == 1  # first of a tie, like numpy
    assert metrics.argmax([5.0, 1.0]) == 0
    assert metrics.argmax([-2.0, -1.0]) == 1
    assert metrics.argmax([0.0, 0.0]) == 0
    # raw loglikelihood prefers choice 0, per-character prefers choice 1 (-3/1 < -4/4)
    assert metrics.choice_predictions([-3.0, -4.0], [1, 4]) == (0, 1)
    assert metrics.acc_scores(1, 2, 1) == {"acc": 1.0, "acc_norm": 0.0}
    assert metrics.acc_scores(0, 2, 2) == {"acc": 0.0, "acc_norm": 1.0}


def test_regex_extract_and_exact_match_defaults():
    assert metrics.regex_extract("a 12 b 34", r"(\d+)") == "12"
    assert metrics.regex_extract("a 12 b 34", r"(\d+)", group_select=-1) == "34"
    assert metrics.regex_extract(" x ", r"(\d+)") == "[invalid]"
    assert metrics.regex_extract(None, r"(X*)") == ""  # not a string: searched as the empty string
    # tuple groups: the first non-empty one; all empty gives the fallback
    assert metrics.regex_extract("ans: 7", r"(\d+)|ans: (\d+)") == "7"
    assert metrics.regex_extract("q", r"(x?)(y?)q", fallback="none") == "none"
    assert metrics.exact_match("Hello!", "hello") == 0.0
    assert metrics.exact_match("A", "a") == 0.0  # case counts unless asked otherwise
    assert metrics.exact_match("Hello!", "hello", ignore_case=True) == 0.0
    assert metrics.exact_match("Hello!", "hello", ignore_case=True, ignore_punctuation=True) == 1.0
    assert metrics.exact_match("a.b", "ab", ignore_punctuation=True) == 1.0
    assert metrics.exact_match("x1", "x2", regexes_to_ignore=[r"\d"]) == 1.0


def test_f1_edges():
    assert metrics.f1(set(), set()) == 1.0
    assert metrics.f1({"a"}, set()) == pytest.approx(0.0)  # p = 0, r = 1 by convention: 2*0*1/1
    assert metrics.f1(set(), {"a"}) == pytest.approx(0.0)
    assert metrics.f1({"a"}, {"b"}) == 0.0
    # p = 1/2, r = 1/3 -> 2 * (1/6) / (5/6) = 0.4
    assert metrics.f1({"a", "b"}, {"a", "c", "d"}) == pytest.approx(0.4)


def test_pass_at_k_against_enumeration():
    def brute(n, c, k):
        samples = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)

    for n, c, k in [(5, 0, 1), (5, 1, 1), (5, 2, 3), (5, 3, 2), (4, 1, 3), (4, 1, 4), (3, 3, 3), (6, 2, 4)]:
        assert metrics.pass_at_k(n, c, k) == pytest.approx(brute(n, c, k)), (n, c, k)
    assert metrics.pass_at_k(3, 0, 3) == 0.0  # n == k is allowed
    with pytest.raises(ValueError, match="pass@4 needs at least 4"):
        metrics.pass_at_k(3, 1, 4)


def test_perplexities():
    assert math.isclose(metrics.token_perplexity(2 * math.log(3), 2), 3.0)
    assert math.isclose(metrics.bits_per_byte(math.log(2) * 8, 4), 2.0)
    assert metrics.summarize([0.0, 2.0]) == {"value": 1.0, "stderr": pytest.approx(1.0)}


# ------------------------------------------------------------------------------ packing
def test_pack_boundaries_by_hand():
    import torch

    from minima.data import packing

    def ex(n, start=1):
        return {"input_ids": list(range(start, start + n)), "labels": list(range(start, start + n))}

    # lengths 2, 2, 2, 2 into 4: exactly two full sequences (the budget restarts at zero after each)
    packs = list(packing.pack([ex(2), ex(2), ex(2), ex(2)], 4))
    assert [p["num_docs"] for p in packs] == [2, 2]
    assert [len(p["input_ids"]) for p in packs] == [4, 4]
    # an example of exactly max_length fits
    assert [p["num_docs"] for p in packing.pack([ex(4), ex(1)], 4)] == [1, 1]
    # int32 inputs still give int64 ids and labels
    p = packing.concat([{"input_ids": torch.tensor([5, 6], dtype=torch.int32), "labels": torch.tensor([5, 6])}])
    assert p["input_ids"].dtype == torch.long and p["labels"].tolist() == [-100, 6]


def test_model_inputs_carry_the_block_mask_and_state_without_pending_loads():
    from minima.data import packing

    batch = packing.collate_packed([packing.concat([{"input_ids": [1, 2], "labels": [1, 2]}] * 2)], pad_id=0)
    kw = packing.model_inputs(batch, "4d")
    assert kw["attention_mask"].equal(packing.block_diagonal_mask(batch["doc_ids"]))
    assert kw["position_ids"].tolist() == [[0, 1, 0, 1]] and kw["use_cache"] is False
    assert "attention_mask" not in packing.model_inputs(batch, "varlen")

    class Inner:
        def __iter__(self):
            return iter([{"input_ids": [7, 8], "labels": [7, 8]}])

        def load_state_dict(self, state):
            self.state = state

    ds = packing.PackedDataset(Inner(), 8)
    ds.load_state_dict({"inner": {"k": 1}})  # an older state without pending examples
    assert [p["input_ids"].tolist() for p in ds] == [[7, 8]]


# ------------------------------------------------------------------------------ preference losses
def test_log1mexp_both_branches_and_token_counts():
    import torch

    from minima.train.objectives import dpo

    x = torch.tensor([-3.0, -0.7, -0.5, -1e-3], dtype=torch.float64)
    want = torch.tensor([math.log(1 - math.exp(v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(dpo.log1mexp(x), want, rtol=1e-12)
    # near zero in float32: 1 - exp(x) cancels to 0, only the expm1 branch stays finite
    tiny = dpo.log1mexp(torch.tensor([-1e-8], dtype=torch.float32))
    assert math.isclose(tiny.item(), math.log(1e-8), rel_tol=1e-3)
    # 3 rows x 5 positions: counts are per row (the shifted labels that are not -100)
    logits = torch.zeros(3, 5, 4)
    labels = torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, -100, -100, 3], [0, 1, 2, 3, 0]])
    sums, counts = dpo.token_logps(logits, labels)
    assert counts.tolist() == [2, 1, 4]
    assert torch.allclose(sums, -torch.tensor([2.0, 1.0, 4.0]) * math.log(4))


def test_reference_free_losses_by_hand_with_single_tokens():
    import torch
    import torch.nn.functional as F

    from minima.train.objectives import dpo

    pc, pr = torch.tensor([-2.0, -7.5]), torch.tensor([-3.0, -4.0])
    nc, nr = torch.tensor([1, 3]), torch.tensor([1, 2])
    ac, ar = pc / torch.tensor([1.0, 3.0]), pr / torch.tensor([1.0, 2.0])
    beta, gamma = 0.5, 0.4
    s = dpo.preference_losses("simpo", pc, pr, None, None, nc, nr, beta=beta, gamma=gamma)
    assert torch.allclose(s.loss, -F.logsigmoid(beta * (ac - ar) - gamma))
    assert torch.allclose(s.chosen_logps, ac) and torch.allclose(s.rejected_logps, ar)
    m = s.metrics()
    assert sorted(m) == sorted(
        [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ]
    )
    assert torch.allclose(m["logps/rejected"], ar) and m["rewards/accuracies"].tolist() == [1.0, 0.0]
    nll = torch.tensor([0.3, 0.7])
    o = dpo.preference_losses("orpo", pc, pr, None, None, nc, nr, beta=beta, chosen_nll=nll)
    log_odds = (ac - ar) - (torch.log(1 - torch.exp(ac)) - torch.log(1 - torch.exp(ar)))
    assert torch.allclose(o.loss, nll - beta * F.logsigmoid(log_odds))
    assert torch.allclose(o.chosen_logps, ac) and torch.allclose(o.rejected_logps, ar)
    om = o.metrics()
    assert torch.allclose(om["nll_loss"], nll) and torch.allclose(om["log_odds_chosen"], log_odds)
    assert torch.allclose(om["log_odds_ratio"], F.logsigmoid(log_odds))


# ------------------------------------------------------------------------------ LoRA wrapping
def test_lora_task_type_and_all_linear_targets():
    import peft
    import torch

    from minima.core.config import LoraConfig
    from minima.testing import tiny_family_model, tiny_llama
    from minima.train.lora import apply_lora

    small = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    base = tiny_llama(50, **small)
    linear = sorted(n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    m = apply_lora(base, LoraConfig(enabled=True, r=2, target_modules=["all-linear"]))
    assert isinstance(m, peft.PeftModelForCausalLM)
    wrapped = sorted(
        n[len("base_model.model.") : -len(".lora_A")] for n, _ in m.named_modules() if n.endswith("lora_A")
    )
    assert wrapped == linear  # every Linear but the output head
    t5 = apply_lora(tiny_family_model("t5", 50), LoraConfig(enabled=True, r=2, target_modules=["q", "v"]))
    assert isinstance(t5, peft.PeftModelForSeq2SeqLM)


def test_lora_export_into_an_existing_dir_writes_safetensors(tmp_path):
    from minima.core.config import LoraConfig
    from minima.testing import tiny_llama
    from minima.train.lora import apply_lora, export_lora

    small = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    for merge in (True, False):
        out = tmp_path / f"m{merge}"
        out.mkdir()  # exporting into a directory that already exists
        m = apply_lora(tiny_llama(50, **small), LoraConfig(enabled=True, r=2))
        export_lora(m, out, merge=merge, base_model="/base")
        names = {p.name for p in out.iterdir()}
        assert ("model.safetensors" if merge else "adapter_model.safetensors") in names
        assert not any(n.endswith(".bin") for n in names)


# ------------------------------------------------------------------------------ prune selection
def test_top_k_and_layer_choice_by_hand():
    import torch
    from transformers import LlamaConfig

    from minima.compress.importance import Importance
    from minima.compress.prune import Shape, _top, choose_layers, make_plan, student_config

    assert _top(torch.tensor([0.1, 0.9, 0.5, 0.7]), 2) == [1, 3]  # the highest scores, ascending ids
    assert _top(torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0]), 3) == [0, 1, 2]  # ties keep the lower index
    assert _top(torch.tensor([0.3, 0.1]), 5) == [0, 1]
    L, H, N, D = 4, 4, 6, 8
    imp = Importance(
        "hand",
        heads=torch.arange(L * H, dtype=torch.float32).view(L, H),
        neurons=torch.tensor([[0.0, 5, 1, 4, 2, 3]] * L),
        hidden_global=torch.tensor([8.0, 1, 7, 2, 6, 3, 5, 4]),
        block_influence=torch.tensor([0.1, 0.9, 0.5, 0.7]),
    )
    assert choose_layers(imp, 2, L) == [1, 3]
    assert choose_layers(imp, 2, L, layer_importance="drop_last") == [0, 1]
    assert choose_layers(imp, 2, L, keep_layers=[0, 2]) == [0, 2]
    with pytest.raises(ValueError, match="calibration"):
        choose_layers(Importance("m", imp.heads, imp.neurons, imp.hidden_global), 2, L)
    tc = LlamaConfig(
        vocab_size=10,
        hidden_size=D,
        intermediate_size=N,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
    )
    plan = make_plan(imp, tc, Shape(2, 2, 1, 3, 4))  # default: block influence picks the layers
    assert plan.layers == [1, 3]
    assert plan.kv_groups == [[1], [1]] and plan.heads == [[2, 3], [2, 3]]
    assert plan.neurons == [[1, 3, 5], [1, 3, 5]] and plan.hidden == [0, 2, 4, 6]
    tc.layer_types = ["full_attention"] * L
    assert student_config(tc, Shape(2, 2, 1, 3, 4)).layer_types == ["full_attention"] * 2


def test_plan_edges_by_hand():
    import torch
    from transformers import LlamaConfig, Qwen2Config

    from minima.compress.importance import Importance
    from minima.compress.prune import Shape, _top, choose_layers, make_plan, student_config

    # 100 scores with ties: torch's unstable sort reorders ties at this size; the lower index must win
    ties = torch.zeros(100)
    ties[::3] = 1.0
    assert _top(ties, 50) == sorted(list(range(0, 100, 3)) + [i for i in range(100) if i % 3][:16])
    L, H, N, D = 4, 4, 6, 8
    per_layer = torch.zeros(L, D)
    per_layer[0] = torch.tensor([0.0, 0, 0, 0, 9, 9, 9, 9])  # only layer 0 likes channels 4..7
    imp = Importance(
        "hand",
        heads=torch.arange(L * H, dtype=torch.float32).view(L, H),
        neurons=torch.tensor([[0.0, 5, 1, 4, 2, 3]] * L),
        hidden_global=torch.tensor([8.0, 1, 7, 2, 6, 3, 5, 4]),
        hidden_layers=per_layer,
        block_influence=torch.tensor([0.1, 0.9, 0.5, 0.7]),
    )
    no_bi = Importance("m", imp.heads, imp.neurons, imp.hidden_global)
    assert choose_layers(no_bi, L, L) == list(range(L))  # keeping every layer needs no block influence
    tc = LlamaConfig(
        vocab_size=10,
        hidden_size=D,
        intermediate_size=N,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
    )
    shape = Shape(2, 2, 1, 3, 4)
    plan = make_plan(imp, tc, shape)  # block influence keeps layers 1 and 3, which do not count layer 0's channels
    assert plan.layers == [1, 3] and plan.hidden == [0, 2, 4, 6]
    plan = make_plan(imp, tc, shape, layer_importance="drop_last")  # layers 0 and 1: layer 0's channels count
    assert plan.layers == [0, 1] and plan.hidden == [4, 5, 6, 7]
    # the student config: eps kept unless asked to rescale, per-layer types of the kept layers, window clipped
    assert student_config(tc, shape).rms_norm_eps == tc.rms_norm_eps
    assert student_config(tc, shape, rescale_norms=True).rms_norm_eps == tc.rms_norm_eps * D / 4
    sc = student_config(tc, shape)
    assert sc.rope_parameters == tc.rope_parameters and sc.rope_parameters is not tc.rope_parameters
    qc = Qwen2Config(
        vocab_size=10,
        hidden_size=D,
        intermediate_size=N,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=2,
        use_sliding_window=True,
        max_window_layers=3,
    )
    assert qc.layer_types == ["full_attention"] * 3 + ["sliding_attention"]
    qs = student_config(qc, shape, layers=[1, 3])
    assert qs.layer_types == ["full_attention", "sliding_attention"] and qs.max_window_layers == 2
    assert student_config(qc, shape).layer_types == ["full_attention"] * 2
    assert qc.max_window_layers == 3 and qc.num_hidden_layers == L  # the teacher's config is left as it was


# ------------------------------------------------------------------------------ records reader state
@pytest.fixture(scope="module")
def small_records(tmp_path_factory):
    from minima.data.records.tfrecord_io import ShardWriter

    d = tmp_path_factory.mktemp("records")
    with ShardWriter(d / "train", 4) as w:
        for i in range(10):
            w.write({"indices": np.arange(i, i + 2 + i % 3)})
    (d / "dev").mkdir()
    return d


def test_reader_state_edges(small_records):
    import torch

    from minima.core.errors import ConfigError
    from minima.data.records import RecordDataset, collate

    batch = collate(
        [
            {k: torch.tensor([5, 6, 7]) for k in ("input_ids", "labels", "attention_mask")},
            {k: torch.tensor([5]) for k in ("input_ids", "labels", "attention_mask")},
        ]
    )
    assert batch["input_ids"][1].tolist() == [5, 0, 0]  # default pad id 0
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["labels"][1].tolist() == [5, -100, -100] and batch["attention_mask"][1].tolist() == [5, 0, 0]
    # an empty split reads nothing
    assert list(RecordDataset(str(small_records), split="dev", loop=False)) == []
    # advance: exactly at an epoch end stays (epoch, per); without looping the offset just grows
    looping = RecordDataset(str(small_records), loop=True, shuffle_buffer=0)
    looping.advance(0, 0, 20)
    assert (looping.epoch, looping.offset) == (1, 10)
    looping.advance(0, 4, 13)
    assert (looping.epoch, looping.offset) == (1, 7)
    once = RecordDataset(str(small_records), loop=False, shuffle_buffer=0)
    once.advance(0, 4, 13)
    assert (once.epoch, once.offset) == (0, 17)
    # a state from another shuffle buffer or another record count is refused
    state = RecordDataset(str(small_records), shuffle_buffer=4).state_dict()
    assert state["shuffle_buffer"] == 4 and state["num_records"] == 10
    with pytest.raises(ConfigError, match="shuffle_buffer=4"):
        RecordDataset(str(small_records), shuffle_buffer=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_records=11"):
        RecordDataset(str(small_records), shuffle_buffer=4).load_state_dict(dict(state, num_records=11))


# ------------------------------------------------------------------------------ chat record shapes
def test_record_shapes_keep_system_and_input_and_name_errors():
    from minima.data.formats import Seg, get_format, normalise_conversation

    a = normalise_conversation({"system": "S", "instruction": "I", "input": "X", "output": "O"})
    assert a == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "I\nX", "input": "X"},
        {"role": "assistant", "content": "O"},
    ]
    with pytest.raises(ValueError, match="^an Alpaca record needs 'instruction' and 'output' keys$"):
        normalise_conversation({"instruction": "I"}, "alpaca")
    with pytest.raises(ValueError, match="^an mc record must be an object with 'question', 'choices' and 'gold'$"):
        normalise_conversation(["q"], "mc")
    # the generation prompt of a first exchange carries the system prompt (llama2-chat puts it in [INST])
    groups = get_format("llama2-chat").segments(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], add_generation_prompt=True
    )
    pieces = [s.piece for g in groups for s in g if isinstance(s, Seg)]
    assert "<<SYS>>\n" in pieces and "S" in pieces and pieces[-1] == "[/INST]"


# ------------------------------------------------------------------------------ kd inputs
def test_dense_kd_shape_mismatch_names_both_shapes():
    import torch

    from minima.train.objectives.kd import dense_loss

    with pytest.raises(ValueError, match=r"^teacher logits \(2, 4\) != student \(2, 5\)$"):
        dense_loss(torch.zeros(2, 5), torch.tensor([1, 2]), torch.zeros(2, 4))


def test_tokenize_texts_adds_no_special_tokens_on_the_slow_path():
    from minima.data.formats import tokenize_texts

    class Slow:
        """A tokenizer without a Rust backend: BOS (1) unless add_special_tokens=False."""

        is_fast = False

        def __call__(self, texts, add_special_tokens=True, split_special_tokens=False):
            self.split = split_special_tokens
            return {"input_ids": [[1] * add_special_tokens + [len(t)] for t in texts]}

    slow = Slow()
    assert tokenize_texts(slow, ["ab", "cde"]) == [[2], [3]] and slow.split is True
    assert tokenize_texts(slow, ["ab"], split_special_tokens=False) == [[2]] and slow.split is False
    assert tokenize_texts(slow, []) == []


def test_tokenize_texts_leaves_the_fast_tokenizer_as_it_was(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minima.data.formats import tokenize_texts

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    eos = tok.eos_token
    split = tokenize_texts(tok, [f"a{eos}"])[0]
    assert tok.eos_token_id not in split  # special-token text in content is plain text
    assert tokenize_texts(tok, [f"a{eos}"], split_special_tokens=False)[0][-1] == tok.eos_token_id
    # afterwards the tokenizer itself still reads the special token as one token
    assert tok(f"a{eos}", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id


def test_packed_dataset_boundaries_transform_dtypes_and_errors():
    import torch

    from minima.data import packing

    def ex(n, start=10):
        return {"input_ids": list(range(start, start + n)), "labels": list(range(start, start + n))}

    def lengths(ds):
        return [p["num_docs"] for p in ds], [len(p["input_ids"]) for p in ds]

    assert lengths(packing.PackedDataset([ex(2), ex(2), ex(2), ex(2)], 4)) == ([2, 2], [4, 4])
    assert lengths(packing.PackedDataset([ex(3), ex(1), ex(2), ex(2), ex(1)], 4)) == ([2, 2, 1], [4, 4, 1])
    assert lengths(packing.PackedDataset([ex(1), ex(1), ex(1), ex(1), ex(1)], 4)) == ([4, 1], [4, 1])
    assert lengths(packing.PackedDataset([ex(6), ex(1)], 4)) == ([1, 1], [4, 1])  # cut to max_length

    def plus_one(e):
        return {k: [x + 1 for x in v] for k, v in e.items()}

    first = next(iter(packing.PackedDataset([ex(2)], 4, transform=plus_one)))
    assert first["input_ids"].tolist() == [11, 12]
    p = packing.concat([{"input_ids": [1, 2], "labels": torch.tensor([1, 2], dtype=torch.int32)}])
    assert p["labels"].dtype == torch.long
    batch = packing.collate_packed([packing.concat([ex(1), ex(2)]), packing.concat([ex(1)])], pad_id=0)
    assert batch["doc_ids"].tolist() == [[0, 1, 1], [0, -1, -1]]  # padding is document -1
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 0, 1]]
    assert "attention_mask" in packing.model_inputs(batch)  # the block mask is the default
    bf16 = packing.model_inputs(batch, "4d", torch.bfloat16)["attention_mask"]
    assert bf16.dtype == torch.bfloat16 and bf16[0, 0, 1, 0] == torch.finfo(torch.bfloat16).min
    assert packing.block_diagonal_mask(batch["doc_ids"]).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown packing mask mode 'x'"):
        packing.model_inputs(batch, "x")
    with pytest.raises(ValueError, match="example of 5 tokens does not fit max_length=4"):
        list(packing.pack([ex(5)], 4))


def _reference_order(files_sizes: list[int], seed: int, epoch: int, rank: int, world: int, buffer: int) -> list[int]:
    """The documented read order, written out: seeded file permutation, rank stride, then a streaming
    shuffle buffer (fill it, emit a random slot per new record and put the record there, then emit the
    rest in a random permutation)."""
    starts = np.cumsum([0] + files_sizes)
    shuffle = buffer > 1
    perm = np.random.default_rng([seed, epoch]).permutation(len(files_sizes)) if shuffle else range(len(files_sizes))
    stream = [i for f in perm for i in range(starts[f], starts[f + 1])][rank::world]
    if not shuffle or len(stream) <= 1:
        return stream
    rng = np.random.default_rng([seed, epoch, rank, 1])
    b = min(buffer, len(stream))
    slots = stream[:b]
    picks = rng.integers(0, b, size=len(stream) - b)
    out = []
    for j, x in zip(picks, stream[b:]):
        out.append(slots[j])
        slots[j] = x
    return out + [slots[i] for i in rng.permutation(b)]


def test_read_order_equals_the_written_out_reference(small_records):
    import torch

    from minima.core.errors import ConfigError
    from minima.data.records import RecordDataset
    from minima.data.records.reader import shuffle_buffer_order, to_sample

    sizes = [4, 4, 2]  # small_records: 10 records, 4 per shard
    for seed, epoch, rank, world, buffer in [(0, 0, 0, 1, 4), (3, 1, 1, 2, 3), (5, 2, 0, 1, 2), (1, 0, 0, 1, 1)]:
        ds = RecordDataset(str(small_records), seed=seed, rank=rank, world_size=world, shuffle_buffer=buffer)
        want = _reference_order(sizes, seed, epoch, rank, world, buffer)
        assert ds.epoch_order(epoch).tolist() == want, (seed, epoch, rank, world, buffer)
        assert ds.epoch_order(epoch).tolist() == want  # the cached order is the same
        assert ds.epoch_order(epoch).dtype == np.int64
    one = RecordDataset(str(small_records), seed=0, shuffle_buffer=1)
    assert one.epoch_order(3).tolist() == list(range(10))  # a buffer of one slot keeps the order
    s = shuffle_buffer_order(np.arange(6, dtype=np.int32), 2, np.random.default_rng(0))
    assert s.dtype == np.int32 and sorted(s.tolist()) == list(range(6))
    # two records fill the buffer and come out in the generator's permutation ([1, 0] for seed 3)
    assert shuffle_buffer_order(np.array([7, 8]), 4, np.random.default_rng(3)).tolist() == [8, 7]
    # to_sample: all-zero mask keeps attention on every token; other record kinds pass through
    x = to_sample({"indices": np.array([4, 5, 6]), "mask": np.array([0, 0, 0])})
    assert x["attention_mask"].tolist() == [1, 1, 1] and x["labels"].tolist() == [-100, -100, -100]
    pref = to_sample({"chosen": np.array([1, 2])})
    assert list(pref) == ["chosen"] and torch.equal(pref["chosen"], torch.tensor([1, 2]))
    # advance adds whole epochs to the starting epoch; the state names the rank; errors say how to fix
    looping = RecordDataset(str(small_records), loop=True, shuffle_buffer=0)
    looping.advance(2, 4, 13)
    assert (looping.epoch, looping.offset) == (3, 7)
    assert looping.state_dict()["rank"] == 0
    with pytest.raises(ConfigError) as e:
        RecordDataset(str(small_records), seed=9).load_state_dict(looping.state_dict())
    assert e.value.fix == "resume with the same records, seed, shuffle_buffer and world size as the interrupted run"
    with pytest.raises(ValueError, match="^collate got an empty batch$"):
        from minima.data.records import collate

        collate([])


def test_sharegpt_and_minichat_shapes_by_hand(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minima.data.formats import get_format, normalise_conversation

    sg = {"system": "S", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert normalise_conversation(sg) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert normalise_conversation(dict(sg, system=""))[0] == {"role": "user", "content": "Q"}
    for bad in ([{"User": "Q"}], [{"Assistant": "A"}], ["Q"]):
        with pytest.raises(ValueError, match="^turn 0 must have 'User' and 'Assistant' keys$"):
            normalise_conversation(bad, "minichat")
    for bad in ([{"from": "human"}], [{"value": "Q"}]):
        with pytest.raises(ValueError, match="^message 0 must have 'from' and 'value' keys$"):
            normalise_conversation({"conversations": bad}, "sharegpt")
    # special-token text typed by a user stays plain text in the generation prompt too
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    fmt = get_format("minichat")
    msgs = [{"role": "user", "content": f"say {tok.eos_token} now"}]
    ids, _ = fmt.encode(tok, msgs, add_generation_prompt=True)
    eos_count = ids.count(tok.eos_token_id)
    assert eos_count == 1  # only the one that ends the user turn
    batch = fmt.encode_batch(tok, [msgs + [{"role": "assistant", "content": "ok"}]] * 2)
    single = fmt.encode(tok, msgs + [{"role": "assistant", "content": "ok"}])
    # per conversation a list of (ids, mask) groups (header, then one per exchange); joined, they are encode's
    for groups in batch:
        assert [i for g in groups for i in g[0]] == list(single[0])
        assert [m for g in groups for m in g[1]] == list(single[1])


def test_preference_defaults_metrics_and_errors():
    import torch
    import torch.nn.functional as F

    from minima.train.objectives import dpo

    pc, pr, rc = torch.tensor([-2.0, -3.0]), torch.tensor([-3.0, -2.5]), torch.tensor([-2.5, -3.0])
    rr = torch.tensor([-3.0, -3.0])
    n = torch.tensor([2, 2])
    out = dpo.preference_losses("sigmoid", pc, pr, rc, rr, n, n)  # beta defaults to 0.1
    d = (pc - rc) - (pr - rr)
    assert torch.allclose(out.loss, -F.logsigmoid(0.1 * d))
    m = out.metrics()
    assert torch.equal(m["logps/chosen"], pc) and torch.equal(m["logps/rejected"], pr)
    c, r = 0.1 * (pc - rc), 0.1 * (pr - rr)
    assert torch.allclose(m["rewards/margins"], c - r)
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    tie = dpo.PairLosses(torch.zeros(3), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0]), pc, pr)
    assert tie.metrics()["rewards/accuracies"].tolist() == [0.5, 1.0, 0.0]
    simpo = dpo.preference_losses("simpo", pc, pr, None, None, n, n, beta=2.0)  # gamma defaults to 0.5
    assert torch.allclose(simpo.loss, -F.logsigmoid(2.0 * (pc / 2 - pr / 2) - 0.5))
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        dpo.preference_losses("ipo", pc, pr, rc, None, n, n)
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        dpo.preference_losses("sigmoid", pc, pr, None, rr, n, n)
    with pytest.raises(ValueError, match="unknown preference loss 'x'"):
        dpo.preference_losses("x", pc, pr, rc, rr, n, n)
    with pytest.raises(ValueError, match="needs chosen_nll"):
        dpo.preference_losses("orpo", pc, pr, None, None, n, n)
    # token_logps over every token without an attention mask counts every position
    logits = torch.zeros(1, 4, 3)
    ids = torch.tensor([[0, 1, 2, 1]])
    s, k, s_all, k_all = dpo.token_logps(logits, torch.tensor([[-100, -100, 2, 1]]), ids)
    assert k.tolist() == [2] and k_all.tolist() == [3]
    assert torch.allclose(s_all, torch.tensor([-3 * math.log(3)]))


# ------------------------------------------------------------------------------ formats: malformed records
SHAPES_FOR_ERRORS = ("minichat", "sharegpt", "alpaca", "messages", "mc")
# Each malformed record gets the exact one-line error that names the offending field or turn (a caller then adds
# the file and line); the expected text is written out here, not taken from the code.
MALFORMED = [
    ({"User": "hi"}, "minichat", "a MiniChat conversation must be a list of {'User', 'Assistant'} turns"),
    ([{"User": "hi"}], "minichat", "turn 0 must have 'User' and 'Assistant' keys"),
    (
        [{"User": "a", "Assistant": "b"}, {"User": 5, "Assistant": "c"}],
        "minichat",
        "turn 1 'User' must be a string, got int",
    ),
    ([{"User": "a", "Assistant": None}], "minichat", "turn 0 'Assistant' must be a string, got NoneType"),
    ({"conversations": "x"}, "sharegpt", "'conversations' must be a list of {'from', 'value'} messages"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "message 0 must have 'from' and 'value' keys"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "message 0 has unknown speaker from='alien'"),
    ({"conversations": [{"from": "human", "value": 3}]}, "sharegpt", "message 0 'value' must be a string, got int"),
    ({"instruction": "x"}, "alpaca", "an Alpaca record needs 'instruction' and 'output' keys"),
    ({"output": "x"}, "alpaca", "an Alpaca record needs 'instruction' and 'output' keys"),
    (["instruction", "output"], "alpaca", "an Alpaca record needs 'instruction' and 'output' keys"),
    ({"instruction": 1, "output": "y"}, "alpaca", "'instruction' must be a string, got int"),
    ({"instruction": "x", "input": 2, "output": "y"}, "alpaca", "'input' must be a string, got int"),
    ({"instruction": "x", "output": ["y"]}, "alpaca", "'output' must be a string, got list"),
    ({"messages": "x"}, "messages", "'messages' must be a list of {'role', 'content'} messages"),
    ({"messages": [{"role": "user"}]}, "messages", "message 0 must have 'role' and 'content' keys"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "message 0 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 1.5}]}, "messages", "message 0 'content' must be a string, got float"),
    (["q"], "mc", "an mc record must be an object with 'question', 'choices' and 'gold'"),
    ({"messages": [{"content": "x"}]}, "messages", "message 0 must have 'role' and 'content' keys"),
    (["not", "a", "record"], "sharegpt", "'conversations' must be a list of {'from', 'value'} messages"),
    ({"messages": []}, "nope", "unknown source shape 'nope'; expected one of " + ", ".join(SHAPES_FOR_ERRORS)),
]


@pytest.mark.parametrize("record,shape,message", MALFORMED)
def test_malformed_records_name_the_field(record, shape, message):
    from minima.data.formats import normalise_conversation

    with pytest.raises(ValueError) as e:
        normalise_conversation(record, shape)
    assert str(e.value) == message


def test_shapes_for_errors_are_the_registry_shapes():
    from minima.data.formats import SHAPES

    assert tuple(SHAPES) == SHAPES_FOR_ERRORS


def test_bare_message_list_and_mc_record_normalise_by_hand():
    from minima.data.formats import normalise_conversation

    bare = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert normalise_conversation(bare, "messages") == bare
    mc = normalise_conversation({"question": "Which is red?", "choices": ["sky", "apple"], "gold": 1}, "mc")
    assert [m["role"] for m in mc] == ["user", "assistant"]
    assert mc[0]["content"] == "Which is red?" and mc[0]["choices"] == ["sky", "apple"]


@pytest.mark.parametrize(
    "messages,error",
    [
        ([{"role": "system", "content": "s"}], "the conversation has no user/assistant turns"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 1 should be an assistant turn, got role 'user'",
        ),
    ],
)
def test_turn_order_errors_are_exact(messages, error):
    from minima.data.formats import get_format

    with pytest.raises(ValueError) as e:
        get_format("minichat").segments(messages)
    assert str(e.value) == error


# ------------------------------------------------------------------------------ formats: defaults and the batch path
def test_split_messages_without_a_system_prompt_gives_the_empty_string():
    from minima.data.formats import split_messages

    u, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}
    assert split_messages([u, a]) == ("", [("q", "r")], None)
    assert split_messages([u, a, u], allow_open=True) == ("", [("q", "r")], "q")
    assert split_messages([{"role": "system", "content": "s"}, u, a]) == ("s", [("q", "r")], None)


def test_tokenize_texts_leaves_the_rust_backend_reading_special_tokens(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minima.data.formats import tokenize_texts

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    backend = tok.backend_tokenizer
    assert tokenize_texts(tok, [f"a{tok.eos_token}"], split_special_tokens=True)[0][-1] != tok.eos_token_id
    # The backend is shared with every other user of the tokenizer (the engine, lm-eval's wrapper): after the
    # call it must read "</s>" as the EOS token again, as it does when freshly loaded.
    assert backend.encode_special_tokens is False
    assert backend.encode(f"a{tok.eos_token}", add_special_tokens=False).ids[-1] == tok.eos_token_id


def test_encode_batch_tokenizes_only_the_text_pieces_each_with_its_own_flag(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minima.data.formats import get_format

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})

    class Recorder:
        """The tokenizer on its slow path (tokenizer(texts, ...)), recording every call."""

        is_fast = False

        def __init__(self):
            self.calls = []

        def __call__(self, texts, **kw):
            self.calls.append((list(texts), kw["split_special_tokens"]))
            return tok(texts, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    convs = [
        [{"role": "user", "content": "Hi <|im_end|>"}, {"role": "assistant", "content": ""}],
        [{"role": "user", "content": "Hi <|im_end|>"}, {"role": "assistant", "content": "Hello"}],
    ]
    rec = Recorder()
    got = get_format("chatml").encode_batch(rec, convs)
    # Every distinct non-empty text piece once, in order of appearance; the format's own markup with special
    # tokens read as tokens, message text with them read as plain text. No BOS/EOS, no empty reply.
    assert rec.calls == [
        (["<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>", "\n"], False),
        (["Hi <|im_end|>", "Hello"], True),
    ]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def plain(text, split):
        return tok(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]

    user = plain("Hi <|im_end|>", True)
    assert end not in user  # the user's "<|im_end|>" is text
    nl = plain("\n", False)
    prompt = [start] + plain("user\n", False) + user + [end] + nl + [start] + plain("assistant\n", False)
    for conv, reply in zip(got, ([], plain("Hello", True))):
        assert conv[0] == ([], [])  # no system prompt: an empty header
        assert conv[1] == (prompt + reply + [end] + nl, [0] * len(prompt) + [1] * (len(reply) + 1) + [0] * len(nl))


def test_an_unanswered_user_turn_is_an_error_unless_a_generation_prompt_is_asked_for(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minima.data.formats import available_formats, get_format

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    open_conv = [{"role": "user", "content": "Hi"}]
    error = "the conversation ends with a user turn that has no assistant reply"
    for name in available_formats():
        fmt = get_format(name)
        for method, args in (("segments", ()), ("encode_exchanges", (tok,)), ("encode_batch", (tok,))):
            with pytest.raises(ValueError) as e:
                getattr(fmt, method)(*args, [open_conv] if method == "encode_batch" else open_conv)
            assert str(e.value) == error, (name, method)
        assert fmt.segments(open_conv, add_generation_prompt=True)[-1] == fmt.generation_prefix("Hi"), name
