"""The max-rate search: the bisection on a closed-form case, SLO parsing, and a simulated case
where the found rate meets the SLO and a slightly higher one does not."""

import pytest

import planner
from fluxmoe.errors import ConfigError
from profiles import Profile
from simulator.capacity import QUEUE_FACTOR, at_rate, max_rate, parse_slo, steady_requests, system_max_rate
from simulator.compare import simulate_systems
from simulator.workload import Workload
from tests.conftest import tiny_gpu, tiny_model


@pytest.mark.parametrize("limit", [0.05, 3.7, 420.0])
def test_bisection_finds_the_largest_rate_within_tolerance(limit):
    found = max_rate(lambda rate: "ok" if rate <= limit else None, rel_tol=0.02)
    assert limit / 1.02 <= found.rate <= limit and found.result == "ok"


def test_no_rate_and_every_rate():
    assert max_rate(lambda rate: None).rate == 0.0
    assert max_rate(lambda rate: "ok", high=50.0).rate == 50.0


def test_slo_parsing_names_the_bad_part():
    assert parse_slo("ttft_p99=2s,tpot_p99=200ms").limits == {"ttft_p99": 2.0, "tpot_p99": 0.2}
    for bad, message in [("ttft_p98=2s", "unknown limit"), ("ttft_p99=fast", "expected a time"),
                         ("tpot_p50=0ms", "expected a time"), ("", "no limits")]:
        with pytest.raises(ConfigError, match=message):
            parse_slo(bad)


def test_requests_outnumber_what_a_system_holds():
    base = Workload.synthetic(5, 64, 16, seed=3)
    steady = steady_requests(base, concurrency=8)
    assert len(steady) == QUEUE_FACTOR * 8
    assert [r.prompt_tokens for r in steady.requests[:10]] == [r.prompt_tokens for r in base.requests] * 2
    timed = at_rate(steady, 2.0)
    assert all(a.arrival_s < b.arrival_s for a, b in zip(timed.requests, timed.requests[1:]))


def test_the_rate_found_meets_the_slo_and_a_higher_one_does_not():
    profile = Profile(tiny_model(2, 4), tiny_gpu(1.0))
    workload = Workload.synthetic(40, 64, 16, seed=1)
    plan = planner.optimize(profile, 700 * 1024, reserve_bytes=16 << 10, max_num_seqs=8,
                            workload=workload.shape())
    slo = parse_slo("ttft_p99=1ms")  # the toy GPU's steps take tens of microseconds

    def run(wl):
        return simulate_systems(profile, plan, wl, ["fluxmoe"], keep_timeline=False)["fluxmoe"]

    found = system_max_rate(run, workload, slo, plan.max_num_seqs, high=1e6, rel_tol=0.02)
    assert 0 < found.rate < 1e6 and slo.met_by(found.result)
    steady = steady_requests(workload, plan.max_num_seqs)
    assert not slo.met_by(run(at_rate(steady, found.rate * 1.2)))  # overload shows as queueing
