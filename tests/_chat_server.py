"""One tiny chat model and one ``minima serve`` subprocess, shared by the serve, self-instruct and judge tests.

The server starts once per test process (about 10 s) and stops at exit. It runs with an API key, so
every test that talks to it also exercises the bearer-key path; clients read the key from
``$MINIMA_TEST_KEY``.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# MiniChat layout: <s> [system</s>] then "[|User|] q</s>[|Assistant|] a</s>" per exchange.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'user' %}[|User|] {{ m['content'] }}{{ eos_token }}"
    "{% else %}[|Assistant|] {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[|Assistant|]{% endif %}"
)
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
API_KEY = "sk-minima-test-key"
KEY_ENV = "MINIMA_TEST_KEY"
_STATE: dict = {}


def chat_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, context 2048) with a MiniChat chat template."""
    if "model" not in _STATE:
        from transformers import AutoTokenizer

        from minima.testing import save_tiny_model

        out = save_tiny_model(
            tmp_path_factory.getbasetemp() / "chat_model" / "tiny-chat", tokenizer_dir, seed=0, **SHAPE
        )
        tok = AutoTokenizer.from_pretrained(str(out))
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(out))
        _STATE["model"] = out
    return _STATE["model"]


def server(model_dir: Path):
    """The shared ``minima serve`` subprocess (``.base_url`` ends in /v1); key required."""
    if "server" not in _STATE:
        from minima.infer.serve import launch

        os.environ[KEY_ENV] = API_KEY
        env = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_API_KEY=API_KEY)
        srv = launch(model_dir, "threads=1", env=env, timeout=240)
        atexit.register(srv.close)
        _STATE["server"] = srv
    return _STATE["server"]


class StubJudge:
    """An OpenAI-shaped ``/v1/chat/completions`` on loopback whose reply is ``reply(last user message)``;
    ``calls`` counts the requests."""

    def __init__(self, reply: Callable[[str], str]):
        self.calls = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:  # requests arrive on several server threads at once
                    outer.calls += 1
                text = reply(body["messages"][-1]["content"])
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
