"""Load the model to train without a full fp32 copy of it on every rank.

A 7B model is 27 GB in fp32; eight ranks of a node each loading it would need 220 GB of host RAM
before any sharding happens. :func:`load_pretrained` builds the model the way the strategy will
hold it:

- ``strategy=deepspeed`` with ZeRO-3: ``from_pretrained`` runs while an ``HfDeepSpeedConfig`` lives,
  so transformers builds the model under ``deepspeed.zero.Init`` (each parameter is partitioned as
  it is created) and loads the checkpoint one gathered parameter at a time;
- ``strategy=fsdp`` with more than one rank and a safetensors checkpoint: every rank builds the
  modules with their parameters on the meta device (no memory), each parameter tagged with the
  checkpoint tensor it comes from; ``FSDPStrategy.setup`` shards the model and every rank reads only
  its own rows of each tensor from the memory-mapped files (:func:`materialize_from_files`), so no
  rank ever holds the whole model;
- ``strategy=fsdp`` with more than one rank otherwise (``.bin`` checkpoints, a recipe that changes the
  parameters after loading): rank 0 loads the checkpoint, the other ranks build on the meta device,
  and ``setup`` sends rank 0's weights to every rank's shard (:func:`materialize_from_rank0`);
- otherwise a plain ``from_pretrained``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

#: Attribute of a meta parameter naming the checkpoint tensor it is read from: ``(file, key)``.
SOURCE_ATTR = "_minima_source"


def zero3_enabled(cfg) -> bool:
    """Whether ``cfg`` trains with DeepSpeed ZeRO stage 3."""
    if getattr(cfg, "strategy", "deepspeed") != "deepspeed":
        return False
    from minima.train.ds_config import load_ds_config

    if cfg.zero_stage is not None:
        return cfg.zero_stage == 3
    try:
        return int(load_ds_config(cfg.ds_config).get("zero_optimization", {}).get("stage", 0)) == 3
    except Exception:  # an unreadable ds_config is reported by the strategy with its file:line
        return False


def _hidden_size(path: str) -> Optional[int]:
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(str(path))
        return getattr(c.get_text_config(), "hidden_size", None)
    except Exception:
        return None


@contextmanager
def zero3_init(cfg, ctx, path: Optional[str] = None):
    """While open, transformers builds models partitioned over the ranks (``deepspeed.zero.Init``)."""
    from transformers.integrations import HfDeepSpeedConfig

    from minima.train.ds_config import resolve_ds_config

    ds = resolve_ds_config(
        cfg,
        world_size=ctx.world_size,
        total_steps=1,
        on_gpu=ctx.device.type == "cuda",
        hidden_size=_hidden_size(path) if path else None,
    )
    holder = HfDeepSpeedConfig(ds)  # transformers keeps only a weak reference: it is active while this lives
    try:
        yield
    finally:
        del holder


def build_context(cfg, ctx, path: Optional[str] = None):
    """The context the loop builds the recipe's model in: ZeRO-3 stays enabled for the whole build, so
    what the recipe does after loading (resizing embeddings, LoRA) gathers the partitioned weights."""
    from contextlib import nullcontext

    return zero3_init(cfg, ctx, path) if zero3_enabled(cfg) else nullcontext()


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also under ZeRO-3 (where the tensor itself is an empty partition)."""
    return getattr(p, "ds_shape", p.shape)


def meta_ranks(cfg, ctx) -> bool:
    """True on the ranks that build the model on the meta device and receive rank 0's weights (FSDP)."""
    return getattr(cfg, "strategy", "") == "fsdp" and ctx.world_size > 1 and ctx.rank != 0


def checkpoint_sources(path, model: torch.nn.Module) -> Optional[dict[str, tuple[str, str]]]:
    """Where each parameter of ``model`` is stored in the safetensors checkpoint at ``path``.

    Returns ``{parameter name: (file, key)}``, or None when the checkpoint is not safetensors or some
    parameter has no tensor of its name (with or without the base model's prefix) and shape there.
    """
    from safetensors import safe_open

    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({str(d / f) for f in json.loads(index.read_text())["weight_map"].values()})
    elif (d / "model.safetensors").is_file():
        files = [str(d / "model.safetensors")]
    else:
        return None
    where: dict[str, tuple[str, tuple]] = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            keys = h.keys()  # a safetensors handle is not iterable
            for key in keys:
                where[key] = (f, tuple(h.get_slice(key).get_shape()))
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, p in model.named_parameters():
        keys = [name]
        if prefix:
            keys += [name[len(prefix) + 1 :]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        hit = next((k for k in keys if k in where and where[k][1] == tuple(full_shape(p))), None)
        if hit is None:
            return None
        out[name] = (where[hit][0], hit)
    return out


def load_pretrained(path, cfg, ctx, family: str = "causal", rank0_copy: bool = False, **kw) -> torch.nn.Module:
    """The model to train from ``path`` through the one loader, sharded as the strategy will hold it.

    Args:
        path: the HF model dir. cfg: the stage's TrainConfig. ctx: the rank's TrainContext.
        family: ``causal`` or ``seq2seq``.
        rank0_copy: FSDP on several ranks: rank 0 loads the whole model (to send each rank its shard)
            instead of every rank reading its shard from the files; for callers that change the
            parameters after loading (LoRA, resized embeddings), which the files do not hold.
        kw: ``from_pretrained`` keyword arguments (dtype ...).
    """
    from minima.models.loader import load_model, model_class

    if getattr(cfg, "attn_implementation", None):
        kw.setdefault("attn_implementation", cfg.attn_implementation)
    dtype = kw.pop("dtype", torch.float32)

    def load() -> torch.nn.Module:
        return load_model(path, dtype=dtype, for_training=True, family=family, **kw)

    if kw.get("quantization_config") is not None or kw.get("device_map") is not None:
        return load()
    if zero3_enabled(cfg):
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # inside build_context: what the recipe does next is ZeRO-3-aware too
            return load()
        with zero3_init(cfg, ctx, str(path)):
            return load()
    sharded_fsdp = getattr(cfg, "strategy", "") == "fsdp" and ctx.world_size > 1
    if sharded_fsdp and (ctx.rank != 0 or not rank0_copy):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(str(path))
        cls = model_class(config, family)
        # Buffers (e.g. rotary frequencies) are computed, not loaded: keep them real.
        with init_empty_weights(include_buffers=False):
            extra = {"attn_implementation": kw["attn_implementation"]} if kw.get("attn_implementation") else {}
            model = cls.from_config(config, dtype=dtype, **extra)
        if (Path(path) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        sources = None if rank0_copy else checkpoint_sources(path, model)
        if sources is not None:  # every rank reads its own shard in the strategy's setup
            for name, p in model.named_parameters():
                setattr(p, SOURCE_ATTR, sources[name])
            return model
        if ctx.rank != 0:
            return model
    return load()


def has_meta_params(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _to_empty(model: torch.nn.Module, device: torch.device) -> None:
    """Give meta parameters empty storage on ``device``; the other parameters (a recipe's additions, real on
    every rank) and the buffers (computed: rotary frequencies) keep their values."""
    from torch.distributed.tensor import DTensor

    if not has_meta_params(model):
        return

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    keep = {n: local(p).detach().clone() for n, p in model.named_parameters() if not p.is_meta}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in keep.items():
            local(model.get_parameter(name)).copy_(value.to(device))
        for name, value in buffers.items():
            owner, _, attr = name.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            getattr(mod, attr).copy_(value.to(device))


def source_of(p: torch.Tensor) -> Optional[tuple[str, str]]:
    """The checkpoint ``(file, key)`` a meta parameter built by :func:`load_pretrained` is read from."""
    return getattr(p, SOURCE_ATTR, None)


def materialize_from_files(model: torch.nn.Module, sources: dict[str, tuple[str, str]], device) -> None:
    """Fill a sharded (FSDP2) model's parameters, each rank reading only its own shard from the checkpoint.

    ``sources``: ``{parameter name: (safetensors file, key)}`` (:func:`checkpoint_sources`). The files are
    memory-mapped and each rank slices out the rows (and columns) of its local shard, cast to the
    parameter's dtype, so no rank reads or holds a whole tensor it does not own. Not a collective.
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _to_empty(model, device)
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (file, key) in sources.items():
        by_file.setdefault(file, []).append((name, key))
    with torch.no_grad():
        for file, items in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name, key in items:
                    p = model.get_parameter(name)
                    if isinstance(p, DTensor):
                        local = p.to_local()
                        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                    else:
                        local, offset = p.data, (0,) * p.dim()
                    if p.dim() == 0:
                        value = f.get_tensor(key)
                    else:
                        value = f.get_slice(key)[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))]
                    local.copy_(value.to(local.dtype))


def materialize_from_rank0(model: torch.nn.Module, full_state: Optional[dict], device: torch.device) -> None:
    """Collective: give a sharded (FSDP2) model rank 0's weights.

    Rank 0 passes its full state dict (taken before sharding), the others ``None``; ranks whose
    parameters are still on the meta device get empty storage first, and their buffers keep their values.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _to_empty(model, device)
    set_model_state_dict(
        model,
        full_state or {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False),
    )


def block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the model's transformer blocks (``_no_split_modules``), seen through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or [])


def compile_blocks(model: torch.nn.Module, backend: Optional[str] = None) -> int:
    """``torch.compile`` each transformer block in place (``compile=true``); returns how many.

    Blocks, not the whole model: every block has the same graph (compiled once), and the sharding
    hooks of FSDP2 / ZeRO-3 between blocks stay outside the compiled regions.
    """
    names = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for m in blocks:
        m.compile(**({"backend": backend} if backend else {}))
    return len(blocks)


def configure_backends(device: torch.device) -> None:
    """Fast fp32 matmuls on GPU: TF32 tensor cores for the fp32 parts (master weights stay fp32)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
