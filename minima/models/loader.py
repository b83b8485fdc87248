"""Load model dirs: device and dtype resolution, the teacher for inference, a model with its tokenizer."""

from __future__ import annotations

import os

import torch

from minima.core.errors import InputError


def load_teacher(path: str, device: torch.device, zero3: bool = False, micro_batch_size: int = 1):
    """The teacher for inference: eval mode, no grad, bf16 on GPU / fp32 on CPU.

    ``zero3`` shards its parameters over the ranks (DeepSpeed ZeRO-3 inference: each forward
    gathers one layer at a time), for teachers too big to replicate next to the student's states.
    """
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not zero3:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    else:
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model, *_ = deepspeed.initialize(model=model, config=ds)
        del holder
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return f"cuda:{local}"
        return "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def load_model(path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """An HF causal LM and its tokenizer, on ``device`` in ``dtype``; checks that the vocabularies agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot load the tokenizer of {path}: {e}",
            where=path,
            fix="save the tokenizer into the model dir (tokenizer.json or tokenizer.model + tokenizer_config.json)",
        ) from None
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code
    )
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise InputError(
            f"tokenizer has {len(tok)} tokens but the model's embedding has {rows} rows",
            where=path,
            fix="resize the model's embeddings to the tokenizer (the vocab stage does this)",
        )
    return model.to(dev).eval(), tok
