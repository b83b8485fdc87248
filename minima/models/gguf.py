"""GGUF files for llama.cpp, Ollama and LM Studio, written with the ``gguf`` package (llama.cpp's own writer).

What a conversion must get right, and where it happens here:

- **Tensor names** go through gguf's ``TensorNameMap`` for the family's ``MODEL_ARCH``.
- **The rotary layout.** HF LLaMA checkpoints order the rows of each Q/K head as [first halves,
  second halves] (``rotate_half``); llama.cpp's LLaMA rope rotates adjacent pairs, so the rows are
  interleaved back (:func:`permute_qk`). Qwen2 runs the NEOX rope in llama.cpp, which is the HF
  layout, so its rows stay put.
- **Types.** 2-D weights take the asked type; 1-D tensors (norms, biases) stay f32, as llama.cpp
  expects. A q8_0 row whose length is not a multiple of the 32-value block falls back to f16.
- **The tokenizer.** SentencePiece pieces, scores and types exactly as in ``tokenizer.model`` (the vocab
  stage's merged model). Tokens the HF tokenizer added on top (e.g. ChatML markers) become control or
  user-defined tokens. Embedding rows beyond the tokenizer become unused ``[PAD<i>]`` tokens. The file
  also carries the BOS/EOS/UNK/PAD ids, add_bos/add_eos, the dummy-prefix flag and the chat template.

Weights stream one tensor at a time from the safetensors files: the plan (names, shapes, types,
sizes) is written first, then each tensor is converted and appended, so memory holds one tensor.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from minima.core.errors import InputError
from minima.core.logs import get_logger

log = get_logger("minima.models.gguf")

#: model_type -> (llama.cpp architecture, whether Q/K rows are interleaved for its rope)
FAMILIES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}
DTYPES = ("f16", "bf16", "q8_0")
FILE_LABEL = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
ROPE_TYPES = ("default", "linear")
# SentencePiece/llama.cpp token types (the same numbers in sentencepiece_model.proto and gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ADDED_TOKEN_SCORE = -1000.0  # score llama.cpp's converter gives tokens added on top of tokenizer.model
PAD_TOKEN_SCORE = -10000.0  # and embedding rows no token uses


@dataclass
class ModelSpec:
    """What the GGUF header needs from a model dir's config.json."""

    model_dir: Path
    family: str
    arch: str
    permute: bool
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: Optional[float]
    tied_embeddings: bool


@dataclass
class Vocab:
    """The tokenizer as GGUF stores it."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: Optional[int]
    eos_id: Optional[int]
    unk_id: Optional[int]
    pad_id: Optional[int]
    eot_id: Optional[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    chat_template: Optional[str]
    source_pieces: int  # tokens taken from tokenizer.model; the rest were added or pad rows
    added: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------- checks
def model_spec(model_dir: str | Path) -> ModelSpec:
    """Read and check the model config: a supported family, rope, weights and a SentencePiece tokenizer.

    Raises:
        InputError: not an HF model dir, an unsupported family or rope scaling, no safetensors
            weights, or no ``tokenizer.model`` (byte-level BPE tokenizers are not embedded yet).
    """
    from transformers import AutoConfig

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise InputError(
            f"{d} is not a Hugging Face model dir (no config.json)", fix="pass model=<a stage's model dir>"
        )
    c = AutoConfig.from_pretrained(str(d), trust_remote_code=False)
    if c.model_type not in FAMILIES:
        raise InputError(
            f"GGUF export does not support model_type {c.model_type!r}",
            where=f"{d}/config.json",
            fix=f"export one of {', '.join(FAMILIES)}, or use format=safetensors",
        )
    arch, permute = FAMILIES[c.model_type]
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise InputError(
            f"rope_type {rope_type!r} is not exported to GGUF",
            where=f"{d}/config.json",
            fix=f"supported rope types: {', '.join(ROPE_TYPES)}; use format=safetensors for this model",
        )
    if not weight_files(d):
        raise InputError(f"no safetensors weights in {d}", fix="save the model with safe_serialization=True")
    if not (d / "tokenizer.model").is_file():
        raise InputError(
            f"{d} has no tokenizer.model: GGUF export embeds SentencePiece tokenizers only "
            "(byte-level BPE is not supported yet)",
            where=str(d),
            fix="copy the vocab stage's tokenizer.model into the model dir, or use format=safetensors",
        )
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    if window and window < c.max_position_embeddings:
        log.warning(
            f"{d}: sliding_window={window} < context {c.max_position_embeddings}; llama.cpp's {arch} "
            "architecture attends to the whole context, so outputs differ beyond the window"
        )
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return ModelSpec(
        model_dir=d,
        family=c.model_type,
        arch=arch,
        permute=permute,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        context_length=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        rope_linear_factor=float(rope["factor"]) if rope_type == "linear" else None,
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index when there is one)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


# ------------------------------------------------------------------------------ tokenizer
def sentencepiece_vocab(model_dir: str | Path, vocab_size: int) -> Vocab:
    """The tokenizer of ``model_dir`` for the GGUF header (``vocab_size`` = the embedding's rows).

    Pieces, scores and types come from ``tokenizer.model``; special ids, added tokens, add_bos/add_eos
    (as the tokenizer behaves) and the chat template from the HF tokenizer; an extra end-of-turn id
    from generation_config.json's eos list.
    """
    from transformers import AutoTokenizer

    from minima.data.tokenizers import load_proto

    d = Path(model_dir)
    proto = load_proto(d / "tokenizer.model")
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    added = []
    for i, t in sorted(tok.added_tokens_decoder.items()):
        if i < len(tokens):
            if tokens[i] != t.content:
                raise InputError(
                    f"token {i} is {t.content!r} in the HF tokenizer but {tokens[i]!r} in tokenizer.model",
                    where=str(d),
                    fix="save tokenizer.model and tokenizer.json from the same tokenizer",
                )
            continue
        if i != len(tokens):
            raise InputError(f"added token ids are not contiguous (next is {i}, expected {len(tokens)})", where=str(d))
        tokens.append(t.content)
        scores.append(ADDED_TOKEN_SCORE)
        types.append(CONTROL if t.special else USER_DEFINED)
        added.append(t.content)
    source = len(proto.pieces)
    if len(tokens) > vocab_size:
        raise InputError(
            f"the tokenizer has {len(tokens)} tokens but the model's embedding has {vocab_size} rows",
            where=str(d),
            fix="resize the model's embeddings to the tokenizer",
        )
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(PAD_TOKEN_SCORE)
        types.append(UNUSED)
    probe = tok("a")["input_ids"]
    eot = None
    gen = d / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        eot = next(
            (i for i in (eos if isinstance(eos, list) else [eos]) if i is not None and i != tok.eos_token_id), None
        )
    template = tok.chat_template
    ns = proto.normalizer_spec
    return Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        unk_id=tok.unk_token_id,
        pad_id=tok.pad_token_id,
        eot_id=eot,
        add_bos=tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id],
        add_eos=tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id],
        add_space_prefix=bool(ns.add_dummy_prefix),
        remove_extra_whitespaces=bool(ns.remove_extra_whitespaces),
        chat_template=template if isinstance(template, str) else None,
        source_pieces=source,
        added=added,
    )


# -------------------------------------------------------------------------------- tensors
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's per-head [first halves | second halves] rows -> llama.cpp's adjacent rotary pairs.

    Within each head of ``d`` rows, row ``i`` goes to ``2i`` and row ``d/2 + i`` to ``2i + 1`` (also
    for a 1-D bias). ``n_head`` is the number of heads the tensor holds (the KV heads for K).
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class PlannedTensor:
    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    file: Path

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def _block_id(name: str) -> int:
    return next((int(p) for p in name.split(".") if p.isdecimal()), -1)


def plan_tensors(spec: ModelSpec, dtype: str) -> list[PlannedTensor]:
    """Every tensor's GGUF name, shape and type, in file order (embedding, blocks, output)."""
    import gguf
    from safetensors import safe_open

    if dtype not in DTYPES:
        raise InputError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}", where="ExportConfig.dtype")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.arch)
    names = gguf.TensorNameMap(arch, spec.num_layers)
    want = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}.get(
        dtype, gguf.GGMLQuantizationType.Q8_0
    )
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    out: list[PlannedTensor] = []
    files = weight_files(spec.model_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(set(files.values())):
        with safe_open(str(f), framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})  # noqa: SIM118 (safe_open is not a mapping)
    for hf_name, f in files.items():
        if hf_name == "lm_head.weight" and spec.tied_embeddings:
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(
                f"tensor {hf_name!r} has no llama.cpp name for architecture {spec.arch}",
                where=str(f),
                fix="export a plain model of a supported family (no adapters or extra heads)",
            )
        shape = shapes[hf_name]
        if len(shape) == 1 or name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F32
        elif want == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % block:
            log.info(f"{name}: row length {shape[-1]} is not a multiple of {block}, stored as f16")
            qtype = gguf.GGMLQuantizationType.F16
        else:
            qtype = want
        out.append(PlannedTensor(hf_name, name, shape, qtype, f))
    if not spec.tied_embeddings and not any(t.name == "output.weight" for t in out):
        raise InputError(
            f"{spec.model_dir} has no lm_head.weight and tie_word_embeddings is false", where=str(spec.model_dir)
        )
    order = {"token_embd.weight": -2, "output_norm.weight": 1 << 30, "output.weight": (1 << 30) + 1}
    return sorted(out, key=lambda t: (order.get(t.name, _block_id(t.name)), t.name))


def convert_tensor(t: PlannedTensor, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """One HF tensor (float32) as the bytes GGUF stores for it: Q/K rows permuted, then cast or quantised."""
    import gguf

    if spec.permute and t.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        w = permute_qk(w, spec.num_heads)
    elif spec.permute and t.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        w = permute_qk(w, spec.num_kv_heads)
    data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), t.qtype)
    if t.qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(data).all():
        raise InputError(
            f"{t.hf_name} has values beyond float16's range (max |w| = {float(np.abs(w).max()):.4g})",
            where=str(t.file),
            fix="export with dtype=bf16 or dtype=q8_0",
        )
    return data


# -------------------------------------------------------------------------------- writing
def write_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    dtype: str = "f16",
    name: Optional[str] = None,
    card: Optional[dict] = None,
) -> dict:
    """Write ``model_dir`` as one GGUF file; returns what was written (sizes, types, seconds).

    Args:
        model_dir: an HF model dir of a supported family, with ``tokenizer.model``.
        out_file: the .gguf path (its parent must exist).
        dtype: f16, bf16 or q8_0 for the 2-D weights.
        name: general.name (default: the dir's name).
        card: optional general.* metadata: license, languages, tags, base_model.
    """
    import gguf
    import torch
    from safetensors import safe_open

    t0 = time.time()
    spec = model_spec(model_dir)
    vocab = sentencepiece_vocab(spec.model_dir, spec.vocab_size)
    plan = plan_tensors(spec, dtype)
    card = card or {}
    w = gguf.GGUFWriter(str(out_file), spec.arch)
    ftype = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or spec.model_dir.name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if card.get("license"):
        w.add_license(card["license"])
    if card.get("languages"):
        w.add_languages(card["languages"])
    if card.get("tags"):
        w.add_tags(card["tags"])
    if card.get("base_model"):
        w.add_base_model_count(1)
        w.add_base_model_name(0, card["base_model"])

    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim != spec.hidden_size // spec.num_heads:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if spec.rope_linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope_linear_factor)
    w.add_vocab_size(spec.vocab_size)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    for key, value in (
        ("bos", vocab.bos_id),
        ("eos", vocab.eos_id),
        ("unk", vocab.unk_id),
        ("pad", vocab.pad_id),
        ("eot", vocab.eot_id),
    ):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)

    for t in plan:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    by_type: dict[str, dict[str, int]] = {}
    handles: dict[Path, Any] = {}
    try:
        for t in plan:
            if t.file not in handles:
                handles[t.file] = safe_open(str(t.file), framework="pt")
            src = handles[t.file].get_tensor(t.hf_name).to(torch.float32).numpy()
            w.write_tensor_data(convert_tensor(t, src, spec))
            s = by_type.setdefault(t.qtype.name.lower(), {"tensors": 0, "params": 0, "bytes": 0})
            s["tensors"] += 1
            s["params"] += int(np.prod(t.shape))
            s["bytes"] += t.nbytes
    finally:
        w.close()
        handles.clear()
    size = Path(out_file).stat().st_size
    log.info(f"gguf: {out_file} ({size / 2**20:.1f} MiB, {len(plan)} tensors, {time.time() - t0:.1f}s)")
    return {
        "file": Path(out_file).name,
        "bytes": size,
        "arch": spec.arch,
        "dtype": dtype,
        "tensors": len(plan),
        "params": sum(v["params"] for v in by_type.values()),
        "by_type": by_type,
        "vocab_tokens": len(vocab.tokens),
        "tokenizer_pieces": vocab.source_pieces,
        "added_tokens": vocab.added,
        "chat_template": vocab.chat_template is not None,
        "seconds": round(time.time() - t0, 3),
    }


def read_gguf_tensors(path: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name -> (type name, the tensor dequantised to float32 in numpy order)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = (t.tensor_type.name.lower(), arr.reshape(tuple(int(x) for x in reversed(t.shape.tolist()))))
    return out
