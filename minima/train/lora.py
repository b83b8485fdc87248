"""LoRA adapters through peft: wrapping, checks, QLoRA gating and export.

MiniMA's LoRA variant adapts every projection of a LLaMA block (q, k, v, o, gate, up, down); that is
the default target set. Other families name their projections differently, so a target that the
model does not have is an error that lists the names it does have (and the family's usual set when
we know it), instead of peft's silent partial match.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from minima.core.config import LoraConfig
from minima.core.errors import ConfigError

#: The usual LoRA targets of other families, offered in the error message when the default misses.
FAMILY_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
}


def module_names(model, kinds: str = "linear") -> list[str]:
    """Sorted distinct last-component names of the model's linear (or embedding) modules."""
    import torch
    from transformers.pytorch_utils import Conv1D

    want = (torch.nn.Linear, Conv1D) if kinds == "linear" else (torch.nn.Embedding,)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, want)})


def _all_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def check_targets(model, cfg: LoraConfig) -> None:
    """Raise ConfigError naming each target / modules_to_save entry the model does not have."""
    linear = module_names(model, "linear")
    adaptable = set(linear) | set(module_names(model, "embedding"))
    targets = [t for t in cfg.target_modules if t != "all-linear"]
    missing = [t for t in targets if t not in adaptable]
    if missing:
        family = getattr(model.config, "model_type", "?")
        hint = f"; the usual {family} set is {FAMILY_TARGETS[family]}" if family in FAMILY_TARGETS else ""
        raise ConfigError(
            f"LoRA target module(s) {missing} not found in this {family} model; its linear modules are {linear}",
            where="sft.lora.target_modules",
            fix=f"set lora.target_modules to some of {linear}{hint}",
        )
    names = _all_names(model)
    bad = [m for m in cfg.modules_to_save if m not in names]
    if bad:
        raise ConfigError(
            f"lora.modules_to_save entries {bad} are not modules of this model",
            where="sft.lora.modules_to_save",
            fix=f"use module names such as lm_head / embed_tokens (linear: {linear}; embeddings: "
            f"{module_names(model, 'embedding')})",
        )


def check_qlora(cfg: LoraConfig) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU; say so before any model is loaded."""
    if not cfg.qlora:
        return
    import importlib.util

    import torch

    if not cfg.enabled:
        raise ConfigError(
            "lora.qlora=true needs lora.enabled=true", where="sft.lora.qlora", fix="set lora.enabled=true"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "QLoRA (4-bit base weights) needs the bitsandbytes package, which is not installed",
            where="sft.lora.qlora",
            fix="pip install bitsandbytes on a CUDA machine, or set lora.qlora=false for plain LoRA",
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "QLoRA (4-bit base weights) runs only on a CUDA GPU and none is visible",
            where="sft.lora.qlora",
            fix="run on a GPU machine, or set lora.qlora=false for plain LoRA",
        )


def quantization_config():
    """The NF4 double-quant config QLoRA loads base weights with (bf16 compute)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def apply_lora(model, cfg: LoraConfig, gradient_checkpointing: bool = False):
    """Wrap ``model`` in a peft LoRA model (base weights frozen); checks the targets first.

    Args:
        model: a transformers causal or seq2seq LM.
        cfg: the LoRA options.
        gradient_checkpointing: passed to peft's k-bit preparation for QLoRA.

    Returns:
        The ``PeftModel``; only LoRA weights and ``modules_to_save`` copies require grad.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    check_targets(model, cfg)
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    targets: list[str] | str = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    pcfg = PeftLoraConfig(
        task_type=task,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        bias="none",
    )
    return get_peft_model(model, pcfg)


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def lora_state(model) -> dict:
    """name -> tensor of the trainable adapter weights (for tests and reports)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def export_lora(
    model, out_dir: str | Path, merge: bool, base_model: Optional[str] = None, state_dict: Optional[dict] = None
) -> Path:
    """Write a LoRA model: merged into a plain HF dir, or as a peft adapter dir.

    Args:
        model: the ``PeftModel`` (on CPU or GPU; parameters must be whole, not ZeRO-3 shards).
        out_dir: target directory (created).
        merge: True -> ``merge_and_unload`` and ``save_pretrained`` a plain model that loads with
            ``AutoModelForCausalLM``; False -> ``adapter_config.json`` + ``adapter_model.safetensors``.
        base_model: recorded as the adapter's ``base_model_name_or_path`` (where to load it from).
        state_dict: optional full state dict of ``model`` (e.g. gathered from ZeRO-3 shards).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=False)
    if merge:
        # merge_and_unload mutates the wrapped model; callers export once, at the end.
        plain = model.merge_and_unload()
        plain.save_pretrained(str(out), safe_serialization=True)
        return out
    model.save_pretrained(str(out), safe_serialization=True)
    if base_model:
        p = out / "adapter_config.json"
        data = json.loads(p.read_text())
        data["base_model_name_or_path"] = str(base_model)
        p.write_text(json.dumps(data, indent=2))
    return out


def load_adapter(adapter_dir: str | Path, base_dir: Optional[str | Path] = None):
    """Load an adapter dir on its base model (the one recorded in adapter_config.json by default)."""
    from peft import PeftModel

    from minima.models.loader import load_model

    adapter_dir = Path(adapter_dir)
    if base_dir is None:
        base_dir = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_model(base_dir, dtype="saved", for_training=True)  # the family follows the base config
    return PeftModel.from_pretrained(base, str(adapter_dir))


def copy_files(src: str | Path, dst: str | Path, names: Iterable[str]) -> None:
    """Copy the named files from ``src`` to ``dst`` when they exist (tokenizer side files)."""
    for n in names:
        p = Path(src) / n
        if p.is_file():
            shutil.copyfile(p, Path(dst) / n)
