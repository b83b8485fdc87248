"""Stage sft: labels, seq2seq pairs, the recipe on the engine (families, LoRA, packing, patience), errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _loopback import free_port_pair

from minima.core.config import LoraConfig, SftConfig
from minima.core.errors import ConfigError, DataError, InputError
from minima.data.formats import get_format
from minima.stages.sft import _FlatMap, apply_loss_on, label_runs, to_seq2seq

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
CONV = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 equals 5."},
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
]


@pytest.fixture(autouse=True)
def _inprocess(monkeypatch):
    monkeypatch.setenv("MINIMA_INPROCESS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # One thread: on a shared 2-core machine a second thread makes tiny models ~10x slower.
    monkeypatch.setenv("MINIMA_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _example(tok, fmt="minichat", conv=CONV):
    ids, mask = get_format(fmt).encode(tok, conv)
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    return {
        "input_ids": ids,
        "labels": torch.where(mask.bool(), ids, torch.full_like(ids, -100)),
        "attention_mask": torch.ones_like(ids),
    }


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


# ------------------------------------------------------------------------------------ labels
def test_loss_on_variants(tok):
    ex = _example(tok)
    eos = tok.eos_token_id
    runs = label_runs(ex["labels"])
    assert [tok.decode(ex["input_ids"][s : e - 1]).strip() for s, e in runs] == [
        "2 plus 3 equals 5.",
        "The sky is blue.",
    ]
    assert all(int(ex["input_ids"][e - 1]) == eos for _, e in runs)
    assert apply_loss_on(ex, "assistant") is ex
    allx = apply_loss_on(ex, "all")
    assert torch.equal(allx["labels"], ex["input_ids"])
    last = apply_loss_on(ex, "last-turn")
    ((s, e),) = label_runs(last["labels"])
    assert (s, e) == runs[-1] and tok.decode(last["labels"][s : e - 1]).strip() == "The sky is blue."


def test_seq2seq_pairs(tok):
    ex = _example(tok)
    pairs = to_seq2seq(ex, "assistant")
    assert len(pairs) == 2
    assert tok.decode(pairs[0]["labels"][:-1]).strip() == "2 plus 3 equals 5."
    assert tok.decode(pairs[1]["labels"][:-1]).strip() == "The sky is blue."
    # The second source holds the whole first exchange as context and ends at the reply prompt.
    assert torch.equal(pairs[1]["input_ids"][: len(pairs[0]["input_ids"])], pairs[0]["input_ids"])
    assert "2 plus 3 equals 5." in tok.decode(pairs[1]["input_ids"])
    assert len(to_seq2seq(ex, "last-turn")) == 1


class _ListDS(torch.utils.data.IterableDataset):
    def __init__(self, items):
        self.items, self.pos = items, 0

    def __iter__(self):
        while self.pos < len(self.items):
            self.pos += 1
            yield self.items[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_flatmap_resumes_exactly(tok):
    exs = [_example(tok)] * 3
    full = [p["labels"].tolist() for p in _FlatMap(_ListDS(exs), lambda e: to_seq2seq(e, "assistant"))]
    ds = _FlatMap(_ListDS(exs), lambda e: to_seq2seq(e, "assistant"))
    it = iter(ds)
    first = [next(it)["labels"].tolist() for _ in range(3)]  # stops inside the second record's pairs
    state = json.loads(json.dumps(ds.state_dict()))
    ds2 = _FlatMap(_ListDS(exs), lambda e: to_seq2seq(e, "assistant"))
    ds2.load_state_dict(state)
    assert first + [p["labels"].tolist() for p in ds2] == full and len(full) == 6


# ------------------------------------------------------------------------------ engine runs
@pytest.fixture(scope="module")
def chat_records(tmp_path_factory, tiny_tokenizer_dir, demo_data_dir):
    """MiniChat records of the demo chat data, built once by the records stage."""
    from minima.core.config import RecordsConfig
    from minima.stages.records import run as records_run

    out = tmp_path_factory.mktemp("sft_records") / "records"
    cfg = RecordsConfig(
        inputs=str(demo_data_dir / "chat" / "demo_chat.json"),
        tokenizer=str(tiny_tokenizer_dir),
        format="chat",
        chat_format="minichat",
        max_length=128,
        dev_fraction=0.05,
        out_dir=str(out),
    )
    return records_run(cfg).path


def _save_family(family: str, out: Path, tok_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from minima.testing import tiny_family_model, tiny_llama

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny_llama(len(tok), seed=0, **SMALL) if family == "llama" else tiny_family_model(family, len(tok), seed=0)
    if family == "t5":  # the tiny T5 config's special ids are T5's; use the tokenizer's
        model.config.eos_token_id, model.config.pad_token_id, model.config.decoder_start_token_id = (
            tok.eos_token_id,
            0,
            0,
        )
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _cfg(tmp_path, model, records, **kw) -> SftConfig:
    base = dict(
        model=str(model),
        records=str(records),
        out_dir=str(tmp_path / "sft"),
        precision="fp32",
        zero_stage=2,
        micro_batch_size=8,
        max_steps=8,
        lr=3e-3,
        warmup_proportion=0.1,
        eval_steps=0,
        max_length=128,
    )
    base.update(kw)
    return SftConfig(**base)


def _dev_loss(model_dir, records, seq2seq=False) -> float:
    """Mean label-token loss of a model dir on the records' dev split (reference: plain HF forward)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from minima.data.records import RecordDataset

    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir)).eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for ex in RecordDataset(str(records), "dev", shuffle_buffer=0):
            pairs = to_seq2seq(ex, "assistant") if seq2seq else [ex]
            for p in pairs:
                out = model(input_ids=p["input_ids"][None], labels=p["labels"][None])
                k = int((p["labels"][1:] != -100).sum()) if not seq2seq else int((p["labels"] != -100).sum())
                tot += out.loss.item() * k
                n += k
    return tot / n


@pytest.mark.parametrize("family", ["llama", "bloom", "opt", "t5"])
def test_family_loss_goes_down_and_export_reloads(family, tmp_path, chat_records, tiny_tokenizer_dir):
    from minima.stages import sft

    model = _save_family(family, tmp_path / f"base_{family}", tiny_tokenizer_dir)
    cfg = _cfg(tmp_path, model, chat_records)
    art = sft.run(cfg)
    out = art.path
    s2s = family == "t5"
    before, after = _dev_loss(model, chat_records, s2s), _dev_loss(out, chat_records, s2s)
    print(f"{family}: dev loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.3
    # Step 1's loss is transformers' own loss of the base model on the first micro batch the reader yields
    # (rank 0 of 1, the run's seed): the engine trained on those tokens with that objective.
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from minima.data.records import RecordDataset
    from minima.data.records.reader import collate
    from minima.train.metrics import read_metrics

    ds = RecordDataset(str(chat_records), split="train", rank=0, world_size=1, seed=cfg.seed, loop=True)
    it = iter(ds)
    if s2s:
        # One encoder/decoder pair per reply: the conversation before it -> the reply's labelled tokens,
        # right-padded (encoder by its attention mask, decoder labels by -100).
        pairs = []
        while len(pairs) < cfg.micro_batch_size:
            ex = next(it)
            on = (ex["labels"] != -100).tolist() + [False]
            for s in [i for i in range(1, len(on)) if on[i] and not on[i - 1]]:
                pairs.append((ex["input_ids"][:s], ex["input_ids"][s : on.index(False, s)]))
        pairs = pairs[: cfg.micro_batch_size]
        n, m = max(len(x) for x, _ in pairs), max(len(y) for _, y in pairs)
        batch = {
            "input_ids": torch.tensor([x.tolist() + [ds.pad_id] * (n - len(x)) for x, _ in pairs]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in pairs]),
            "labels": torch.tensor([y.tolist() + [-100] * (m - len(y)) for _, y in pairs]),
        }
        ref = AutoModelForSeq2SeqLM.from_pretrained(str(model)).eval()
    else:
        batch = collate([next(it) for _ in range(cfg.micro_batch_size)], pad_id=ds.pad_id)
        ref = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    with torch.no_grad():
        want = ref(**batch).loss.item()
    first = next(r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train")
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, rel=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == {"llama": "llama", "bloom": "bloom", "opt": "opt", "t5": "t5"}[family]
    gen = json.loads((out / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert gen["eos_token_id"] == tok.eos_token_id
    msgs = CONV[:2]
    assert (
        list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"]) == get_format("minichat").encode(tok, msgs)[0]
    )


def test_lora_zero3_merged_and_adapter_dir(tmp_path, chat_records, tiny_tokenizer_dir):
    """LoRA through the engine: ZeRO-3 + merge gives a plain dir; merge=false an adapter dir on the base."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from minima.stages import sft
    from minima.train.lora import load_adapter

    base = _save_family("llama", tmp_path / "base", tiny_tokenizer_dir)
    lora = LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0)
    merged = sft.run(
        _cfg(tmp_path, base, chat_records, zero_stage=3, lr=1e-2, lora=lora, out_dir=str(tmp_path / "merged"))
    ).path
    assert not any("lora" in k for k in load_file(str(merged / "model.safetensors")))
    assert _dev_loss(merged, chat_records) < _dev_loss(base, chat_records) - 0.1
    # Only the adapted projections changed (their deltas are low rank); embeddings and norms did not.
    b = load_file(str(base / "model.safetensors"))
    m = load_file(str(merged / "model.safetensors"))
    for k in b:
        if any(t in k for t in lora.target_modules):
            d = (m[k] - b[k]).float()
            assert 0 < torch.linalg.matrix_rank(d).item() <= lora.r, k
        else:
            assert torch.equal(m[k], b[k]), k

    lora2 = lora.model_copy(update={"merge": False})
    adir = sft.run(
        _cfg(tmp_path, base, chat_records, zero_stage=2, lr=1e-2, lora=lora2, out_dir=str(tmp_path / "adapter"))
    ).path
    assert (adir / "adapter_config.json").is_file() and not (adir / "model.safetensors").exists()
    assert (adir / "chat_template.jinja").is_file() or "chat_template" in (adir / "tokenizer_config.json").read_text()
    peft_model = load_adapter(adir).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    ids = torch.tensor(
        [
            get_format("minichat").encode(
                plain and __import__("transformers").AutoTokenizer.from_pretrained(str(adir)), CONV
            )[0]
        ]
    )
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-3)


def test_packing_neftune_instruction_loss(tmp_path, chat_records, tiny_tokenizer_dir):
    """packing + NEFTune + loss_on=all through the engine: trains, exports clean, template intact."""
    from minima.stages import sft

    base = _save_family("llama", tmp_path / "base", tiny_tokenizer_dir)
    art = sft.run(_cfg(tmp_path, base, chat_records, packing=True, neftune_alpha=5.0, loss_on="all", max_steps=6))
    assert art.metrics["steps"] == 6
    assert _dev_loss(art.path, chat_records) < _dev_loss(base, chat_records) - 0.1
    cfg = json.loads((art.path / "config.json").read_text())
    assert cfg["model_type"] == "llama"


def test_patience_exports_the_best_checkpoint(tmp_path, chat_records, tiny_tokenizer_dir):
    """A too-high lr makes dev loss rise; training stops early and the best step's weights are exported."""
    from minima.stages import sft

    base = _save_family("llama", tmp_path / "base", tiny_tokenizer_dir)
    art = sft.run(
        _cfg(
            tmp_path,
            base,
            chat_records,
            lr=0.2,
            warmup_proportion=0.0,
            max_steps=12,
            eval_steps=1,
            patience=2,
            grad_clip=0.0,
        )
    )
    m = art.metrics
    assert m["stopped_early"] and m["steps"] < 12 and m["best_step"] < m["steps"]
    # The exported weights are the best evaluation's: recomputing dev loss gives best_dev_loss.
    assert _dev_loss(art.path, chat_records) == pytest.approx(m["best_dev_loss"], rel=1e-4)


def test_train_files_build_records_and_chatml_tokens(tmp_path, demo_data_dir, tiny_tokenizer_dir):
    """Raw files go through the records stage; chatml adds its tokens and the model is resized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.stages import sft

    base = _save_family("llama", tmp_path / "base", tiny_tokenizer_dir)
    cfg = SftConfig(
        model=str(base),
        train_files=[str(demo_data_dir / "chat" / "demo_chat.json")],
        chat_format="chatml",
        out_dir=str(tmp_path / "sft"),
        precision="fp32",
        zero_stage=2,
        micro_batch_size=8,
        max_steps=3,
        max_length=128,
        dev_fraction=0.05,
    )
    art = sft.run(cfg)
    rec = Path(str(art.path) + ".records")
    assert json.loads((rec / "manifest.json").read_text())["metrics"]["chat_format"] == "chatml"
    tok = AutoTokenizer.from_pretrained(str(art.path))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == len(tok) - 1
    model = AutoModelForCausalLM.from_pretrained(str(art.path))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    gen = json.loads((art.path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, im_end]
    assert sft.run(cfg).skipped  # same config and inputs: cached


# ------------------------------------------------------------------------------------ errors
def _write(p: Path, obj) -> str:
    p.write_text(json.dumps(obj))
    return str(p)


def test_bad_inputs_are_clear_errors(tmp_path, tiny_tokenizer_dir, chat_records):
    from minima.stages import sft

    base = _save_family("llama", tmp_path / "base", tiny_tokenizer_dir)
    common = dict(model=str(base), out_dir=str(tmp_path / "o"), max_steps=1, precision="fp32")
    # A conversation with no assistant turn, and roles out of order: the records stage names file:line.
    no_reply = _write(tmp_path / "no_reply.json", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no assistant reply") as e:
        sft.run(SftConfig(train_files=[no_reply], **common))
    assert "no_reply.json" in str(e.value)
    swapped = _write(
        tmp_path / "swapped.json",
        [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}],
    )
    with pytest.raises(DataError, match="user turn"):
        sft.run(SftConfig(train_files=[swapped], **common))
    # A format that is missing from the registry.
    with pytest.raises(ConfigError, match="unknown chat format 'vicuna'"):
        sft.run(SftConfig(records=str(chat_records), chat_format="vicuna", **common))
    # Records built with another format.
    with pytest.raises(ConfigError, match="chat_format='minichat'"):
        sft.run(SftConfig(records=str(chat_records), chat_format="alpaca", **common))
    # A LoRA target the model does not have: the message lists its linear modules.
    with pytest.raises(ConfigError, match="query_key_value") as e:
        sft.run(
            SftConfig(
                records=str(chat_records), lora=LoraConfig(enabled=True, target_modules=["query_key_value"]), **common
            )
        )
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)
    # Family constraints, QLoRA without a GPU, and no data at all.
    bloom = _save_family("bloom", tmp_path / "bloom", tiny_tokenizer_dir)
    with pytest.raises(ConfigError, match="packing"):
        sft.run(SftConfig(records=str(chat_records), packing=True, **{**common, "model": str(bloom)}))
    t5 = _save_family("t5", tmp_path / "t5", tiny_tokenizer_dir)
    with pytest.raises(ConfigError, match="loss_on=all"):
        sft.run(SftConfig(records=str(chat_records), loss_on="all", **{**common, "model": str(t5)}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="QLoRA"):
            sft.run(SftConfig(records=str(chat_records), lora=LoraConfig(enabled=True, qlora=True), **common))
    with pytest.raises(ConfigError, match="records or raw chat files"):
        sft.run(SftConfig(**common))
    with pytest.raises(InputError, match="config.json"):
        sft.run(SftConfig(records=str(chat_records), **{**common, "model": str(tmp_path / "nope")}))
    assert not (tmp_path / "o").exists()  # nothing half-written


# -------------------------------------------------------------------------------------- FSDP
SFT_DRIVER = """import json, sys
from minima.core.config import SftConfig
from minima.stages import sft
art = sft.run(SftConfig.model_validate(json.loads(open(sys.argv[1]).read())))
print("ARTIFACT", art.path, flush=True)
"""


def _start_sft(tmp_path: Path, cfg: SftConfig, name: str, **env):
    import subprocess
    import sys

    (tmp_path / "sft_driver.py").write_text(SFT_DRIVER)
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(cfg.model_dump(mode="json")))
    root = Path(__file__).resolve().parents[1]
    full = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_NUM_THREADS="1", PYTHONPATH=str(root), **env)
    full.pop("MINIMA_INPROCESS", None)
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "sft_driver.py"), str(spec)],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc, timeout: float = 400) -> str:
    import signal

    try:
        out = proc.communicate(timeout=timeout)[0]
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


def test_fsdp_two_ranks_and_two_nodes_with_kill_and_resume(tmp_path, chat_records, tiny_tokenizer_dir):
    """strategy=fsdp through the one launcher: 2 gloo ranks on one node train (the loss falls, the export
    reloads); then the same job on two loopback "nodes" (node_rank 0 and 1, one rank each) is SIGKILLed on
    both nodes after its step-4 checkpoint, restarted, resumes there and exports the 2-rank run's weights."""
    import signal
    import time

    from safetensors.torch import load_file

    from minima.train.metrics import read_metrics

    base = _save_family("llama", tmp_path / "base", tiny_tokenizer_dir)
    kw = dict(strategy="fsdp", max_steps=8, micro_batch_size=4, save_steps=2, keep_last=2)
    one_node = _cfg(tmp_path, base, chat_records, out_dir=str(tmp_path / "one"), **kw)
    one_node.launch.nproc_per_node = 2
    one_node.launch.master_port = free_port_pair()
    _finish(_start_sft(tmp_path, one_node, "one"))
    one = tmp_path / "one"
    metrics = json.loads((one / "manifest.json").read_text())["metrics"]
    assert metrics["world_size"] == 2 and metrics["strategy"] == "fsdp"
    assert _dev_loss(one, chat_records) < _dev_loss(base, chat_records) - 0.1
    # The same 2-rank job under DeepSpeed ZeRO-2 (same records per rank, same seed): the same losses and
    # weights, so FSDP's sharded step is the replicated one.
    ds_cfg = _cfg(tmp_path, base, chat_records, out_dir=str(tmp_path / "ds"), **dict(kw, strategy="deepspeed"))
    ds_cfg.launch.nproc_per_node = 2
    ds_cfg.launch.master_port = free_port_pair()
    _finish(_start_sft(tmp_path, ds_cfg, "ds"))
    ds_rows = [r for r in read_metrics(tmp_path / "ds" / "metrics.jsonl") if r["split"] == "train"]
    fsdp_rows = [r for r in read_metrics(one / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in ds_rows] == [r["step"] for r in fsdp_rows] == list(range(1, 9))
    for a, b in zip(fsdp_rows, ds_rows):
        assert a["lr"] == b["lr"] and abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a, b)
    wf, wd = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "ds" / "model.safetensors"))
    assert wf.keys() == wd.keys() and max(float((wf[k] - wd[k]).abs().max()) for k in wf) < 1e-4

    out = tmp_path / "nodes"

    def start_nodes(tag):
        port = free_port_pair()
        procs = []
        for r in (1, 0):
            cfg = _cfg(tmp_path, base, chat_records, out_dir=str(out), **kw)
            cfg.launch.nnodes, cfg.launch.node_rank, cfg.launch.master_port = 2, r, port
            procs.append(_start_sft(tmp_path, cfg, f"{tag}{r}", MINIMA_STEP_DELAY_S="0.5"))
        return procs

    procs = start_nodes("first")
    marker = out.with_name("nodes.partial") / "checkpoints" / "step_00000004" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.is_file():
        assert all(p.poll() is None for p in procs), "a node ended before the kill:\n" + procs[0].stdout.read()[-3000:]
        assert time.time() < deadline, "no step-4 checkpoint within 300 s"
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
    assert not (out / "manifest.json").exists()
    logs = [_finish(p) for p in start_nodes("again")]
    assert "resumed from" in logs[1] and "step_00000004" in logs[1]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    ref = [r for r in read_metrics(one / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows if r["step"] > 4] == [5, 6, 7, 8]
    last = {r["step"]: r["loss"] for r in rows}
    assert all(abs(last[r["step"]] - r["loss"]) < 1e-5 * abs(r["loss"]) for r in ref)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.parametrize("case", ["lora", "t5"])
def test_fsdp_lora_and_t5_match_deepspeed(case, tmp_path, chat_records, tiny_tokenizer_dir):
    """One rank, fp32: LoRA (merged export) and seq2seq T5 (tied embeddings) train under FSDP exactly as
    under DeepSpeed: the same losses and lrs, and the same exported weights."""
    from safetensors.torch import load_file

    from minima.stages import sft
    from minima.train.metrics import read_metrics

    base = _save_family("t5" if case == "t5" else "llama", tmp_path / "base", tiny_tokenizer_dir)
    rows, exported = {}, {}
    for strategy in ("deepspeed", "fsdp"):
        kw = dict(strategy=strategy, zero_stage=0, max_steps=4, out_dir=str(tmp_path / strategy))
        if case == "lora":
            kw["lora"] = LoraConfig(enabled=True, merge=True)
        art = sft.run(_cfg(tmp_path, base, chat_records, **kw))
        assert art.metrics["strategy"] == strategy
        rows[strategy] = [r for r in read_metrics(art.path / "metrics.jsonl") if r["split"] == "train"]
        exported[strategy] = load_file(str(art.path / "model.safetensors"))
    for a, b in zip(rows["fsdp"], rows["deepspeed"]):
        assert a["lr"] == b["lr"] and abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
    assert rows["fsdp"][-1]["loss"] < rows["fsdp"][0]["loss"]
    f, d = exported["fsdp"], exported["deepspeed"]
    assert f.keys() == d.keys()
    assert max(float((f[k] - d[k]).abs().max()) for k in f) < 1e-5
    if case == "lora":
        assert not any("lora" in k for k in f)  # merged into a plain dir


# ------------------------------------------------------------------ options change what is trained
def _train_losses(art) -> list[float]:
    from minima.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(art.path / "metrics.jsonl") if r.get("split") == "train"]


def _label_count(ex: dict, loss_on: str) -> int:
    """Shifted label tokens of one chat record under ``loss_on``, counted from the record's own mask."""
    on = (ex["labels"] != -100).tolist()
    if loss_on == "all":
        return len(on) - 1
    if loss_on == "last-turn":
        last = max(i for i, v in enumerate(on) if v)
        first = last
        while first > 0 and on[first - 1]:
            first -= 1
        return last - max(first, 1) + 1
    return sum(on[1:])


@pytest.mark.parametrize("loss_on", ["assistant", "all", "last-turn"])
def test_loss_on_sets_the_trained_tokens(loss_on, tmp_path, chat_records, tiny_tokenizer_dir):
    """One epoch at micro batch 1: the engine's label-token total equals a count made from the records."""
    from minima.data.records import RecordDataset
    from minima.stages import sft

    want = sum(_label_count(ex, loss_on) for ex in RecordDataset(str(chat_records), "train", shuffle_buffer=0))
    base = _save_family("llama", tmp_path / "base", tiny_tokenizer_dir)
    art = sft.run(_cfg(tmp_path, base, chat_records, loss_on=loss_on, max_steps=-1, epochs=1, micro_batch_size=1))
    assert art.metrics["train_tokens"] == want


def test_packing_and_neftune_change_training(tmp_path, chat_records, tiny_tokenizer_dir):
    """Against a same-seed run without the option: packing puts more conversations in each step, NEFTune
    changes the losses, and a repeat of the plain run is identical (so the differences are the options')."""
    from minima.stages import sft

    base = _save_family("llama", tmp_path / "base", tiny_tokenizer_dir)
    runs = {}
    for name, kw in {"plain": {}, "again": {}, "packed": {"packing": True}, "neftune": {"neftune_alpha": 5.0}}.items():
        runs[name] = sft.run(_cfg(tmp_path / name, base, chat_records, max_steps=3, micro_batch_size=2, **kw))
    plain = _train_losses(runs["plain"])
    assert _train_losses(runs["again"]) == plain
    assert runs["packed"].metrics["train_tokens"] > 1.5 * runs["plain"].metrics["train_tokens"]
    assert max(abs(a - b) for a, b in zip(_train_losses(runs["neftune"]), plain)) > 1e-3
