"""The fluxmoe command: tables for users, one-line errors without tracebacks."""

import subprocess
import sys

import pytest

from fluxmoe.cli import main


def test_plan_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "mixtral-8x7b", "--gpu", "h200", "--budget", "46GiB", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("MoE layers", "resident", "compressed", "host", "KV cache", "vLLM + CPU offload", "FluxMoE"):
        assert needle in text
    from planner import Plan

    assert Plan.load(out).budget_bytes == 46 * 2**30


def test_profiles_lists_models_and_gpus(capsys):
    assert main(["profiles"]) == 0
    text = capsys.readouterr().out
    assert "mixtral-8x7b" in text and "qwen3-next-80b-a3b" in text and "h200" in text and "a40" in text


@pytest.mark.parametrize("args,message", [
    (["plan", "--model", "nope", "--budget", "40GiB"], "unknown model 'nope'"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "2GiB"], "smallest budget that works is"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "lots"], "budget: cannot read 'lots'"),
    (["plan", "--model", "mixtral-8x7b", "--gpu", "tpu", "--budget", "40GiB"], "unknown GPU 'tpu'"),
])
def test_user_errors_are_one_line_without_traceback(args, message):
    run = subprocess.run([sys.executable, "-m", "fluxmoe.cli", *args], capture_output=True, text=True)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
