"""Stage export: the GGUF round trip, the embedded tokenizer, the release dir, the lineage and the model card.

References: the HF weights themselves (cast by torch to the stored type, or q8_0's block error
bound), the SentencePiece model's own pieces/scores/types, AutoTokenizer's chat template, the
source model's logits, and hashes computed here from the raw files. With the ``llama-cpp`` extra
installed, llama.cpp itself runs the GGUF and must match transformers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from minima.core.artifacts import run_stage  # noqa: E402
from minima.core.config import (  # noqa: E402
    EvaluateConfig,
    ExportConfig,
    PipelineConfig,
    PruneConfig,
    RecordsConfig,
    SftConfig,
    VocabConfig,
    build,
)
from minima.core.errors import ConfigError, InputError  # noqa: E402
from minima.data.tokenizers import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, load_proto  # noqa: E402
from minima.stages.export import run  # noqa: E402

ADDED = "<|im_end|>"  # a special token added on top of tokenizer.model (as ChatML formats do)


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def merged_tokenizer_dir(tmp_path_factory, demo_data_dir) -> Path:
    """The vocab stage's kind of tokenizer: demo English base + Chinese pieces (minima mode, padded),
    one user-defined piece, a chat template, and one special token added on top of tokenizer.model."""
    from transformers import AutoTokenizer

    from minima.data.formats import chat_template
    from minima.data.tokenizers import save_proto_tokenizer
    from minima.data.vocab import merge

    tk = demo_data_dir / "tokenizers"
    proto = merge(load_proto(tk / "base_en.model"), load_proto(tk / "extra_zh.model"), "minima", 64).proto
    proto.pieces.add(piece="<sep>", score=0.0, type=USER_DEFINED)
    d = tmp_path_factory.mktemp("export_tok") / "tok"
    save_proto_tokenizer(proto, d)
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.add_tokens([ADDED], special_tokens=True)
    tok.pad_token = tok.unk_token
    tok.chat_template = chat_template("minichat", tok)
    tok.save_pretrained(str(d))
    return d


def _save_model(model, tok_dir: Path, out: Path, training_state: bool = False) -> Path:
    """A model dir as a stage leaves it: weights, tokenizer (with tokenizer.model), generation config."""
    model.save_pretrained(str(out))
    for f in tok_dir.iterdir():
        shutil.copyfile(f, out / f.name)
    if training_state:  # what a training stage leaves beside the model
        (out / "checkpoints" / "step_12").mkdir(parents=True)
        (out / "checkpoints" / "step_12" / "optimizer.pt").write_bytes(b"\0" * 64)
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
        (out / "tensorboard").mkdir()
        (out / "launch_spec.json").write_text("{}")
        (out / "train_result.json").write_text("{}")
    return out


def _random_norms(model, seed: int = 1) -> None:
    """Norm weights start at 1.0; make them random so that their round trip is a real check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, merged_tokenizer_dir) -> Path:
    """A tiny GQA Llama (4 heads, 2 KV heads) whose embedding has more rows than the tokenizer has tokens."""
    from transformers import AutoTokenizer

    from minima.testing import tiny_llama

    n = len(AutoTokenizer.from_pretrained(str(merged_tokenizer_dir)))
    model = tiny_llama(n + 7, seed=3, num_hidden_layers=2, num_key_value_heads=2)
    _random_norms(model)
    return _save_model(model, merged_tokenizer_dir, tmp_path_factory.mktemp("export_llama") / "model", True)


def _export(model_dir, out_dir, **kw):
    return run(ExportConfig(model=str(model_dir), out_dir=str(out_dir), **kw))


def _hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(model_dir.glob("*.safetensors"))))


def _reader(art_dir: Path):
    return gguf.GGUFReader(str(next(Path(art_dir).glob("*.gguf"))))


def _field(reader, key):
    return reader.fields[key].contents()


# llama.cpp's names for HF LLaMA tensors, written out by hand
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def _interleaved_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row r of the GGUF tensor is HF row rows[r]: in each head of d rows, GGUF row 2i holds HF row i
    and GGUF row 2i+1 holds HF row d/2 + i (llama.cpp rotates adjacent pairs, HF rotates halves)."""
    d = n_rows // n_head
    rows = np.empty(n_rows, dtype=np.int64)
    for h in range(n_head):
        for i in range(d // 2):
            rows[h * d + 2 * i] = h * d + i
            rows[h * d + 2 * i + 1] = h * d + d // 2 + i
    return rows


def _gguf_view_of(hf_name: str, w: np.ndarray, n_head: int, n_kv: int, permuted: bool) -> np.ndarray:
    if permuted and ".q_proj." in hf_name:
        return w[_interleaved_rows(w.shape[0], n_head)]
    if permuted and ".k_proj." in hf_name:
        return w[_interleaved_rows(w.shape[0], n_kv)]
    return w


def _q8_0_bound(w: np.ndarray) -> np.ndarray:
    """Per-value bound of q8_0 (blocks of 32 along a row, scale d = max|x|/127 stored as f16):
    rounding to the integer grid costs d/2, the f16 scale at most 127 * d * 2^-11 more."""
    blocks = w.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    bound = d * (0.5 + 127 * 2.0**-11) + 127 * 2.0**-25 + 1e-7 * np.abs(blocks)
    return np.broadcast_to(bound, blocks.shape).reshape(w.shape)


def _check_round_trip(model_dir: Path, art_dir: Path, dtype: str, permuted: bool = True) -> dict:
    """Every HF tensor against the dequantised GGUF tensor; returns max |Δ| per stored type."""
    cfg = json.loads((model_dir / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    reader = _reader(art_dir)
    stored = {t.name: t for t in reader.tensors}
    hf = _hf_tensors(model_dir)
    assert sorted(stored) == sorted(_gguf_name(n) for n in hf)  # every tensor, nothing else
    want_2d = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    worst: dict[str, float] = {}
    for hf_name, tensor in hf.items():
        t = stored[_gguf_name(hf_name)]
        kind = t.tensor_type.name
        assert kind == ("F32" if tensor.ndim == 1 else want_2d), (hf_name, kind)
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(tensor.shape))
        ref = _gguf_view_of(hf_name, tensor.float().numpy(), n_head, n_kv, permuted)
        if kind == "F32":
            np.testing.assert_array_equal(got, ref, err_msg=hf_name)
        elif kind in ("F16", "BF16"):
            cast = torch.from_numpy(ref).to(torch.float16 if kind == "F16" else torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got, cast, err_msg=hf_name)  # exact: torch's own cast
        else:
            err = np.abs(got - ref)
            assert (err <= _q8_0_bound(ref)).all(), (hf_name, float((err / _q8_0_bound(ref)).max()))
        worst[kind] = max(worst.get(kind, 0.0), float(np.abs(got - ref).max()))
    return worst


# ------------------------------------------------------------------------------ GGUF round trip
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_tensors_round_trip(llama_dir, tmp_path, dtype):
    art = _export(llama_dir, tmp_path / "out", dtype=dtype)
    worst = _check_round_trip(llama_dir, art.path, dtype)
    assert worst["F32"] == 0.0
    if dtype == "q8_0":
        assert worst["Q8_0"] > 0  # really quantised
    assert art.metrics["by_type"][dtype]["tensors"] == 2 * 7 + 2  # 7 matrices per block, embedding, output
    assert (art.path / f"{art.metrics['name']}-{dtype.upper()}.gguf").stat().st_size == art.metrics["bytes"]


def test_q_and_k_really_move(llama_dir, tmp_path):
    """The permutation is not the identity for Q/K (so the round trip above tests it) and V stays put."""
    art = _export(llama_dir, tmp_path / "out", dtype="bf16")
    stored = {t.name: t for t in _reader(art.path).tensors}
    hf = _hf_tensors(llama_dir)
    for hf_name, gname, moves in (
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", True),
        ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", True),
        ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight", False),
    ):
        t = stored[gname]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(hf[hf_name].shape))
        same = np.array_equal(got, hf[hf_name].to(torch.bfloat16).float().numpy())
        assert same != moves, hf_name


def test_gguf_tokenizer_and_header(llama_dir, merged_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    art = _export(llama_dir, tmp_path / "out", dtype="f16")
    r = _reader(art.path)
    proto = load_proto(merged_tokenizer_dir / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    rows = json.loads((llama_dir / "config.json").read_text())["vocab_size"]
    n = len(proto.pieces)

    tokens = _field(r, "tokenizer.ggml.tokens")
    scores = np.asarray(_field(r, "tokenizer.ggml.scores"), dtype=np.float32)
    types = list(_field(r, "tokenizer.ggml.token_type"))
    assert len(tokens) == len(scores) == len(types) == rows
    assert tokens[:n] == [p.piece for p in proto.pieces]
    np.testing.assert_array_equal(scores[:n], np.asarray([p.score for p in proto.pieces], dtype=np.float32))
    assert types[:n] == [p.type for p in proto.pieces]
    assert {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE} <= set(types[:n])  # every kind was there
    assert tokens[n] == ADDED and types[n] == CONTROL and tok.convert_tokens_to_ids(ADDED) == n
    assert all(t.startswith("[PAD") for t in tokens[n + 1 :]) and set(types[n + 1 :]) == {UNUSED}

    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id == 1
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id == 2
    assert _field(r, "tokenizer.ggml.unknown_token_id") == tok.unk_token_id
    assert _field(r, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert _field(r, "tokenizer.ggml.add_bos_token") is True
    assert _field(r, "tokenizer.ggml.add_eos_token") is False
    assert _field(r, "tokenizer.ggml.add_space_prefix") == proto.normalizer_spec.add_dummy_prefix
    assert tok.chat_template and _field(r, "tokenizer.chat_template") == tok.chat_template

    cfg = json.loads((llama_dir / "config.json").read_text())
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == 1  # MOSTLY_F16
    for key, want in {
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": 2,
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.rope.dimension_count": cfg["hidden_size"] // cfg["num_attention_heads"],
        "llama.vocab_size": rows,
    }.items():
        assert _field(r, key) == want, key
    assert _field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])


@pytest.mark.parametrize(
    "family, arch, permuted",
    [("qwen2", "qwen2", False), ("mistral", "llama", True)],
)
def test_other_families_round_trip(merged_tokenizer_dir, tmp_path, family, arch, permuted):
    """Qwen2 (q/k/v biases, tied embeddings, NEOX rope in llama.cpp: Q/K rows stay put) and Mistral
    (llama.cpp's llama architecture: Q/K rows interleaved)."""
    import transformers as tf

    n = len(tf.AutoTokenizer.from_pretrained(str(merged_tokenizer_dir)))
    config_cls, model_cls = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]
    cfg = config_cls(
        vocab_size=n,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=family == "qwen2",
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model_dir = _save_model(model, merged_tokenizer_dir, tmp_path / family)
    art = _export(model_dir, tmp_path / "out", dtype="f16")
    assert _field(_reader(art.path), "general.architecture") == arch
    _check_round_trip(model_dir, art.path, "f16", permuted=permuted)
    has_bias = any(k.endswith(".bias") for k in _hf_tensors(model_dir))
    assert has_bias == (family == "qwen2")


def test_unsupported_inputs_are_refused_before_any_output(tmp_path, llama_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(str(gpt2))
    with pytest.raises(InputError) as e:
        _export(gpt2, tmp_path / "out")
    assert "gpt2" in str(e.value) and "llama, mistral, qwen2" in str(e.value)
    no_sp = tmp_path / "no_sp"
    shutil.copytree(llama_dir, no_sp)
    (no_sp / "tokenizer.model").unlink()
    with pytest.raises(InputError, match="SentencePiece"):
        _export(no_sp, tmp_path / "out")
    with pytest.raises(ConfigError, match="q8_0"):
        build(ExportConfig, overrides=[f"model={llama_dir}", "format=safetensors", "dtype=q8_0"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------------------------- release
def test_release_dir_loads_with_the_same_logits_and_no_training_state(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art = _export(llama_dir, tmp_path / "release", format="safetensors")
    out = art.path
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "README.md",
            "lineage.json",
            "manifest.json",
            "config.yaml",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "chat_template.jinja",
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json",
        ]
    )
    assert (llama_dir / "checkpoints").is_dir() and (llama_dir / "metrics.jsonl").is_file()  # they were there
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (llama_dir / f).read_bytes(), f
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_hf_tensors(llama_dir))

    src = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    rel = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert rel.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(src.state_dict().items(), rel.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), n
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(["The capital of France is Paris.", "法国的首都是巴黎。"], return_tensors="pt", padding=True)
    src_bf16 = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = src(**ids).logits
        got = rel(**ids).logits.float()
        same_bf16 = src_bf16(**ids).logits.float()
    torch.testing.assert_close(got, same_bf16, rtol=0, atol=0)  # the source loaded in bf16: identical
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 tolerance against the fp32 source


# ------------------------------------------------------------------------- lineage and card
@pytest.fixture(scope="module")
def run_with_lineage(tmp_path_factory, llama_dir, demo_data_dir) -> dict:
    """A small run of real artifacts (built with run_stage, with the real stages' metric names):
    vocab <- raw tokenizers; records (chat) <- vocab + raw chat file; prune; sft <- prune + records;
    evaluate <- sft."""
    root = tmp_path_factory.mktemp("lineage_run") / "demo-run"
    base_sp = demo_data_dir / "tokenizers/base_en.model"
    extra_sp = demo_data_dir / "tokenizers/extra_zh.model"
    chat = demo_data_dir / "chat/demo_chat.json"

    def copy_model(work):
        for f in llama_dir.iterdir():
            if f.is_file():
                shutil.copyfile(f, work / f.name)

    base = shutil.copytree(llama_dir, root / "00_base", ignore=shutil.ignore_patterns("checkpoints"))
    vocab = run_stage(
        VocabConfig(
            out_dir=str(root / "01_vocab"),
            base_tokenizer=str(base_sp),
            extra_sp_model=str(extra_sp),
            base_model=str(base),
        ),
        {"base_tokenizer": str(base_sp), "extra_sp_model": str(extra_sp), "base_model": str(base)},
        lambda r: (
            copy_model(r.work_dir),
            {"mode": "minima", "pieces_added": 245, "base_vocab_size": 1000, "vocab_size": 1280, "pad_pieces": 35},
        )[1],
    )
    records = run_stage(
        RecordsConfig(out_dir=str(root / "02_records_chat"), format="chat"),
        {"tokenizer": str(vocab.path), "source:chat": str(chat)},
        lambda r: {
            "format": "chat",
            "total_tokens": 12921,
            "sources": {"chat": {"path": str(chat), "share_tokens": 1.0}},
        },
    )
    prune = run_stage(
        PruneConfig(out_dir=str(root / "04_prune"), teacher=str(vocab.path)),
        {"teacher": str(vocab.path)},
        lambda r: (
            copy_model(r.work_dir),
            {
                "params_before": 984192,
                "params_after": 522912,
                "importance": "activation",
                "teacher_shape": dict(
                    num_layers=4, num_heads=4, num_key_value_heads=4, hidden_size=128, intermediate_size=256
                ),
                "target_shape": dict(
                    num_layers=3, num_heads=3, num_key_value_heads=3, hidden_size=96, intermediate_size=192
                ),
            },
        )[1],
    )
    sft = run_stage(
        SftConfig(out_dir=str(root / "06_sft"), model=str(prune.path), records=str(records.path)),
        {"model": str(prune.path), "records": str(records.path)},
        lambda r: (copy_model(r.work_dir), {"train_tokens": 597, "steps": 12, "dev_loss": 4.4333})[1],
    )
    results = {
        "models": {
            "chat": {"path": str(sft.path), "tasks": {"demo_mc": {"acc": 0.625, "acc_stderr": 0.05}}},
            "teacher": {"path": str(vocab.path), "tasks": {"demo_mc": {"acc": 0.75, "acc_stderr": 0.05}}},
        },
        "meta": {},
    }

    def write_results(r):
        (r.work_dir / "results.json").write_text(json.dumps(results))
        return {"chat/demo_mc/acc": 0.625}

    evaluate = run_stage(
        EvaluateConfig(out_dir=str(root / "07_evaluate"), models={"chat": str(sft.path)}),
        {"model:chat": str(sft.path), "model:teacher": str(vocab.path)},
        write_results,
    )
    return {"root": root, "sft": sft.path, "evaluate": evaluate.path, "raw": [base_sp, extra_sp, chat], "base": base}


def _front_matter(readme: str) -> dict:
    import yaml

    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_lineage_walks_back_to_the_raw_data(run_with_lineage, tmp_path):
    art = _export(run_with_lineage["sft"], tmp_path / "out", dtype="q8_0", license="llama2")
    lin = json.loads((art.path / "lineage.json").read_text())
    names = [a["name"] for a in lin["artifacts"]]
    assert names[-1] == "06_sft" and set(names) == {"01_vocab", "02_records_chat", "04_prune", "06_sft"}
    assert names.index("01_vocab") < names.index("04_prune") < names.index("06_sft")  # upstream first
    assert all(i["current"] for a in lin["artifacts"] for i in a["inputs"].values() if i["kind"] == "artifact")
    raw = {Path(r["path"]).name: r for r in lin["raw_data"]}
    assert set(raw) == {p.name for p in run_with_lineage["raw"]} | {"00_base"}
    for p in run_with_lineage["raw"]:  # the recorded hash is the file's own sha256
        assert raw[p.name]["hash"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert raw["00_base"]["used_by"] == ["01_vocab:base_model"]
    assert lin["evaluation"] == str(run_with_lineage["evaluate"].resolve())  # found beside the model

    readme = (art.path / "README.md").read_text()
    head = _front_matter(readme)
    assert head["license"] == "llama2" and head["language"] == ["en", "zh"]
    assert head["pipeline_tag"] == "text-generation" and head["base_model"] == "00_base"
    assert {"minima", "llama", "gguf"} <= set(head["tags"])
    assert "demo-run-sft-Q8_0.gguf" in readme
    for fact in (
        "+245 pieces (1,000 -> 1,280, 35 padding)",
        "4 layers, 4 heads (4 KV), hidden 128, FFN 256 -> 3 layers, 3 heads (3 KV), hidden 96, FFN 192",
        "params 984,192 -> 522,912 (53.1%)",
        "dev loss 4.4333",
        "data: chat (demo_chat.json, 100% of tokens)",
        "| 06_sft | sft | 597 |",
        "| demo_mc | acc | 62.50 | 75.00 |",  # the score table: both evaluated models, in percent
    ):
        assert fact in readme, fact


def test_model_card_without_lineage_or_scores(llama_dir, tmp_path):
    art = _export(llama_dir, tmp_path / "out", dtype="f16", name="tiny", tags=["demo"])
    readme = (art.path / "README.md").read_text()
    assert "lineage is unknown" in readme and "No evaluate artifact" in readme
    assert {"minima", "llama", "gguf", "demo"} <= set(_front_matter(readme)["tags"])
    assert (art.path / "tiny-F16.gguf").is_file()


def test_export_is_cached_and_rebuilt_when_the_model_changes(run_with_lineage, tmp_path):
    first = _export(run_with_lineage["sft"], tmp_path / "out", dtype="f16")
    again = _export(run_with_lineage["sft"], tmp_path / "out", dtype="f16")
    assert again.skipped and again.cache_key == first.cache_key
    other = run(
        ExportConfig(model=str(run_with_lineage["sft"]), out_dir=str(tmp_path / "out"), dtype="q8_0"), force=True
    )
    assert not other.skipped and other.cache_key != first.cache_key


# --------------------------------------------------------------------------------- pipeline
def test_export_step_is_optional_and_wired_after_sft_and_evaluate(tmp_path):
    from minima.core.registry import STEPS, pipeline_steps, select_steps, step_config

    off = PipelineConfig(run_dir=str(tmp_path))
    assert pipeline_steps(off) == STEPS  # the default DAG is unchanged
    with pytest.raises(ConfigError, match="export.enabled=true"):
        select_steps(only_stage="export", steps=pipeline_steps(off))
    on = PipelineConfig(run_dir=str(tmp_path), export={"enabled": True, "dtype": "q8_0"})
    steps = pipeline_steps(on)
    assert [s.key for s in steps][-1] == "export"
    run_keys, forced = select_steps(from_stage="sft", steps=steps)
    assert "export" in run_keys and forced == {"sft", "evaluate", "export"}
    cfg = step_config(on, "export", {"sft": "R/06_sft", "evaluate": "R/07_evaluate"})
    assert (cfg.model, cfg.evaluation, cfg.dtype) == ("R/06_sft", "R/07_evaluate", "q8_0")
    assert cfg.resolved_out_dir() == tmp_path / "08_export"


FLOW_CALLS: list[tuple[str, dict]] = []


def _fake_stage(cfg, force=False):
    """Any stage, in milliseconds: records which inputs it was given."""
    fields = ("tokenizer", "model", "records", "teacher", "student", "evaluation")
    inputs = {f: getattr(cfg, f) for f in fields if getattr(cfg, f, None)}
    inputs.update({f"models.{k}": v for k, v in (getattr(cfg, "models", None) or {}).items()})

    def body(r):
        FLOW_CALLS.append((cfg.resolved_out_dir().name, inputs))
        (r.work_dir / "out.txt").write_text(cfg.stage)

    return run_stage(cfg, inputs, body, force=force)


def test_pipeline_runs_export_last_only_when_enabled(tmp_path, monkeypatch, prefect_ready):
    from flows.pipeline import pipeline
    from minima.core import registry

    for stage in registry.STAGE_RUNNERS:
        monkeypatch.setitem(registry.STAGE_RUNNERS, stage, f"{__name__}:_fake_stage")
    FLOW_CALLS.clear()
    config = {"run_dir": str(tmp_path / "run")}
    off = pipeline(config=config)
    assert "export" not in off and "08_export" not in [c for c, _ in FLOW_CALLS]
    FLOW_CALLS.clear()
    on = pipeline(config=config, overrides=["export.enabled=true"])
    assert [c for c, _ in FLOW_CALLS] == ["08_export"]  # every other step is a cache hit
    assert FLOW_CALLS[0][1] == {"model": off["sft"]["path"], "evaluation": off["evaluate"]["path"]}
    assert on["export"]["path"] == str(tmp_path / "run" / "08_export")
    FLOW_CALLS.clear()
    pipeline(config=config, overrides=["export.enabled=true"])
    assert FLOW_CALLS == []  # and then export is cached too


# ------------------------------------------------------------------------- llama.cpp (extra)
PROMPTS = [
    "The capital of France is",
    "Large language models are trained on",
    "Give three tips for staying healthy:",
    "法国的首都是",
    "人工智能正在改变",
]


def _greedy_hf(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    out, logits, cur = [], [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            last = model(cur).logits[0, -1]
            logits.append(last)
            out.append(int(last.argmax()))
            cur = torch.cat([cur, torch.tensor([[out[-1]]])], dim=1)
    return out, logits


def test_llama_cpp_runs_the_gguf_like_transformers(tmp_path, demo_data_dir, merged_tokenizer_dir):
    """With the llama-cpp extra: a tiny model trained on the demo corpus with the merged bilingual
    tokenizer, exported as f16 GGUF. llama.cpp's tokenization of 20 mixed lines and its greedy
    16-token continuations of 5 prompts must equal transformers' (the model with f16-rounded weights)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama-cpp extra (llama-cpp-python) is not installed")
    from transformers import AutoTokenizer

    from minima.data.tokenizers import iter_lines
    from minima.testing import lm_blocks, train_tiny_lm

    tok = AutoTokenizer.from_pretrained(str(merged_tokenizer_dir))
    text = demo_data_dir / "text"
    en, zh = list(iter_lines([text / "pretrain_en.txt"])), list(iter_lines([text / "pretrain_zh.txt"]))
    ids = [i for line in en[:800] + zh[:800] for i in tok(line)["input_ids"]]
    model = train_tiny_lm(lm_blocks(ids, 64), len(tok), steps=150, batch_size=16, num_hidden_layers=2)
    model_dir = _save_model(model, merged_tokenizer_dir, tmp_path / "trained")
    art = _export(model_dir, tmp_path / "out", dtype="f16")
    gguf_file = str(next(art.path.glob("*.gguf")))
    llm = llama_cpp.Llama(gguf_file, n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    ref = model.half().float().eval()  # the weights as the f16 GGUF holds them

    mixed = en[-6:] + zh[-6:] + en[900:902] + zh[900:902]
    mixed += ["Hello 世界! 我们在 2024 年用 Python 3.12 写代码。", "价格是$30，约合￥200元。", "  two leading spaces"]
    mixed += ["表情🎉很好 emoji"]
    assert len(mixed) == 20
    for line in mixed:
        got = llm.tokenize(line.encode("utf-8"), add_bos=False, special=False)
        assert got == tok(line, add_special_tokens=False)["input_ids"], line

    diverged = []
    for prompt in PROMPTS:
        prompt_ids = tok(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=True) == prompt_ids, prompt
        want, hf_logits = _greedy_hf(ref, prompt_ids, 16)
        llm.reset()
        llm.eval(prompt_ids)
        got = []
        for _ in range(16):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
        if got != want:
            # llama.cpp multiplies f16 weights with f16-rounded activations; the only excusable
            # difference is a near tie at the first diverging step
            k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            margin = float(hf_logits[k][want[k]] - hf_logits[k][got[k]])
            assert margin < 0.02, (prompt, k, margin, got, want)
            diverged.append(prompt)
    assert len(diverged) <= 1, diverged
