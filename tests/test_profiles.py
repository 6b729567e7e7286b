"""Hardware profiles and the registry: named lookups, curves, validation with file and field."""

import json

import pytest

import profiles
from fluxmoe.errors import ConfigError, UnknownNameError
from profiles import Curve


def test_load_pairs_a_model_with_a_gpu():
    p = profiles.load("mixtral-8x7b", gpu="h200")
    assert p.model.name == "mixtral-8x7b" and p.hardware.name == "h200"
    assert p.hardware.provenance.kind in ("datasheet", "measured")


def test_shipped_datasheet_profiles_exist_for_a40_and_h200():
    for gpu in ("a40", "h200"):
        hw = profiles.load_gpu(gpu, measured=False)
        assert hw.provenance.kind == "datasheet"


@pytest.mark.parametrize("call,match", [
    (lambda: profiles.load("mixtral-9x9b"), "unknown model 'mixtral-9x9b'; known models: deepseek-v2-lite"),
    (lambda: profiles.load("mixtral-8x7b", gpu="b300"), "unknown GPU 'b300'; known GPUs: a40, h200"),
])
def test_unknown_names_list_the_known_ones(call, match):
    with pytest.raises(UnknownNameError, match=match):
        call()


def test_curve_interpolates_in_log_size_and_clamps():
    c = Curve([1e3, 1e6], [1.0, 4.0], log_x=True)
    assert c(1e3) == 1.0 and c(1e9) == 4.0 and c(1) == 1.0
    assert c(10**4.5) == pytest.approx(2.5)
    with pytest.raises(ConfigError, match="x must increase strictly"):
        Curve([2.0, 1.0], [1.0, 1.0])


def test_malformed_profile_names_file_field_and_value(tmp_path):
    data = json.loads((profiles.registry.GPUS_DIR / "h200.json").read_text())
    data["codec"]["decode_gbps"] = -1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json: field 'codec.decode_gbps': must be > 0, got -1"):
        profiles.load_gpu(path)
    data["codec"]["decode_gbps"] = "fast"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json: field 'codec\.decode_gbps': expected a number, got 'fast'"):
        profiles.load_gpu(path)
    data["schema_version"] = 9
    data["codec"]["decode_gbps"] = 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="schema_version"):
        profiles.load_gpu(path)


def test_n_gpus_in_tensor_parallel_add_up_and_pay_an_all_reduce_per_step():
    """"a40x2": two A40s as one, ideal scaling (an upper bound): memory, HBM, FLOPs, both PCIe
    directions and the codec's decode rate double; the step overhead grows by half (the
    all-reduces); the codec ratio and the kernel overhead do not change."""
    one, two = profiles.load_gpu("a40"), profiles.load_gpu("a40x2")
    assert two.name == "a40x2" and profiles.load_gpu("a40x1") == one
    assert two.gpu_memory_bytes == 2 * one.gpu_memory_bytes
    assert (two.hbm_gbps, two.bf16_tflops) == (2 * one.hbm_gbps, 2 * one.bf16_tflops)
    for size in (1e5, 64e6, 1e9):
        assert two.h2d_gbps(size) == pytest.approx(2 * one.h2d_gbps(size))
        assert two.d2h_gbps(size) == pytest.approx(2 * one.d2h_gbps(size))
        assert two.h2d_seconds(size) == pytest.approx(one.h2d_seconds(size) / 2)
    assert two.codec.decode_gbps == 2 * one.codec.decode_gbps
    assert two.codec.compressed_ratio == one.codec.compressed_ratio
    assert two.step_overhead_s == pytest.approx(1.5 * one.step_overhead_s)
    assert two.kernel_overhead_s == one.kernel_overhead_s
    assert "ideal tensor-parallel scaling" in two.provenance.source
    with pytest.raises(ConfigError, match="gpus: must be >= 1, got 0"):
        one.tensor_parallel(0)
