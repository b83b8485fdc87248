"""``minima <stage> [--config f.yaml] [--preset P] [--force] [key=value ...]`` and friends.

User errors (MinimaError) print one line plus a hint and exit 2; ``--debug`` shows the traceback.
Only commands whose implementation is installed are listed in ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from typing import Optional

from minima.core.config import STAGE_CONFIGS, STAGES, to_yaml
from minima.core.errors import MinimaError
from minima.core.registry import COMMANDS, STAGE_RUNNERS, stage_config


def _available(target: str) -> bool:
    module = target.split(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return False
    return spec is not None and spec.origin is not None  # a bare namespace dir is not an implementation


def _resolve(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def _stage_parser(prog: str, stage: str, with_force: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(STAGE_CONFIGS[stage].__doc__ or "").strip())
    p.add_argument("--config", help="YAML file with config fields")
    p.add_argument("--preset", help="named preset: tiny, minima-3b, minichat-3b")
    if with_force:
        p.add_argument("--force", action="store_true", help="rebuild even if a matching artifact exists")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. loss.temperature=2")
    return p


def _cmd_config(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print("usage: minima config STAGE [--preset P] [--config FILE] [key=value ...]")
            print(f"stages: {', '.join(STAGES)}")
            return 0
        raise MinimaError(
            "minima config needs a stage name",
            fix=f"e.g. minima config adapt --preset tiny (stages: {', '.join(STAGES)})",
        )
    stage = argv[0]
    if stage not in STAGE_CONFIGS:
        import difflib

        close = difflib.get_close_matches(stage, STAGES, n=1)
        raise MinimaError(
            f"unknown stage '{stage}'", fix=f"did you mean '{close[0]}'?" if close else f"stages: {', '.join(STAGES)}"
        )
    args = _stage_parser(f"minima config {stage}", stage, with_force=False).parse_intermixed_args(argv[1:])
    cfg = stage_config(stage, args.preset, args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _cmd_stage(stage: str, argv: list[str]) -> int:
    if stage == "evaluate" and argv[:1] == ["compare"]:  # `minima evaluate compare A B`
        return int(_resolve("minima.evaluate.report:compare_main")(argv[1:]) or 0)
    if stage == "evaluate" and argv[:1] == ["judge"]:  # `minima evaluate judge answers=DIR ...`
        return int(_resolve("minima.evaluate.chat:judge_main")(argv[1:]) or 0)
    args = _stage_parser(f"minima {stage}", stage).parse_intermixed_args(argv)
    cfg = stage_config(stage, args.preset, args.config, args.overrides)
    artifact = _resolve(STAGE_RUNNERS[stage])(cfg, force=args.force)
    if artifact.metrics.get("dry_run"):
        print(f"{stage}: dry run, nothing written")
    else:
        state = "cached, skipped" if artifact.skipped else "done"
        print(f"{stage}: {state} -> {artifact.path}")
    summary = {k: v for k, v in artifact.metrics.items() if isinstance(v, (int, float, str))}
    if summary:
        print(json.dumps(summary, indent=None, ensure_ascii=False)[:2000])
    return 0


def _help() -> str:
    lines = [
        "usage: minima [--debug] COMMAND [...]",
        "",
        "stages (each: [--config F] [--preset P] [--force] [key=value ...]):",
    ]
    for stage in STAGES:
        if _available(STAGE_RUNNERS[stage]):
            lines.append(f"  {stage:<14}{(STAGE_CONFIGS[stage].__doc__ or '').strip().splitlines()[0]}")
    lines += ["", "other commands:", f"  {'config':<14}print a stage's resolved config as YAML"]
    for name, (target, text) in COMMANDS.items():
        if _available(target):
            lines.append(f"  {name:<14}{text}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "config":
            return _cmd_config(rest)
        if cmd in STAGE_RUNNERS and _available(STAGE_RUNNERS[cmd]):
            return _cmd_stage(cmd, rest)
        if cmd in COMMANDS and _available(COMMANDS[cmd][0]):
            return int(_resolve(COMMANDS[cmd][0])(rest) or 0)
        import difflib

        known = (
            [s for s in STAGES if _available(STAGE_RUNNERS[s])]
            + ["config"]
            + [c for c, (t, _) in COMMANDS.items() if _available(t)]
        )
        close = difflib.get_close_matches(cmd, known, n=1)
        raise MinimaError(
            f"unknown command '{cmd}'", fix=f"did you mean '{close[0]}'?" if close else "see minima --help"
        )
    except MinimaError as e:
        if debug:
            raise
        print(f"error: {e.where + ': ' if e.where else ''}{e.what}", file=sys.stderr)
        print(f"hint: {e.fix or 'rerun with --debug for the traceback'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
