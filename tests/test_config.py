import pytest
import yaml

from minima.core.config import (
    STAGE_CONFIGS,
    AdaptConfig,
    EvaluateConfig,
    PipelineConfig,
    PruneConfig,
    RecordsConfig,
    build,
    parse_override,
)
from minima.core.errors import ConfigError
from minima.core.presets import PRESETS, get_preset, stage_part


def test_override_coercion_by_field_type():
    cfg = build(
        AdaptConfig,
        overrides=[
            "lr=1e-4",
            "max_steps=30",
            "activation_checkpointing=true",
            "betas=[0.8, 0.99]",
            "launch.nproc_per_node=2",
            "model=007",
        ],
    )
    assert cfg.lr == 1e-4 and isinstance(cfg.max_steps, int) and cfg.max_steps == 30
    assert cfg.activation_checkpointing is True
    assert cfg.betas == (0.8, 0.99)
    assert cfg.launch.nproc_per_node == 2
    assert cfg.model == "007"  # a str field keeps the raw text, no YAML int coercion


def test_list_of_str_fields_parse_as_lists():
    from minima.core.config import SftConfig

    cfg = build(SftConfig, overrides=["lora.target_modules=[q_proj, v_proj]", "train_files=[a.json]"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.train_files == ["a.json"]


def test_nested_dotted_overrides_and_lists():
    cfg = build(
        RecordsConfig,
        overrides=["inputs=[{name: a, path: 'x/*.txt', size: 10%}, {name: b, path: y.jsonl, size: 1000}]"],
    )
    assert [s.name for s in cfg.inputs] == ["a", "b"]
    assert cfg.inputs[0].size == "10%" and cfg.inputs[1].size == 1000
    ev = build(EvaluateConfig, overrides=["tasks.mmlu.path=/data/mmlu", "tasks.mmlu.shots=5"])
    assert ev.tasks["mmlu"].path == "/data/mmlu" and ev.tasks["mmlu"].shots == 5


def test_unknown_key_names_it_and_the_closest():
    with pytest.raises(ConfigError) as e:
        parse_override(AdaptConfig, "warmup_proprtion=0.1")
    assert "warmup_proprtion" in str(e.value) and "warmup_proportion" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_override(AdaptConfig, "launch.nprocs_per_node=2")
    assert "launch.nprocs_per_node" in str(e.value) and "nproc_per_node" in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-4\nmax_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        build(AdaptConfig, file=str(f))
    assert "max_stepz" in str(e.value) and "max_steps" in str(e.value)


def test_bad_value_names_field_and_value():
    with pytest.raises(ConfigError) as e:
        build(AdaptConfig, overrides=["lr=-1"])
    assert "lr" in str(e.value) and "-1" in str(e.value)


def test_shape_validation_has_the_arithmetic():
    with pytest.raises(ConfigError) as e:
        build(PruneConfig, overrides=["hidden_size=100", "num_heads=3"])
    assert "100 / 3 = 33.33" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build(PruneConfig, overrides=["num_heads=24", "num_key_value_heads=5"])
    assert "num_key_value_heads=5" in str(e.value)


def test_presets_validate_and_have_minima_shapes():
    for name in PRESETS:
        p = get_preset(name)
        assert isinstance(p, PipelineConfig)
        for stage, model in STAGE_CONFIGS.items():
            part = stage_part(p, stage)
            assert isinstance(part, model)
            model.model_validate(part.model_dump())  # round-trips through validation
    m = get_preset("minima-3b")
    assert (m.prune.num_layers, m.prune.num_heads, m.prune.hidden_size, m.prune.intermediate_size) == (
        24,
        24,
        3072,
        8192,
    )
    assert m.prune.keep_layers == list(range(4, 28))
    assert (m.distill.loss.alpha, m.distill.loss.kd, m.distill.lr, m.distill.warmup_proportion) == (
        0.5,
        "soft_ce",
        3e-4,
        0.01,
    )
    with pytest.raises(ConfigError) as e:
        get_preset("minima3b")
    assert "minima-3b" in str(e.value)


def test_yaml_roundtrip(tmp_path):
    from minima.core.config import to_yaml

    cfg = stage_part(get_preset("tiny"), "adapt")
    f = tmp_path / "a.yaml"
    f.write_text(to_yaml(cfg))
    assert build(AdaptConfig, file=str(f)) == cfg
    assert yaml.safe_load(to_yaml(cfg))["lr"] == cfg.lr


def test_example_pipeline_config_validates():
    from pathlib import Path

    from minima.core.config import PipelineConfig
    from minima.core.presets import get_preset

    f = Path(__file__).resolve().parents[1] / "configs" / "minima-3b.example.yaml"
    cfg = build(PipelineConfig, base=get_preset("minima-3b").model_dump(mode="json"), file=str(f))
    assert cfg.prune.num_layers == 24 and cfg.distill.loss.kd == "soft_ce"  # the recipe comes from the preset
    assert cfg.adapt.launch.launcher == "slurm" and [s.name for s in cfg.records_lm.inputs] == ["wudao", "c4"]
