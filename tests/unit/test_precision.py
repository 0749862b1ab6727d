"""The compute-precision choice: bf16 autocast only where the hardware has it natively."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.config import ConfigError, load_config
from cluster.model_prep import _key, warm_start_key
from learner.precision import choose_precision, cpu_has_native_bf16, read_cpu_flags

# The flags of the two CPUs this project has met (trimmed): one with native bf16, one without.
SAPPHIRE = frozenset("fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile".split())
SKYLAKE = frozenset("fpu sse2 avx2 avx512f avx512bw avx512vl".split())


@pytest.mark.parametrize(
    ("capability", "flags", "native"),
    [
        ("AVX512", SKYLAKE, False),
        ("AVX2", frozenset(), False),
        ("AVX512", SAPPHIRE, True),  # torch reports AVX512 on CPUs that also have avx512_bf16
        ("AVX512_BF16", frozenset(), True),
        ("AMX", frozenset(), True),
        ("DEFAULT", frozenset({"fp", "asimd", "bf16"}), True),  # Arm (Graviton3) features
        (None, frozenset(), False),
    ],
)
def test_native_bf16_from_capability_or_flags(capability, flags, native):
    assert cpu_has_native_bf16(capability, flags) is native


def test_auto_follows_the_cpu():
    assert choose_precision("auto", device="cpu", capability="AVX512", flags=SAPPHIRE).bf16
    slow = choose_precision("auto", device="cpu", capability="AVX512", flags=SKYLAKE)
    assert not slow.bf16 and slow.name == "fp32" and "no native bf16" in slow.reason


def test_explicit_settings_are_obeyed_and_emulation_is_flagged():
    forced = choose_precision(True, device="cpu", capability="AVX512", flags=SKYLAKE)
    assert forced.bf16 and "emulated" in forced.reason
    assert "emulated" not in choose_precision(True, device="cpu", capability="AVX512", flags=SAPPHIRE).reason
    assert not choose_precision(False, device="cpu", capability="AMX", flags=SAPPHIRE).bf16


def test_gpu_uses_its_own_bf16_support_not_the_cpu_flags():
    assert choose_precision("auto", device="cuda", flags=SKYLAKE, cuda_bf16=True).bf16
    assert not choose_precision("auto", device="cuda", flags=SAPPHIRE, cuda_bf16=False).bf16


@given(st.sets(st.sampled_from(sorted(SAPPHIRE | SKYLAKE | {"bf16", "asimd"}))))
def test_auto_picks_bf16_exactly_when_a_native_flag_is_present(flags):
    chosen = choose_precision("auto", device="cpu", capability="AVX512", flags=flags)
    assert chosen.bf16 == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def test_bad_setting_is_refused():
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        choose_precision("fast", device="cpu")


def test_read_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert read_cpu_flags(info) == {"fpu", "avx512f", "avx512_bf16"}
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_learner_setting_accepts_auto_true_false():
    assert load_config(None).learner.autocast_bf16 == "auto"
    assert load_config(None, ["learner.autocast_bf16=true"]).learner.autocast_bf16 is True
    assert load_config(None, ["learner.autocast_bf16=false"]).learner.autocast_bf16 is False
    with pytest.raises(ConfigError, match="autocast_bf16"):
        load_config(None, ["learner.autocast_bf16=sometimes"])


def test_warm_start_cache_key_separates_precisions_and_keeps_bf16_builds():
    cfg = load_config(None)
    bf16, fp32 = warm_start_key(cfg, True), warm_start_key(cfg, False)
    assert _key(bf16) != _key(fp32)
    # Caches built before the choice existed were bf16 builds: their key has no precision field.
    assert "precision" not in bf16 and fp32["precision"] == "fp32"


def test_warm_start_setting_is_not_keyed_only_the_precision_it_resolves_to():
    auto, forced = load_config(None), load_config(None, ["model.warm_start.autocast_bf16=false"])
    assert forced.model.warm_start.autocast_bf16 is False
    # The same precision builds the same weights, whichever setting chose it (existing caches stay valid).
    assert _key(warm_start_key(auto, False)) == _key(warm_start_key(forced, False))
    assert _key(warm_start_key(auto, True)) == _key(warm_start_key(forced, True))
    with pytest.raises(ConfigError, match="autocast_bf16"):
        load_config(None, ["model.warm_start.autocast_bf16=maybe"])


def test_packing_auto_packs_only_where_attention_is_variable_length():
    from learner.trainer import attention_implementation, packing_for

    assert load_config(None).learner.packing == "auto"
    # CPU (sdpa's dense block-diagonal mask): padded; a GPU with flash-attention: packed.
    assert packing_for("auto", attention_implementation("auto", gpu=False)) is False
    assert packing_for("auto", "flash_attention_2") is True
    # An explicit choice wins either way (the e2e tests run packed on CPU through smoke.yaml).
    assert packing_for(True, "sdpa") is True and packing_for(False, "flash_attention_2") is False
    assert load_config("deploy/configs/smoke.yaml").learner.packing is True
    with pytest.raises(ConfigError, match="packing"):
        load_config(None, ["learner.packing=sometimes"])
