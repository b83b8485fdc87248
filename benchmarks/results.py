"""Shared helper for benchmark scripts: each owns one section of benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "# Benchmark results\n\nEach section is written by the script named in it (`python benchmarks/<name>.py`); "
    "ratios are measured side by side in one run.\n"
)


def machine() -> str:
    import torch

    dev = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    return f"{dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section ``name`` in RESULTS.md, keeping the others."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = RESULTS.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)
