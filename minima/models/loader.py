"""The one model loader: every HF model dir minima reads goes through :func:`load_model`.

- **Family**: the model class follows the config (``AutoModelForSeq2SeqLM`` for encoder-decoder
  configs, else ``AutoModelForCausalLM``), or ``family=`` forces one.
- **Safety**: weights load from safetensors only (a ``pytorch_model.bin`` is a pickle that can run
  code), and ``trust_remote_code`` stays off unless a caller asks for it.
- **dtype / device**: ``"auto"`` is bf16 (fp16 without bf16 support) on a GPU and fp32 on CPU for
  inference, and fp32 for training (the engines cast); ``"saved"`` keeps the checkpoint's dtype.
- **Inference** models come back in eval mode with gradients off; training ones as loaded.

:func:`load_tokenizer` and :func:`load_config` read the other parts of a model dir with the same
errors, :func:`load_model_and_tokenizer` checks that the two agree, and :func:`load_teacher` adds
the DeepSpeed ZeRO-3 inference variant for distillation teachers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from minima.core.errors import ConfigError, InputError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILIES = ("causal", "seq2seq")
DtypeLike = Union[str, torch.dtype]
DeviceLike = Union[str, torch.device, None]


def resolve_device(device: DeviceLike = "auto") -> str:
    """``"auto"`` -> this rank's GPU (``cuda:LOCAL_RANK``) or ``"cpu"``; other names are checked and kept."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cpu"
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a torch device", fix="use auto, cpu, cuda or cuda:N") from None


def _device(name: DeviceLike) -> torch.device:
    """``resolve_device`` as a ``torch.device``."""
    return torch.device(resolve_device(name))


def resolve_dtype(dtype: DtypeLike, device: DeviceLike = "cpu", for_training: bool = False) -> Any:
    """A torch dtype for ``dtype`` (auto, bf16, fp16, fp32, saved or a torch.dtype) on ``device``.

    ``"auto"``: fp32 for training and on CPU, bf16 on a GPU that has it, else fp16. ``"saved"``
    returns HF's ``"auto"`` (the dtype the checkpoint was saved in).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "saved":
        return "auto"
    if dtype == "auto":
        dev = resolve_device(device)
        if for_training or not dev.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of auto, saved, {', '.join(DTYPES)}", fix="e.g. dtype=bf16")
    return DTYPES[dtype]


def _model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise InputError(
            f"no model at {p} (config.json missing)", where=str(p), fix="pass the directory of a Hugging Face model"
        )
    return p


def load_config(path: str | Path, trust_remote_code: bool = False):
    """The HF config of a model dir (no weights read)."""
    from transformers import AutoConfig

    p = _model_dir(path)
    try:
        return AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        remote = "custom code" in str(e)
        raise InputError(
            f"config.json at {p} is unreadable: {_first_line(e)}",
            where=str(p / "config.json"),
            fix="the model ships its own Python code: set trust_remote_code=true only if you have read it"
            if remote
            else "re-save the model with save_pretrained(dir)",
        ) from None


def model_class(config, family: Optional[str] = None):
    """The class for ``family`` (causal or seq2seq); None: seq2seq for encoder-decoder configs, else causal."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if family is None:
        family = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}", fix=f"one of {', '.join(FAMILIES)}")
    return AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM


def _check_safetensors(p: Path) -> None:
    if any(p.glob("*.safetensors")):
        return
    pickles = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth") and x.is_file())
    if pickles:
        raise InputError(
            f"the weights at {p} are {pickles[0]} (a pickle, which can run code when loaded); minima loads "
            "safetensors only",
            where=str(p),
            fix="if you trust the file, convert it once: AutoModelForCausalLM.from_pretrained(dir, "
            "use_safetensors=False).save_pretrained(dir) writes model.safetensors",
        )
    raise InputError(f"no *.safetensors weights in {p}", where=str(p), fix="save the model with save_pretrained(dir)")


def load_model(
    path: str | Path,
    *,
    dtype: DtypeLike = "auto",
    device: DeviceLike = None,
    for_training: bool = False,
    trust_remote_code: bool = False,
    family: Optional[str] = None,
    **from_pretrained_kw: Any,
) -> torch.nn.Module:
    """An HF model dir as a model (see the module docstring for the rules).

    Args:
        path: model directory (config.json + *.safetensors).
        dtype: auto, bf16, fp16, fp32, saved or a torch.dtype (see :func:`resolve_dtype`).
        device: where to put it; None: ``auto`` for inference, and for training where from_pretrained
            leaves it (CPU, or ``device_map``) so the engine places it.
        for_training: keep train-time state (no eval mode, gradients on, fp32 by default).
        trust_remote_code: allow model code shipped in the directory.
        family: ``causal`` or ``seq2seq``; None follows the config.
        **from_pretrained_kw: passed on (e.g. ``quantization_config``, ``device_map``, ``attn_implementation``).
    """
    p = _model_dir(path)
    cls = model_class(load_config(p, trust_remote_code), family)
    _check_safetensors(p)
    dev = resolve_device(device) if device is not None or not for_training else None
    kw = dict(dtype=resolve_dtype(dtype, dev or "cpu", for_training), trust_remote_code=trust_remote_code)
    kw.update(from_pretrained_kw, use_safetensors=True)
    try:
        model = cls.from_pretrained(str(p), **kw)
    except OSError as e:
        raise InputError(f"cannot load the model at {p}: {_first_line(e)}", where=str(p)) from None
    if dev is not None and "device_map" not in from_pretrained_kw:
        model.to(dev)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in a dir; an unreadable one is a one-line InputError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers raises plain Exceptions for a corrupt tokenizer.json
        raise InputError(
            f"tokenizer at {path} is unreadable: {_first_line(e)}",
            where=str(path),
            fix="save the tokenizer into the dir (tokenizer.json, or tokenizer.model + tokenizer_config.json)",
        ) from None


def load_model_and_tokenizer(path: str | Path, dtype: DtypeLike = "auto", device: DeviceLike = "auto", **kw):
    """An inference model and its tokenizer; the tokenizer must fit the model's embedding rows."""
    tok = load_tokenizer(path, kw.get("trust_remote_code", False))
    model = load_model(path, dtype=dtype, device=device, **kw)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise InputError(
            f"tokenizer has {len(tok)} tokens but the model's embedding has {rows} rows",
            where=str(path),
            fix="resize the model's embeddings to the tokenizer (the vocab stage does this)",
        )
    return model, tok


def load_teacher(path: str, device: torch.device, zero3: bool = False, micro_batch_size: int = 1):
    """A distillation teacher for inference: bf16 on GPU / fp32 on CPU, eval mode, no grad.

    ``zero3`` shards its parameters over the ranks (DeepSpeed ZeRO-3 inference: each forward
    gathers one layer at a time), for teachers too big to replicate next to the student's states.
    """
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if not zero3:
        return load_model(path, dtype=dtype, device=device, family="causal")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
    }
    # While this object lives, from_pretrained partitions weights as it loads (zero.Init); drop it
    # right after so the student is loaded the way its own config says.
    holder = HfDeepSpeedConfig(ds)
    model = load_model(path, dtype=dtype, for_training=True, family="causal")
    model, *_ = deepspeed.initialize(model=model, config=ds)
    del holder
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
