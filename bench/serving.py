"""What the benchmarks that start a real vLLM OpenAI server share (GPU machine, vLLM 0.26.0):
a model folder with a tokenizer (nothing can be downloaded there), the environment that draws
dummy weights from +-0.1 in the server's processes, and a server started and waited for."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_tokenizer(model: str, folder: str) -> str:
    """A copy of the model folder with a word-level tokenizer over its vocabulary ("t<id>", the
    first three special): text of n such words is n tokens, both ways."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(model, "config.json"), folder)
    vocab_size = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    # Special tokens get names no word starts with: transformers matches them inside words, and
    # "t1" as BOS split every "t1..." in two (a 6,000-word prompt became 10,168 tokens).
    special = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab={**special, **{f"t{i}": i for i in range(len(special), vocab_size)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
               "eos_token": "</s>", "model_max_length": 65536}, open(os.path.join(folder, "tokenizer_config.json"), "w"))
    return folder


def dummy_weights_env(scale: float = 0.1, fast: bool = False) -> dict[str, str]:
    """The environment for a server whose dummy weights are drawn from +-scale in every process
    (bench/dummy_scale), with this checkout importable there; `fast`: host-held (offloaded) params are filled on the GPU and copied."""
    path = [os.path.join(ROOT, "bench", "dummy_scale"), ROOT, os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), FLUXMOE_DUMMY_SCALE=str(scale),
                FLUXMOE_FAST_DUMMY="1" if fast else "0")


def start_server(argv: list[str], env: dict[str, str], log_path: str, port: int,
                 timeout_s: float = 600.0) -> tuple[subprocess.Popen, float]:
    """Start a server in its own session (so that its engine processes can be stopped with it)
    and wait until GET /health answers; returns the process and its start-up seconds."""
    started = time.perf_counter()
    log = open(log_path, "w")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    while time.perf_counter() - started < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: see {log_path}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server, time.perf_counter() - started
        except OSError:
            time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"the server did not come up in {timeout_s:g} s: see {log_path}")


def stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(server.pid, 9)
        except ProcessLookupError:
            pass
