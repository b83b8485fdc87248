"""Shared fixtures. Offline by construction: nothing here reaches a hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before transformers / datasets / prefect are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="minima-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MINIMA_NO_PROGRESS", "1")

import logging

import pytest

# Prefect's ephemeral server logs its shutdown at interpreter exit, after pytest closed the captured
# streams; don't print a 'Logging error' traceback for that.
logging.raiseExceptions = False

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MINIMA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(rel: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real data not available: {p} (../shared/data is absent in a user's fresh clone)")
    return p


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """The built-in demo corpus + its two SentencePiece models, written once per session."""
    from minima.data import demo as demo_data

    d = tmp_path_factory.mktemp("demo_data")
    demo_data.write(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, demo_data_dir) -> Path:
    """An HF tokenizer dir (LLaMA-style, byte_fallback) trained on the demo corpus."""
    from minima.testing import demo_tokenizer_dir

    return demo_tokenizer_dir(tmp_path_factory.mktemp("tok") / "tokenizer", demo_data_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random LlamaForCausalLM (hidden 128, 4 layers) saved with the tiny tokenizer."""
    from minima.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", tiny_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def prefect_ready():
    """Start Prefect's ephemeral server once per session (the first flow run costs 6-11 s)."""
    from prefect import flow

    @flow(name="minima-warmup")
    def _warm() -> int:
        return 1

    assert _warm() == 1
    return True


@pytest.fixture(scope="module")
def one_thread_inprocess():
    """Training runs in this process on one thread (far faster on a shared 2-core box); restored afterwards."""
    import torch

    env = {"MINIMA_INPROCESS": "1", "MINIMA_NUM_THREADS": "1"}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    torch.set_num_threads(n)
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_server():
    """Stop the shared ``minima serve`` subprocess when the session ends (before the session's reports, so
    a coverage run counts the server's lines), not at interpreter exit."""
    yield
    import sys

    helper = sys.modules.get("_chat_server")
    srv = helper._STATE.pop("server", None) if helper is not None else None
    if srv is not None:
        srv.close()
