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


def test_n_gpus_are_one_ranks_gpu_with_its_share_of_the_host():
    """"a40x2": one rank of two A40s: memory, HBM and FLOPs its own; its PCIe link its own at
    the share every GPU keeps while all copy (1.0 on the datasheet pair); half the pinned host."""
    one, two = profiles.load_gpu("a40"), profiles.load_gpu("a40x2")
    assert two.name == "a40x2" and profiles.load_gpu("a40x1") == one
    assert (two.gpu_memory_bytes, two.hbm_gbps, two.bf16_tflops) == (one.gpu_memory_bytes, one.hbm_gbps,
                                                                     one.bf16_tflops)
    assert two.host_pinned_bytes == one.host_pinned_bytes // 2
    assert two.h2d_gbps(64e6) == one.h2d_gbps(64e6)
    h200, pair = profiles.load_gpu("h200"), profiles.load_gpu("h200x2")
    assert pair.h2d_gbps(64e6) == pytest.approx(h200.h2d_gbps(64e6) * 54.44592041566878 / 55.4709674639383)
    with pytest.raises(UnknownNameError, match="no interconnect profile for 'a40x3'; known: a40x2, h200x2"):
        profiles.load_gpu("a40x3")