"""minima.models.loader: the one model loader. dtype/device resolution, the class picked per family,
weights equal to a plain HF load, safetensors only, remote code off, and one-line tokenizer errors."""

import shutil

import pytest
import torch

from minima.core.errors import ConfigError, InputError
from minima.models.loader import load_model, load_model_and_tokenizer, load_tokenizer, resolve_device, resolve_dtype
from minima.testing import tiny_family_model, tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader") / "llama"
    tiny_llama(100, 0, hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(str(d))
    return d


def test_dtype_and_device_resolution(monkeypatch):
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16 and resolve_dtype("fp16") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64
    assert resolve_dtype("saved") == "auto"  # HF's word for the checkpoint's own dtype
    with pytest.raises(ConfigError, match="dtype='half'"):
        resolve_dtype("half")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == resolve_device(None) == "cuda:3"  # this rank's GPU
    assert resolve_dtype("auto", "cuda:3") is torch.float16  # no bf16 on this GPU
    assert resolve_dtype("auto", "cuda:3", for_training=True) is torch.float32  # the engines cast


def test_inference_and_training_loads_match_a_plain_hf_load(llama_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    model = load_model(llama_dir)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    ref_sd = ref.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())

    train = load_model(llama_dir, for_training=True)
    assert all(p.requires_grad for p in train.parameters())
    assert load_model(llama_dir, dtype="bf16").dtype == torch.bfloat16


def test_seq2seq_family_picked_for_t5(tmp_path):
    d = tmp_path / "t5"
    tiny_family_model("t5", vocab_size=100).save_pretrained(str(d))
    model = load_model(d)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    with pytest.raises(ValueError):  # forcing the causal class on an encoder-decoder config fails
        load_model(d, family="causal")
    with pytest.raises(ConfigError, match="unknown model family"):
        load_model(d, family="vision")


def test_pickle_weights_are_refused_with_the_fix(tmp_path, llama_dir):
    from safetensors.torch import load_file

    d = tmp_path / "bin_only"  # the same weights, as the pickle older checkpoints ship
    d.mkdir()
    shutil.copy(llama_dir / "config.json", d / "config.json")
    torch.save(load_file(str(llama_dir / "model.safetensors")), d / "pytorch_model.bin")
    with pytest.raises(InputError) as e:
        load_model(d)
    assert "pytorch_model.bin" in e.value.what and "safetensors only" in e.value.what
    assert "save_pretrained" in e.value.fix

    with pytest.raises(InputError, match="config.json missing"):
        load_model(tmp_path / "nowhere")


def test_remote_code_stays_off_unless_asked(tmp_path, llama_dir, monkeypatch):
    import json

    from transformers import AutoModelForCausalLM

    # A dir whose config asks for its own Python code: nothing of it may run by default.
    d = tmp_path / "custom"
    shutil.copytree(llama_dir, d)
    marker = tmp_path / "code_ran"
    (d / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="custom code") as e:
        load_model(d)
    assert not marker.exists() and "trust_remote_code" in e.value.fix

    seen = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kw):
        seen.update(kw)
        return real(cls, path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model(llama_dir)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def test_tokenizer_errors_are_one_line(tmp_path, tiny_model_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    tok = load_tokenizer(d)
    model, tok2 = load_model_and_tokenizer(d)
    assert len(tok2) == len(tok) == model.get_input_embeddings().weight.shape[0]

    (d / "tokenizer.json").write_text("{ not json")
    (d / "tokenizer.model").unlink(missing_ok=True)
    with pytest.raises(InputError) as e:
        load_tokenizer(d)
    assert str(e.value).startswith(f"{d}: tokenizer at {d} is unreadable: ") and "\n" not in str(e.value)
