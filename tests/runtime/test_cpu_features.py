"""CPU features from /proc/cpuinfo, and the one-line warning when an engine was gated on a CPU with
features this one lacks. The cpuinfo excerpts follow the Linux kernel's format (x86: `flags`, one
line per processor; ARM64: `Features`)."""

from __future__ import annotations

import platform
from dataclasses import replace

import pytest

from sleigh.runtime.cpu_features import KERNEL_FEATURES, cpu_features, missing_features, warn_if_missing
from sleigh.runtime.manifest import EngineEntry

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext bmi1 avx2 smep bmi2 erms invpcid rdseed adx clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves
bogomips\t: 4899.99

processor\t: 1
flags\t\t: fpu avx2 avx512f
"""
SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng\n"


@pytest.mark.parametrize("text, expected", [
    (EPYC_AVX2, ["avx2"]),  # the first processor speaks for all: processor 1's avx512f is not read
    (SAPPHIRE_RAPIDS, ["amx_int8", "avx2", "avx512_vnni", "avx512bw", "avx512f", "avx_vnni"]),
    (GRAVITON3, ["asimddp", "i8mm", "sve"]),  # svei8mm is not i8mm: whole words only
    ("processor\t: 0\nmodel name\t: something\n", None),  # no flags line: unknown, not "none"
])
def test_features_from_cpuinfo(tmp_path, text, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert cpu_features(path) == expected


def test_no_cpuinfo_means_unknown(tmp_path):
    assert cpu_features(tmp_path / "missing") is None


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
                    reason="reads this machine's /proc/cpuinfo")
def test_this_x86_machine_has_avx2():
    features = cpu_features()
    assert features is not None and "avx2" in features and set(features) <= set(KERNEL_FEATURES)


def test_missing_features():
    assert missing_features(["avx2", "avx512_vnni"], ["avx2"]) == ["avx512_vnni"]
    assert missing_features(["avx2"], ["avx2", "avx512_vnni"]) == []
    assert missing_features(["avx2"], None) == []  # this CPU unknown: nothing to say
    assert missing_features(None, ["avx2"]) == [] and missing_features([], ["avx2"]) == []


def test_warning_is_one_line_and_only_when_a_feature_is_missing(caplog):
    entry = EngineEntry("onnxruntime-int8", "onnxruntime", "int8", {}, cpu_features=("avx2", "avx512_vnni"))
    assert warn_if_missing(entry, current=["avx2"]) == ["avx512_vnni"]
    lines = [r.getMessage() for r in caplog.records if r.name == "sleigh"]
    assert len(lines) == 1 and lines[0].startswith("engine onnxruntime-int8") and "avx512_vnni" in lines[0]
    assert "\n" not in lines[0]
    caplog.clear()
    for quiet in (replace(entry, cpu_features=("avx2",)), replace(entry, cpu_features=None)):
        assert warn_if_missing(quiet, current=["avx2"]) == [] and caplog.records == []
