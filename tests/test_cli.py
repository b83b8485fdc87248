import subprocess
import sys

import yaml

from minima.cli import main


def test_config_prints_yaml(capsys):
    assert main(["config", "adapt", "--preset", "tiny", "lr=0.01"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["lr"] == 0.01 and out["zero_stage"] == 2


def test_unknown_key_exits_2_naming_it(capsys):
    assert main(["config", "adapt", "--preset", "tiny", "no_such_field=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_field" in err and err.count("\n") == 2  # one line + one hint


def test_unknown_stage_and_command(capsys):
    assert main(["config", "adpat"]) == 2
    assert "adapt" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_help_lists_only_working_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    from minima.cli import _available
    from minima.core.registry import COMMANDS, STAGE_RUNNERS

    for stage, target in STAGE_RUNNERS.items():
        assert (f"  {stage} " in out) == _available(target)
    for name, (target, _) in COMMANDS.items():
        assert (f"  {name} " in out) == _available(target)


def test_console_script_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "minima.cli", "config", "vocab", "mode=chinese-llama"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "mode: chinese-llama" in r.stdout
