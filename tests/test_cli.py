"""The fluxmoe command: tables for users, one-line errors without tracebacks, nothing half-written."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

from fluxmoe.cli import main

TRACE = "simulator/traces/azure_llm_2023_code_head.csv"
SMALL = "fixed:n=16,prompt=256,output=16"


def test_plan_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "mixtral-8x7b", "--gpu", "h200", "--budget", "46GiB", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("MoE layers", "resident", "compressed", "host", "KV cache", "vLLM + CPU offload", "FluxMoE",
                   "closed-form prediction", "simulated on"):
        assert needle in text
    from planner import Plan

    assert Plan.load(out).budget_bytes == 46 * 2**30


def test_no_host_compressed_plans_with_the_papers_three_tiers(tmp_path, capsys):
    four, three = tmp_path / "four.json", tmp_path / "three.json"
    common = ["plan", "--model", "mixtral-8x7b", "--gpu", "h200", "--budget", "46GiB", "--workload", SMALL]
    assert main([*common, "--out", str(four)]) == 0
    assert main([*common, "--no-host-compressed", "--out", str(three)]) == 0
    from planner import Plan

    assert any(lp.host_compressed for lp in Plan.load(four).layers)
    plan = Plan.load(three)
    assert not any(lp.host_compressed for lp in plan.layers) and not plan.inputs.host_compressed
    assert any(lp.host for lp in plan.layers)


def test_plan_and_simulate_pick_the_same_plan(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--model", "mixtral-8x7b", "--budget", "46GiB", "--workload", SMALL]
    assert main(["plan", *common, "--out", str(a)]) == 0
    assert main(["simulate", *common, "--save-plan", str(b)]) == 0
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "solve_time_s"}  # noqa: E731
    assert strip(a) == strip(b)


def test_json_output_is_machine_readable(capsys):
    assert main(["simulate", "--model", "mixtral-8x7b", "--budget", "46GiB", "--workload", SMALL, "--baselines",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ours = data["results"]["fluxmoe"]["output_tokens_per_s"]
    assert ours > 0 and data["results"]["vllm"] is None and data["results"]["vllm_offload"]["output_tokens_per_s"] > 0
    assert data["plan"]["simulated"]["output_tokens_per_s"] == pytest.approx(ours)


def test_profiles_lists_models_with_sizes_and_gpus_with_provenance(capsys):
    assert main(["profiles"]) == 0
    text = capsys.readouterr().out
    assert "mixtral-8x7b" in text and "46.7B" in text and "86.99 GiB" in text
    assert "measured (NVIDIA H200" in text and "datasheet" in text and "<gpu>xN" in text


def test_timeline_plot_shows_every_system(tmp_path):
    plot = tmp_path / "t.png"
    assert main(["simulate", "--model", "mixtral-8x7b", "--budget", "46GiB", "--workload", SMALL, "--baselines",
                 "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 10_000


def _binary(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 8)
    return str(path)


def _plan_file(tmp_path, **changes):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "mixtral-8x7b", "--budget", "46GiB", "--no-verify", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    data.update(changes)
    out.write_text(json.dumps(data))
    return str(out)


SIM = ["simulate", "--model", "mixtral-8x7b"]
MODELS = Path(__file__).resolve().parent.parent / "models"
BAD = [
    (["plan", "--model", "nope", "--budget", "40GiB"], "unknown model 'nope'"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "2GiB"], "smallest budget that works is"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "10.07GiB"], "smallest budget that works is 10.08 GiB"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "139.8GiB", "--tpot-ms", "1"], "at any budget"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "46GiB", "--host-budget", "1GiB"], "holds only 3 experts"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "lots"], "budget: cannot read 'lots'"),
    (["plan", "--model", "mixtral-8x7b", "--gpu", "tpu", "--budget", "40GiB"], "unknown GPU 'tpu'"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "200GiB"], "exceeds the 139.80 GiB"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "46GiB", "--tpot-ms", "0"], "must be a finite number > 0"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "46GiB", "--top-k", "-1"], "must be a finite number > 0"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "46GiB", "--workload", "fixed:n=4", "--prompt-tokens", "9"],
     "not both"),
    ([*SIM, "--budget", "46GiB", "--workload", "trace:"], "trace needs a path"),
    ([*SIM, "--budget", "46GiB", "--workload", "trace:{tmp}"], "is a folder"),
    ([*SIM, "--budget", "46GiB", "--workload", "trace:{bin}"], "binary file"),
    ([*SIM, "--budget", "46GiB", "--workload", f"trace:{TRACE},scale=0"], "scale must be > 0"),
    ([*SIM, "--budget", "46GiB", "--workload", f"trace:{TRACE},limit=abc"], "limit must be a number"),
    ([*SIM, "--budget", "46GiB", "--workload", f"trace:{TRACE},limit=0"], "limit must be >= 1"),
    ([*SIM, "--budget", "46GiB", "--workload", "poisson:n=10,rate=-1"], "rate must be > 0"),
    ([*SIM, "--budget", "46GiB", "--workload", "fixed:n=10,seed=x"], "seed must be a number"),
    ([*SIM, "--budget", "46GiB", "--workload", "fixed:n=10,colour=red"], "unknown option(s) colour"),
    ([*SIM, "--plan", "{tmp}"], "is a folder"),
    ([*SIM, "--plan", "{bin}"], "binary file"),
    ([*SIM, "--budget", "46GiB", "--plot", "{tmp}/missing/t.png"], "does not exist"),
    ([*SIM, "--budget", "46GiB", "--plot", "{tmp}/out.txt"], "expected a .png file"),
    ([*SIM, "--budget", "46GiB", "--timeline", "{tmp}/nope/t.csv"], "does not exist"),
    (["plan", "--model", "mixtral-8x7b", "--budget", "46GiB", "--out", "{tmp}"], "is a folder"),
    ([*SIM, "--budget", "46GiB", "--plan", "{plan}"], "exactly one of --budget"),
    ([*SIM, "--budget", "46GiB", "--sweep", "budget=40GiB:60GiB:10GiB"], "exactly one of --budget"),
    ([*SIM, "--sweep", "budget=40GiB:400GiB:40GiB"], "STOP 400.00 GiB exceeds"),
    ([*SIM, "--gpu", "a40", "--plan", "{plan}"], "made for GPU profile 'h200'"),
    ([*SIM, "--plan", "{plan_kv}"], "kv_cache_bytes"),
    ([*SIM, "--plan", "{plan_slots}"], "staging_slots"),
    ([*SIM, "--plan", "{plan_seqs}"], "max_num_seqs"),
    ([*SIM, "--budget", "46GiB", "--slo", "ttft_p99=2s"], "--slo goes with --find-max-rate"),
    ([*SIM, "--budget", "46GiB", "--find-max-rate"], "--find-max-rate needs --slo"),
    ([*SIM, "--budget", "46GiB", "--find-max-rate", "--slo", "ttft_p99=soon"], "expected a time > 0"),
    (["serve", "--model", "{tmp}", "--gpu-budget", "46GiB", "--dry-run"], "has no config.json"),
    (["serve", "--model", f"{MODELS}/mixtral-tiny", "--plan", "{plan}", "--dry-run"], "other shapes"),
    (["serve", "--model", f"{MODELS}/mixtral-8x7b", "--gpu-budget", "2GiB", "--no-verify", "--dry-run"],
     "smallest budget that works is"),
    (["serve", "--model", f"{MODELS}/mixtral-8x7b", "--gpu", "a40", "--plan", "{plan}", "--dry-run"],
     "made for GPU profile 'h200'"),
    (["serve", "--model", f"{MODELS}/mixtral-8x7b", "--plan", "{plan}", "--gpu-memory-utilization", "0.5"],
     "set by FluxMoE from the plan's budget"),
    (["serve", "--model", f"{MODELS}/mixtral-8x7b", "--dry-run"], "give --gpu-budget"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[1:])[:60] for a, _ in BAD])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    files = dict(tmp=str(tmp_path), bin=_binary(tmp_path))
    plans = {"{plan}": {}, "{plan_kv}": dict(kv_cache_bytes=10**14), "{plan_slots}": dict(staging_slots=3),
             "{plan_seqs}": dict(max_num_seqs=0)}
    for key, change in plans.items():
        if key in args:
            sub = tmp_path / key.strip("{}")
            sub.mkdir()
            args = [_plan_file(sub, **change) if a == key else a for a in args]
    args = [a.format(**files) for a in args]
    before = set(p.name for p in tmp_path.rglob("*"))
    run = subprocess.run([sys.executable, "-m", "fluxmoe.cli", *args], capture_output=True, text=True)
    assert run.returncode == 2, run.stdout[-500:] + run.stderr[-500:]
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert set(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_a_sweep_keeps_every_budget_even_when_one_has_no_plan(capsys):
    assert main([*SIM, "--sweep", "budget=2GiB:50GiB:48GiB", "--workload", SMALL, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["output_tokens_per_s"]
    assert [r["note"] for r in rows] == ["no plan fits", ""] and rows[1]["fluxmoe"] > 0


def test_help_shows_defaults_and_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = capsys.readouterr().out
    assert "fixed:n=256,prompt=512,output=128)" in " ".join(text.split()) and "Replay a workload" in text


def test_a_model_given_as_a_config_path_is_named_after_the_model(tmp_path):
    import profiles

    config = json.loads(open("profiles/models/mixtral-8x7b.json").read())
    config.pop("_name_or_path", None)
    folder = tmp_path / "snapshots" / "0123abcd"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    assert profiles.load_model(folder).name == "mixtral-46.7b"


def test_serve_starts_vllm_with_the_plans_budget_on_localhost(tmp_path, capsys):
    plan = _plan_file(tmp_path)
    saved = tmp_path / "served.json"
    assert main(["serve", "--model", str(MODELS / "mixtral-8x7b"), "--plan", plan, "--save-plan", str(saved),
                 "--dry-run", "--port", "9000", "--load-format", "dummy"]) == 0
    out = capsys.readouterr().out
    command = out.splitlines()[-1]
    assert command.startswith("starting: ") and " serve " in command
    assert "--gpu-memory-utilization 0.329 " in command  # 46 GiB of the H200 profile's 139.8 GiB
    assert "--host 127.0.0.1" in command and command.endswith("--port 9000 --load-format dummy")
    assert "--worker-extension-cls fluxmoe.vllm_plugin.worker.FluxMoEWorkerExtension" in command
    assert "GET /v1/fluxmoe/stats (same --api-key as the API)" in out
    assert saved.exists() and json.loads(saved.read_text()) == json.loads(Path(plan).read_text())


def test_simulate_end_to_end_one_request_matches_hand_step_times():
    """The README's simulate command with --baselines on one request: each system's TPOT is the
    cost model's decode step for one sequence (mid-way context), worked out here."""
    import profiles
    from fluxmoe.serde import from_dict
    from planner.cost_model import CostModel, StepShape
    from planner.plan import Plan

    run = subprocess.run([sys.executable, "-m", "fluxmoe.cli", "simulate", "--model", "mixtral-8x7b", "--gpu", "h200",
                          "--budget", "46GiB", "--baselines", "--workload", "fixed:n=1,prompt=512,output=65", "--json",
                          "--no-verify"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-500:]
    result = json.loads(run.stdout)
    plan = from_dict(Plan, result["plan"])
    cost = CostModel(profiles.load("mixtral-8x7b", gpu="h200"))
    step = StepShape(tokens=1, sequences=1, context_tokens=512 + 32)  # the median decode step's context
    ours = cost.step_time(plan.tier_counts(), step, plan.prefetch_depth).total_s
    assert result["results"]["fluxmoe"]["tpot_p50_s"] == pytest.approx(ours, rel=0.005)
    offload = result["results"]["vllm_offload"]
    hand = cost.offload_step_time(step, offload["setting"]["offload_bytes"]).total_s
    assert offload["tpot_p50_s"] == pytest.approx(hand, rel=1e-5)  # the median's context within a token
    assert result["results"]["vllm"] is None  # 93 GB of weights do not fit 46 GiB
