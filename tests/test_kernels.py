"""The AMX guard (edgezo.kernels, the engine's use of it) and `edgezo doctor`. Issue: llama.cpp built natively on an
Intel Xeon with AMX crashed (SIGSEGV in ggml_backend_amx_mul_mat) in its first decode."""

import json
import logging
import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from edgezo import kernels
from edgezo.cli import main
from edgezo.formats import QUANT_FTYPES
from edgezo.kernels import AmxMode, plan_kernels
from edgezo.memory import read_model_shape, repack_bytes

AMD_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
            "OPENMP = 1 | REPACK = 1 | ")
XEON_NATIVE_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
                    "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
                    "OPENMP = 1 | REPACK = 1 | ")
XEON_NO_AMX_INFO = XEON_NATIVE_INFO.replace("AMX_INT8 = 1 | ", "")
SPR_FLAGS = frozenset("avx2 avx512f avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16".split())
EPYC_FLAGS = frozenset("avx2 fma f16c".split())


def test_system_info_is_parsed_into_features():
    features = kernels.build_features(XEON_NATIVE_INFO)
    assert features["AMX_INT8"] == "1" and features["AVX512"] == "1" and features["REPACK"] == "1"
    assert "AMX_INT8" not in kernels.build_features(AMD_INFO)


@pytest.mark.parametrize("info, flags, mode, avoid", [
    (XEON_NATIVE_INFO, SPR_FLAGS, AmxMode.AUTO, True),      # the crash: kernels built in, AMX present
    (XEON_NATIVE_INFO, None, AmxMode.AUTO, True),           # CPU flags unreadable: assume the worst
    (XEON_NATIVE_INFO, EPYC_FLAGS, AmxMode.AUTO, False),    # built in, but llama.cpp's AMX init fails without AMX
    (XEON_NO_AMX_INFO, SPR_FLAGS, AmxMode.AUTO, False),     # edgezo's own install (-mno-amx-*) on an AMX CPU
    (AMD_INFO, EPYC_FLAGS, AmxMode.AUTO, False),            # this project's AMD machines
    (XEON_NATIVE_INFO, SPR_FLAGS, AmxMode.ALLOW, False),    # explicitly allowed: llama.cpp's own choice
    (AMD_INFO, EPYC_FLAGS, AmxMode.AVOID, True),            # forced: the guarded path anywhere (tests, doubt)
])
def test_guard_decision(info, flags, mode, avoid):
    plan = plan_kernels(info, flags, mode)
    assert plan.avoid_amx is avoid
    assert plan.amx_built is ("AMX_INT8 = 1" in info)
    assert plan.amx_cpu is (None if flags is None else "amx_int8" in flags)


def test_amx_mode_comes_from_the_environment_and_rejects_typos(monkeypatch):
    monkeypatch.delenv(kernels.AMX_ENV, raising=False)
    assert kernels.amx_mode() is AmxMode.AUTO
    monkeypatch.setenv(kernels.AMX_ENV, "Avoid")
    assert kernels.amx_mode() is AmxMode.AVOID
    with pytest.raises(ValueError, match="EDGEZO_AMX='off': choose auto, avoid, allow"):
        kernels.amx_mode("off")


def test_cpu_flags_and_model_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx2 amx_tile amx_int8\n")
    assert kernels.cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_tile", "amx_int8"}
    assert kernels.cpu_model_name(cpuinfo) == "Intel(R) Xeon(R) Platinum 8481C"
    assert kernels.cpu_flags(tmp_path / "missing") is None


AVX2 = kernels.build_features(AMD_INFO)
AVX512 = kernels.build_features(XEON_NO_AMX_INFO)
# llama_print_system_info of the two ARM builds tools/arm64-check makes (GGML_CPU_ARM_ARCH as named), and of a
# generic armv8-a build (what -mcpu=native gives under qemu-user, which shows the host's /proc/cpuinfo)
A76_INFO = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
V86_INFO = ("CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | MATMUL_INT8 = 1 | SVE = 1 | DOTPROD = 1 | SVE_CNT = 16 | "
            "OPENMP = 1 | REPACK = 1 | ")  # under qemu -cpu max with 128-bit SVE (llamafile's sgemm is off with SVE)
ARMV8_INFO = "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
A76, V86, ARMV8 = map(kernels.build_features, (A76_INFO, V86_INFO, ARMV8_INFO))
SVE256 = {**V86, "SVE_CNT": "32"}  # a 256-bit SVE core (Graviton3, A64FX)


@pytest.mark.parametrize("name, ggml_type, dims, features, repacked", [
    ("blk.0.attn_q.weight", Q.Q4_0, (576, 576), AVX2, True),
    ("blk.0.attn_k.weight", Q.Q4_0, (576, 192), AVX2, True),
    ("blk.0.attn_k.weight", Q.Q4_0, (576, 196), AVX2, False),     # output rows not a multiple of 8
    ("output.weight", Q.Q4_K, (576, 49152), AVX2, True),
    ("token_embd.weight", Q.Q4_0, (576, 49152), AVX2, False),     # read by get_rows, never repacked
    ("blk.0.attn_norm.weight", Q.F32, (576,), AVX2, False),
    ("blk.0.ffn_down.weight", Q.Q8_0, (1536, 576), AVX2, False),  # Q8_0 repacks on ARM only
    ("blk.0.ffn_down.weight", Q.Q6_K, (1536, 576), AVX512, False),
    ("blk.0.ffn_up.weight", Q.Q2_K, (576, 1536), AVX2, False),    # Q2_K needs AVX-512
    ("blk.0.ffn_up.weight", Q.Q2_K, (576, 1536), AVX512, True),
    ("blk.0.ffn_up.weight", Q.Q4_0, (576, 1536), {}, False),      # neither x86's nor ARM's features: no repack
    ("blk.0.ffn_down.weight", Q.Q8_0, (1536, 576), A76, True),    # ARM repacks Q8_0 (dotprod)
    ("blk.0.attn_k.weight", Q.Q4_0, (576, 196), A76, True),       # ARM's Q4_0 layouts need rows % 4 only
    ("blk.0.attn_k.weight", Q.Q4_0, (576, 198), A76, False),
    ("token_embd.weight", Q.Q8_0, (576, 49152), V86, False),
    ("blk.0.ffn_up.weight", Q.Q2_K, (576, 1536), V86, False),     # Q2_K repacks with AVX-512 only
])
def test_repack_rule(name, ggml_type, dims, features, repacked):
    assert kernels.repacked_by_llama_cpp(name, ggml_type, dims, features) is repacked


@pytest.mark.parametrize("ggml_type, rows, features, layout", [
    (Q.Q4_0, 576, AVX2, "8x8"),
    (Q.Q4_0, 576, A76, "4x4"),       # dotprod
    (Q.Q4_0, 576, V86, "4x8"),       # i8mm; SVE 8x8 needs 256-bit vectors, phone cores have 128
    (Q.Q4_0, 576, SVE256, "8x8"),
    (Q.Q4_0, 196, SVE256, "4x8"),    # 8x8 needs rows % 8: the next rule in llama.cpp's order
    (Q.Q4_0, 576, ARMV8, None),      # NEON alone: no repack (a generic build, e.g. -mcpu=native under qemu)
    (Q.Q8_0, 576, A76, "4x4"),
    (Q.Q8_0, 576, V86, "4x8"),
    (Q.Q8_0, 576, AVX512, None),     # x86 never repacks Q8_0
    (Q.Q4_K, 576, A76, "8x4"),
    (Q.Q4_K, 576, V86, "8x8"),
    (Q.Q6_K, 576, A76, "8x4"),
    (Q.Q6_K, 576, AVX2, None),
    (Q.Q5_K, 576, V86, "8x8"),
    (Q.IQ4_NL, 576, V86, "4x4"),     # IQ4_NL has no i8mm layout
    (Q.MXFP4, 196, A76, "4x4"),
    (Q.Q4_1, 576, V86, None),        # not a repack type anywhere
    (Q.F16, 576, V86, None),
])
def test_repack_layout_follows_llama_cpps_order(ggml_type, rows, features, layout):
    assert kernels.repack_layout(ggml_type, rows, features) == layout


def test_repack_plan_per_quant_and_none_without_repack():
    types = {"q4_0": Q.Q4_0, "q8_0": Q.Q8_0, "f16": Q.F16}
    assert kernels.repack_plan(V86, types) == {"q4_0": "4x8", "q8_0": "4x8", "f16": None}
    assert kernels.repack_plan({**V86, "REPACK": "0"}, types) == dict.fromkeys(types)


def test_arm_features_from_hwcap_and_what_a_build_needs():
    # HWCAP of a Cortex-A76 (fp asimd ... fphp asimdhp asimdrdm ... asimddp), no HWCAP2 bits
    a76 = kernels.arm_features((1 << 0) | (1 << 1) | (1 << 9) | (1 << 10) | (1 << 12) | (1 << 20), 0)
    assert a76 == {"fp", "asimd", "fphp", "asimdhp", "asimdrdm", "asimddp"}
    assert kernels.arm_features(1 << 22, 1 << 13) == {"sve", "i8mm"}
    assert kernels.arm_features_missing(A76, a76) == []
    assert kernels.arm_features_missing(V86, a76) == ["MATMUL_INT8", "SVE"]  # the v8.6 build on an A76: SIGILL
    assert kernels.arm_features_missing(A76, frozenset({"fp", "asimd"})) == ["FP16_VA", "DOTPROD"]  # on a Cortex-A72


def test_arm_cpuinfo_features_and_part(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm asimdhp asimddp\n"
                       "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\n")
    assert kernels.cpu_flags(cpuinfo) == {"fp", "asimd", "evtstrm", "asimdhp", "asimddp"}
    assert kernels.cpu_model_name(cpuinfo) == "Cortex-A76"
    cpuinfo.write_text("Features\t: fp asimd\nCPU implementer\t: 0x51\nCPU part\t: 0x802\n")
    assert kernels.cpu_model_name(cpuinfo) == "ARM implementer 0x51 part 0x802"


def test_doctor_names_arm_features_and_what_the_cpu_lacks():
    from edgezo.cli.info import format_arm

    arm = {"build": {"NEON": "1", "DOTPROD": "1", "MATMUL_INT8": "1", "SVE": "1", "SVE_CNT": "16"},
           "cpu": ["asimd", "asimddp"], "missing_on_cpu": ["MATMUL_INT8", "SVE"]}
    line = format_arm(arm)
    assert "NEON yes, dotprod yes, i8mm no, SVE no" in line and "SVE_CNT=16" in line
    assert "MISSING on this CPU: MATMUL_INT8, SVE" in line
    assert "MISSING" not in format_arm({**arm, "cpu": ["asimd", "asimddp", "i8mm", "sve"], "missing_on_cpu": []})
    assert "not an ARM CPU" in format_arm({"build": {}, "cpu": None, "missing_on_cpu": None})


def test_override_patterns_match_exactly_the_chosen_tensors():
    every = [f"blk.{b}.{kind}.weight" for b in range(12) for kind in ("attn_q", "attn_k", "ffn_up", "attn_norm")]
    every += ["output.weight", "token_embd.weight", "output_norm.weight"]
    chosen = [name for i, name in enumerate(every) if i % 3 == 0 and name != "token_embd.weight"] + ["output.weight"]
    patterns = kernels.override_patterns(chosen)
    assert len(patterns) <= 13  # one per block (+ output), not one per tensor
    matched = {name for name in every if any(re.search(p, name) for p in patterns)}
    assert matched == set(chosen)


def test_guarded_engine_loads_without_extra_buffers_and_scores_identically(tiny_gguf, monkeypatch, caplog):
    from edgezo.engine import Engine, EngineConfig

    sequences, positions = [[1, 5, 9, 4], [1, 7, 3]], [[3], [2]]
    config = EngineConfig(n_seq_max=2, n_ctx_per_seq=32, n_threads=2)
    monkeypatch.setenv(kernels.AMX_ENV, "allow")
    with Engine(tiny_gguf, config) as engine:
        assert not engine.kernel_plan.avoid_amx
        reference = engine.logits(sequences, positions)
    monkeypatch.setenv(kernels.AMX_ENV, "avoid")
    with caplog.at_level(logging.WARNING, logger="edgezo"):
        with Engine(tiny_gguf, config) as engine:
            assert engine.kernel_plan.avoid_amx
            guarded = engine.logits(sequences, positions)
        with Engine(tiny_gguf, config):
            pass
    assert np.array_equal(guarded, reference)
    assert [r.getMessage() for r in caplog.records].count("note: EDGEZO_AMX=avoid: AMX buffer type bypassed") <= 1
    monkeypatch.setenv(kernels.AMX_ENV, "sometimes")
    with pytest.raises(Exception, match="EDGEZO_AMX='sometimes'"):
        Engine(tiny_gguf, config)


def test_installed_llama_cpp_is_safe_on_this_cpu():
    """edgezo's install builds without AMX kernels; where they are in anyway, the engine must plan to avoid them."""
    from edgezo.engine import system_info

    plan = plan_kernels(system_info(), kernels.cpu_flags(), AmxMode.AUTO)
    assert not plan.amx_built or plan.avoid_amx or plan.amx_cpu is False


def test_doctor_reports_build_cpu_and_a_decode_probe(tiny_gguf, capsys):
    assert main(["doctor", "--model", str(tiny_gguf), "--quant", "none", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    assert report["versions"]["llama-cpp-python"] == "0.3.36"
    assert "CPU :" in report["llama_cpp_system_info"]
    assert set(report["kernels"]) >= {"amx_kernels_built", "cpu_has_amx", "avoid_amx", "repack_built", "flash_attention",
                                      "repack", "arm"}
    assert set(report["kernels"]["repack"]) >= {"q4_0", "q8_0", "f16", "q4_k"}
    assert report["cache"]["free_bytes"] > 0
    probe = report["probe"]
    assert probe["ok"] and probe["finite"] and probe["n_sequences"] == 4
    assert sum(probe["weight_buffers_mib"].values()) > 0
    assert report["threads"]["n_threads"] == 1 and report["threads"]["chosen_by"] == "--threads"
    assert main(["doctor", "--no-probe"]) == 0
    text = capsys.readouterr().out
    assert "llama.cpp build: CPU :" in text and "AMX: kernels built" in text and "decode probe" not in text
    assert "cores busy" in text and "measured again before every decode" in text  # the load and the engine's choice


@pytest.mark.real_model
@pytest.mark.parametrize("quant", list(QUANT_FTYPES))
def test_every_quant_type_decodes_on_the_real_model_with_and_without_the_guard(quant):
    """Each in a child process, so a crash fails the test instead of killing pytest. On a CPU without AMX the
    guarded load must pick the very kernels llama.cpp picks (same CPU_REPACK bytes, bit-identical logits): that
    checks edgezo.kernels' copy of llama.cpp's repack rules on every quant type."""
    from edgezo import store
    from edgezo.doctor import probe_in_child
    from edgezo.engine import system_info

    path = store.resolve_model("smollm2-135m", quant)
    default = probe_in_child(path, n_threads=2, env={kernels.AMX_ENV: "auto"})
    guarded = probe_in_child(path, n_threads=2, env={kernels.AMX_ENV: "avoid"})
    assert default["ok"], default
    assert guarded["ok"], guarded
    assert default["finite"] and guarded["finite"]
    if not default["avoid_amx"]:  # llama.cpp chose freely: the guard must reproduce its choice exactly
        assert guarded["weight_buffers_mib"] == default["weight_buffers_mib"]
        assert guarded["logits_sha256"] == default["logits_sha256"]
    # the accountant's repack term is the buffer llama.cpp allocated (probe rounds to 0.01 MiB)
    predicted = repack_bytes(read_model_shape(path), system_info()) / 2**20
    assert predicted == pytest.approx(default["weight_buffers_mib"].get("CPU_REPACK", 0), abs=0.006)


def test_install_recipe_builds_without_amx_and_never_reuses_a_cached_wheel():
    import platform
    import subprocess
    from pathlib import Path

    recipe = subprocess.run(["make", "-n", "install-llama-cpp"], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, check=True).stdout
    assert "--no-cache-dir llama-cpp-python==0.3.36" in recipe
    assert 'b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()' in recipe  # a build with AMX kernels is replaced
    no_amx = 'CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"'
    assert (no_amx in recipe) is (platform.machine() in ("x86_64", "amd64"))
    for machine, x86 in (("aarch64", False), ("arm64", False), ("x86_64", True)):  # -mno-amx-* exist on x86 only
        recipe = subprocess.run(["make", "-n", f"UNAME_M={machine}", "install-llama-cpp"], cwd=Path(__file__).parents[1],
                                capture_output=True, text=True, check=True).stdout
        assert ("-mno-amx" in recipe) is x86, machine
