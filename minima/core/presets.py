"""Named presets. Each is a function returning a whole PipelineConfig; a stage takes its part.

- ``tiny``: the CPU demo scale (hidden 128, 4 layers -> 3 layers / hidden 96), minutes on 2 cores.
- ``minima-3b``: MiniMA's recipe: LLaMA-2-7B teacher (32 layers, 32 heads, hidden 4096, ffn 11008)
  adapted to Chinese, pruned to 24/24/3072/8192 (~3.02B) and distilled with 0.5 CE + 0.5 soft CE.
- ``minichat-3b``: MiniChat's instruction tuning of the MiniMA-3B student, and the optional dpo step
  (``dpo.enabled=true``) with Zephyr-7B-beta's DPO settings (MiniChat-2's are not published).
"""

from __future__ import annotations

from collections.abc import Callable

from minima.core.config import STAGES, PipelineConfig, deep_merge
from minima.core.errors import ConfigError

# Model shapes used by presets, tests and `minima plan`.
LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
MINIMA_3B = dict(
    LLAMA2_7B,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=24,
    num_key_value_heads=24,
)
TINY_TEACHER = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)
TINY_STUDENT = dict(
    TINY_TEACHER,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=3,
    num_key_value_heads=3,
)


def _with(cfg, **changes):
    """A validated copy of a stage config with (nested) changes."""
    return type(cfg).model_validate(deep_merge(cfg.model_dump(), changes))


def tiny() -> PipelineConfig:
    """CPU demo scale: every stage finishes in a minute or two on 2 cores."""
    cfg = PipelineConfig(run_dir="runs/demo")
    cfg.vocab = _with(cfg.vocab, **dict(mode="minima", pad_to_multiple_of=64, embedding_init="mean-of-subtokens"))
    cfg.records_lm = _with(cfg.records_lm, **dict(format="lm", max_length=128, shard_size=2000, dev_fraction=0.05))
    cfg.records_chat = _with(cfg.records_chat, **dict(format="chat", max_length=128, shard_size=2000, dev_fraction=0.1))
    train = dict(
        precision="fp32",
        zero_stage=2,
        micro_batch_size=8,
        gradient_accumulation_steps=1,
        lr=3e-3,
        warmup_proportion=0.05,
        max_steps=400,
        eval_steps=100,
        save_steps=100,
    )
    cfg.adapt = _with(cfg.adapt, **dict(train, max_steps=800, eval_steps=200, save_steps=400))
    s = TINY_STUDENT
    cfg.prune = _with(
        cfg.prune,
        **dict(
            num_layers=s["num_hidden_layers"],
            num_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_key_value_heads"],
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_samples=64,
            max_length=128,
            batch_size=8,
            importance="activation",
            layer_importance="block-influence",
        ),
    )
    cfg.distill = _with(cfg.distill, **dict(train, max_steps=250, eval_steps=50, save_steps=250))
    cfg.sft = _with(
        cfg.sft, **dict(train, lr=5e-4, max_steps=-1, epochs=6, warmup_proportion=0.1, max_length=128, patience=2)
    )
    cfg.evaluate = _with(cfg.evaluate, **dict(tasks=["demo_mc", "demo_qa", "perplexity"], batch_size=16))
    cfg.scratch = True  # the from-scratch student beside the pruned one
    cfg.records_pref = _with(
        cfg.records_pref,
        **dict(format="preference", max_length=128, max_prompt_length=64, shard_size=2000, dev_fraction=0.2),
    )
    cfg.dpo = _with(
        cfg.dpo,
        **dict(
            train,
            lr=5e-5,  # at 5e-4 the demo's chat model loses held-out answers (demo_qa 0.84 -> 0.71)
            max_steps=60,
            eval_steps=20,
            save_steps=20,
            warmup_proportion=0.1,
            max_length=128,
            max_prompt_length=64,
        ),
    )
    return cfg


def micro() -> PipelineConfig:
    """The tiny preset cut to a few steps per stage: the end-to-end test and a smoke run (~2-3 min)."""
    cfg = tiny()
    cfg.run_dir = "runs/micro"
    short = dict(max_steps=12, eval_steps=6, save_steps=6, micro_batch_size=4)
    cfg.adapt = _with(cfg.adapt, **short)
    cfg.prune = _with(cfg.prune, num_samples=16, batch_size=8)
    cfg.distill = _with(cfg.distill, **short)
    cfg.sft = _with(cfg.sft, **dict(short, epochs=1, patience=0))
    cfg.dpo = _with(cfg.dpo, **short)
    cfg.evaluate = _with(cfg.evaluate, limit=20)
    cfg.scratch = False
    return cfg


def minima_3b() -> PipelineConfig:
    """MiniMA: adapt LLaMA-2-7B, prune to 24/24/3072/8192, distil with 0.5 CE + 0.5 soft CE."""
    cfg = PipelineConfig(run_dir="runs/minima-3b")
    cfg.vocab = _with(cfg.vocab, **dict(mode="minima", pad_to_multiple_of=64, embedding_init="normal"))
    # build_pretraining_data.sh: max_seq_length 4096, num_processors 32. Its --do_lower_case is left off here:
    # LLaMA's tokenizer is cased, and lowercasing would drop English case; lowercase=true applies it literally.
    lm = dict(format="lm", max_length=4096, shard_size=10000, dev_fraction=0.001, lowercase=False, num_workers=32)
    cfg.records_lm = _with(cfg.records_lm, **lm)
    cfg.records_chat = _with(
        cfg.records_chat, **dict(format="chat", max_length=4096, dev_fraction=0.01, num_workers=16)
    )
    # adapt_llama.sh / distil_minima.sh: cosine, warmup 1%, weight decay 0.1, clip 1.0, seed 776, bf16,
    # activation checkpointing, one epoch.
    big = dict(
        precision="bf16",
        zero_stage=3,
        micro_batch_size=4,
        lr_schedule="cosine",
        seed=776,
        epochs=1,
        warmup_proportion=0.01,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        grad_clip=1.0,
        activation_checkpointing=True,
        save_steps=1000,
        eval_steps=1000,
    )
    # 4 x 8 per GPU, on 32 GPUs: a global batch of 1024 sequences of 4096 tokens.
    cfg.adapt = _with(cfg.adapt, **dict(big, lr=3e-5, gradient_accumulation_steps=8))
    cfg.prune = _with(
        cfg.prune,
        **dict(
            num_layers=24,
            num_heads=24,
            num_key_value_heads=24,
            hidden_size=3072,
            intermediate_size=8192,
            keep_layers=list(range(4, 28)),
            importance="gradient",
            num_samples=1024,
            max_length=512,  # prune_llama.sh: max_length 512, per_device_eval_batch_size 2
            batch_size=2,
            dtype="bf16",
            vocab_size=49216,
        ),
    )  # dry run without a teacher dir: MiniMA's adapted vocab (32000 + CJK, padded) -> 3.02B
    cfg.distill = _with(
        cfg.distill,
        # 8 x 8 per GPU, on 16 GPUs: a global batch of 1024 (fits: `minima plan distill` says 38.8 of 80 GiB).
        **dict(
            big,
            lr=3e-4,
            micro_batch_size=8,
            gradient_accumulation_steps=8,
            loss={"alpha": 0.5, "kd": "soft_ce", "temperature": 1.0},
        ),
    )
    chat = minichat_3b()
    cfg.sft, cfg.records_pref, cfg.dpo = chat.sft, chat.records_pref, chat.dpo
    cfg.evaluate = _with(cfg.evaluate, **dict(tasks=["mmlu", "ceval", "cmmlu", "gsm8k"], shots=5, batch_size=32))
    return cfg


def minichat_3b() -> PipelineConfig:
    """MiniChat: full-parameter chat tuning of MiniMA-3B with loss on assistant turns, patience 2 epochs."""
    cfg = PipelineConfig(run_dir="runs/minichat-3b")
    # instruct_minichat.sh: 16 x 2 per GPU on 8 GPUs = a global batch of 256 (fits: `minima plan sft` says
    # 37 of 80 GiB), lr 2e-5, cosine, warmup 10%, weight decay 0.1, clip 1.0, seed 776, 3 epochs, and
    # num_patience_epochs 2: a dev evaluation at each epoch end, patience counted in those evaluations.
    cfg.sft = _with(
        cfg.sft,
        **dict(
            precision="bf16",
            zero_stage=3,
            micro_batch_size=16,
            gradient_accumulation_steps=2,
            lr=2e-5,
            lr_schedule="cosine",
            weight_decay=0.1,
            grad_clip=1.0,
            seed=776,
            epochs=3,
            warmup_proportion=0.1,
            max_length=4096,
            loss_on="assistant",
            chat_format="minichat",
            eval_per_epoch=True,
            patience=2,
            activation_checkpointing=True,
        ),
    )
    # build_instruction_data.sh: max_seq_length 4096, num_processors 16 (--do_lower_case left off, as for pretraining)
    cfg.records_chat = _with(
        cfg.records_chat, **dict(format="chat", chat_format="minichat", max_length=4096, num_workers=16)
    )
    # DPO after sft (MiniChat-2's last step). MiniChat-2's model card says only that DPO was used, so these are
    # Zephyr-7B-beta's published settings: beta 0.1, lr 5e-7, 10% warmup, 3 epochs, batch 32 (2 x 2 x 8 GPUs),
    # Adam betas (0.9, 0.999), no weight decay, decay to 0 (linear there, cosine here); max length 1024, prompt 512.
    cfg.records_pref = _with(
        cfg.records_pref,
        **dict(format="preference", chat_format="minichat", max_length=1024, max_prompt_length=512),
    )
    cfg.dpo = _with(
        cfg.dpo,
        **dict(
            precision="bf16",
            zero_stage=3,
            ref_zero3=True,
            micro_batch_size=2,
            gradient_accumulation_steps=2,
            lr=5e-7,
            min_lr_ratio=0.0,
            warmup_proportion=0.1,
            epochs=3,
            betas=(0.9, 0.999),
            weight_decay=0.0,
            chat_format="minichat",
            max_length=1024,
            max_prompt_length=512,
            activation_checkpointing=True,
            loss={"type": "sigmoid", "beta": 0.1},
        ),
    )
    cfg.evaluate = _with(cfg.evaluate, **dict(tasks=["mmlu", "ceval", "cmmlu", "gsm8k"], shots=5, chat_template=True))
    return cfg


PRESETS: dict[str, Callable[[], PipelineConfig]] = {
    "tiny": tiny,
    "micro": micro,
    "minima-3b": minima_3b,
    "minichat-3b": minichat_3b,
}


def get_preset(name: str) -> PipelineConfig:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        raise ConfigError(
            f"unknown preset '{name}'",
            fix=f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(PRESETS)}",
        )
    return PRESETS[name]()


def stage_part(pipeline: PipelineConfig, stage: str):
    """The stage's config inside a pipeline config (records -> the pretraining-text records)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'", fix=f"choose one of {', '.join(STAGES)}")
    return pipeline.records_lm if stage == "records" else getattr(pipeline, stage)
