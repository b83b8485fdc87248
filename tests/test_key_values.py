"""The one key=value parser: stage overrides, `minima plan`'s plan.* options, `minima demo-data` and
`minima chat` all split, check and report keys the same way."""

import pytest

from minima.core.config import DistillConfig, build, key_values, parse_override, split_key_value
from minima.core.errors import ConfigError


def test_split_at_the_first_equals_sign():
    assert split_key_value("a.b=x=y") == ("a.b", "x=y")
    assert split_key_value(" k =") == ("k", "")
    with pytest.raises(ConfigError, match="'lr' is not key=value"):
        split_key_value("lr")
    assert parse_override(DistillConfig, "teacher=a=b") == (["teacher"], "a=b")
    assert build(DistillConfig, overrides=["teacher=t=1", "loss.temperature=2"]).teacher == "t=1"


def test_unknown_keys_name_the_closest_one():
    assert key_values(["model=m", "temperature=0.5", "model=n"], ("model", "temperature")) == {
        "model": "n",
        "temperature": "0.5",
    }
    assert key_values(None) == {}
    with pytest.raises(ConfigError) as e:
        key_values(["modle=m"], ("model", "system"))
    assert "unknown key 'modle'" in str(e.value) and e.value.fix == "did you mean 'model'?"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "adapt", "--preset", "tiny", "plan.gpu=16"], "did you mean 'plan.gpus'?"),
        (["demo-data", "sed=1"], "did you mean 'seed'?"),
        (["demo-data", "seed=one"], "seed"),
        (["demo-data", "out_dir"], "is not key=value"),
        (["chat", "modle=x"], "did you mean 'model'?"),
    ],
)
def test_commands_reject_bad_arguments_the_same_way(argv, message, capsys):
    from minima.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_data_help_lists_its_options(capsys):
    from minima.cli import main

    assert main(["demo-data", "--help"]) == 0
    out = capsys.readouterr().out
    assert "out_dir" in out and "seed" in out
