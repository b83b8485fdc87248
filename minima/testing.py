"""Tiny, deterministic models and tokenizers for tests, demos and benchmarks (built in code)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from minima.core.presets import TINY_TEACHER


def tiny_llama_config(vocab_size: int, **shape):
    """A LlamaConfig of the tiny teacher shape (hidden 128, 4 layers) with overrides."""
    from transformers import LlamaConfig

    kw = dict(
        TINY_TEACHER,
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    kw.update(shape)
    return LlamaConfig(**kw)


def tiny_llama(vocab_size: int = 1000, seed: int = 0, **shape):
    """A random LlamaForCausalLM, identical for the same seed and shape."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(vocab_size, **shape)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def tiny_family_model(family: str, vocab_size: int = 1000, seed: int = 0):
    """Tiny random models of other families: llama, bloom, opt, t5 (dropout off, so runs compare exactly)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        return tiny_llama(vocab_size, seed)
    if family == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=vocab_size, hidden_size=64, n_layer=2, n_head=4))
    if family == "opt":
        return tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=vocab_size,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=128,
                max_position_embeddings=512,
                word_embed_proj_dim=64,
                dropout=0.0,  # no dropout: a training step's loss equals the model's eval loss on that batch
            )
        )
    if family == "t5":
        return tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=vocab_size,
                d_model=64,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
                dropout_rate=0.0,
            )
        )
    raise ValueError(f"unknown family {family!r}")


def demo_tokenizer_dir(out_dir: str | Path, data_dir: Optional[str | Path] = None) -> Path:
    """An HF tokenizer dir built from the demo corpus's English base SentencePiece model."""
    from minima.data import demo as demo_data
    from minima.data.tokenizers import save_sp_tokenizer

    out = Path(out_dir)
    data = Path(data_dir) if data_dir else out.parent / "demo_data"
    sp = data / "tokenizers" / "base_en.model"
    if not sp.is_file():
        demo_data.write(data)
    return save_sp_tokenizer(sp, out)


def save_tiny_model(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, **shape) -> Path:
    """Save a tiny random Llama with the tokenizer's vocab size, as a standard HF dir."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = tiny_llama(len(tok), seed, **shape)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    tm = Path(tokenizer_dir) / "tokenizer.model"
    if tm.is_file():
        import shutil

        shutil.copyfile(tm, out / "tokenizer.model")
    return out


def lm_records(out_dir: str | Path, inputs: str | Path, tokenizer_dir: str | Path, dev_fraction: float = 0.05) -> Path:
    """LM records (seq 32) of ``inputs`` (a file or a glob) in ``<out_dir>/records``, with a dev split."""
    from minima.core.config import RecordsConfig
    from minima.stages.records import run as build_records

    cfg = RecordsConfig(
        inputs=str(inputs),
        tokenizer=str(tokenizer_dir),
        format="lm",
        max_length=32,
        dev_fraction=dev_fraction,
        out_dir=str(Path(out_dir) / "records"),
    )
    return build_records(cfg).path


def lm_records_from_lines(out_dir: str | Path, text: str | Path, tokenizer_dir: str | Path, lines: int) -> Path:
    """LM records (seq 32, 10% dev) of the first ``lines`` lines of ``text``: a small corpus for distill tests."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = out / "text.txt"
    head.write_text("\n".join(Path(text).read_text().splitlines()[:lines]) + "\n")
    return lm_records(out, head, tokenizer_dir, dev_fraction=0.1)


def lm_blocks(ids, seq_len: int):
    """Cut a 1-D token stream into a [N, seq_len] LongTensor (the ragged tail is dropped)."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def train_tiny_lm(
    blocks,
    vocab_size: int,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 0,
    **shape,
):
    """Train a tiny Llama (TINY_TEACHER shape unless overridden) on token blocks with plain AdamW.

    A real, trained model for quality tests (pruning, distillation) in seconds on a CPU: AdamW with
    linear warmup (5%) and cosine decay, causal-LM loss, batches drawn with a seeded generator.

    Args:
        blocks: [N, T] token ids (e.g. ``lm_blocks(ids, 128)``).
        vocab_size: model vocab (> every id in blocks).
        steps, batch_size, lr, seed: the optimisation.
        log_every: print the loss every N steps (0 = silent).
        **shape: LlamaConfig overrides (hidden_size, num_hidden_layers, ...).

    Returns:
        The trained LlamaForCausalLM in eval mode, on the CPU, fp32.
    """
    import math

    import torch

    blocks = torch.as_tensor(blocks, dtype=torch.long)
    model = tiny_llama(vocab_size, seed, **shape).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        ),
    )
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step + 1) % log_every == 0:
            print(f"train_tiny_lm step {step + 1}/{steps} loss {loss.item():.3f}")
    return model.eval()


def perplexity(model, blocks, batch_size: int = 16) -> float:
    """Token-weighted perplexity of a causal LM on [N, T] blocks."""
    import math

    import torch

    blocks = torch.as_tensor(blocks, dtype=torch.long)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            b = blocks[i : i + batch_size]
            n = b.numel() - b.shape[0]  # every position but the first predicts a token
            total += model(input_ids=b, labels=b).loss.item() * n
            count += n
    return math.exp(total / count)
