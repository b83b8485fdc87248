"""Line and branch coverage per package of ``minima`` (pytest-cov), written to RESULTS.md. Not a gate.

Runs pytest in one process with ``--cov=minima --cov-branch`` over the given test files (default: the
fast unit-test files below; the whole suite takes tens of minutes on 2 cores) and sums the covered
lines and branches of every file under each package. Python subprocesses the tests start (torchrun
ranks, ``minima serve``, ``python -m minima.cli``) are measured too (coverage's ``patch = subprocess``),
and their data is combined with the test process's.

    python benchmarks/coverage.py                  # the default subset
    python benchmarks/coverage.py tests/           # the whole suite
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, write_section

ROOT = Path(__file__).resolve().parents[1]

# Fast tests that exercise most packages in process.
DEFAULT_TESTS = [
    "tests/test_config.py",
    "tests/test_artifacts.py",
    "tests/test_io.py",
    "tests/test_formats.py",
    "tests/test_packing.py",
    "tests/test_records_reader.py",
    "tests/test_kd.py",
    "tests/test_lora.py",
    "tests/test_models_counts.py",
    "tests/test_models_loader.py",
    "tests/test_engine.py",
    "tests/test_plan.py",
    "tests/test_sandbox.py",
    "tests/test_mutation_kills.py",
    "tests/test_judge.py",
    "tests/test_cli.py",
]
#: Subprocesses (torchrun ranks, servers, CLI runs) write their own data files, combined at the end.
RCFILE = """[run]
branch = True
source = minima
parallel = True
patch = subprocess
sigterm = True
relative_files = False

[paths]
source =
    {root}/minima
"""
PACKAGES = ["core", "data", "models", "infer", "train", "compress", "evaluate", "stages"]


def package_of(path: str) -> str:
    parts = Path(path).parts
    i = parts.index("minima")
    return parts[i + 1] if len(parts) > i + 2 else "minima/*.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tests", nargs="*", help="test files or dirs (default: a fast subset)")
    ap.add_argument("--no-write", action="store_true", help="print, don't update RESULTS.md")
    args = ap.parse_args()
    tests = args.tests or DEFAULT_TESTS
    out = Path(tempfile.mkdtemp(prefix="minima-cov-")) / "coverage.json"
    rc = out.with_name("coveragerc")
    rc.write_text(RCFILE.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", COVERAGE_FILE=str(out.with_name(".coverage")))
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--cov=minima", "--cov-branch"]
    cmd += [f"--cov-config={rc}", f"--cov-report=json:{out}", *tests]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    minutes = (time.time() - t0) / 60
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if failed:  # coverage is still reported, but name what did not pass
        print("\n".join(failed), file=sys.stderr)
    if not out.exists():
        raise SystemExit(
            f"no coverage report (pytest exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
        )
    files = json.loads(out.read_text())["files"]
    agg: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for path, f in files.items():
        s = f["summary"]
        for key in ("num_statements", "covered_lines", "num_branches", "covered_branches"):
            agg[package_of(path)][key] += s[key]
            agg["all"][key] += s[key]
    rows = ["| package | lines | line coverage | branches | branch coverage |", "|---|---|---|---|---|"]
    low = []
    for pkg in [*PACKAGES, "minima/*.py", "all"]:
        a = agg.get(pkg)
        if not a:
            continue
        line = a["covered_lines"] / a["num_statements"] if a["num_statements"] else 1.0
        branch = a["covered_branches"] / a["num_branches"] if a["num_branches"] else 1.0
        name = f"minima/{pkg}" if pkg in PACKAGES else pkg
        rows.append(f"| {name} | {a['num_statements']} | {line:.0%} | {a['num_branches']} | {branch:.0%} |")
        if pkg != "all" and branch < 0.8:
            low.append(name)
    which = (
        "the whole suite" if tests in (["tests"], ["tests/"]) else f"a subset: {', '.join(Path(t).name for t in tests)}"
    )
    md = "\n".join(
        [
            "## coverage (`python benchmarks/coverage.py`)",
            "",
            f"pytest-cov, line and branch coverage of `minima` per package; {machine()}. Tests run: {which} "
            f"({summary}; {minutes:.1f} min). Python subprocesses the tests start (torchrun ranks, `minima serve`, "
            "CLI runs) are measured and combined. Not a gate.",
            "",
            *rows,
            "",
            f"Under 80% branch coverage in this run: {', '.join(low) if low else 'none'}.",
        ]
    )
    print(md)
    if not args.no_write:
        write_section("coverage", md)


if __name__ == "__main__":
    main()
