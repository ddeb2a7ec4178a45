"""scripts/gpu_check.sh cannot run without a GPU; its pieces that can are checked here: the script
parses (bash -n), it runs through as a CPU rehearsal (every step, the CPU provider for CUDA, the tiny
preset for internvl2-2b), and the table it prints merges bench reports, HF anchor rows and memory logs."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_table  # noqa: E402


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_runs_through_as_a_cpu_rehearsal(tmp_path):
    """Every step exits 0 and the table has its five rows with numbers: the script still calls the CLI,
    the benchmarks and the Python API as they are now, so the first GPU lent is not spent mending it."""
    env = {**os.environ, "REHEARSAL": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "BUDGET_S": "900",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}  # python3: this venv's
    script = ["bash", str(ROOT / "scripts" / "gpu_check.sh")]
    # as on the device machine: step 3 started ahead (PREPARE=1) in the background, the rest waits for it
    ahead = subprocess.Popen(script, cwd=ROOT, env={**env, "PREPARE": "1", "OUT": str(tmp_path / "ahead-out")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        ahead.kill() if ahead.poll() is None else None
    ahead.wait()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "full size made ahead (PREPARE=1, decoder fused-cuda)" in (tmp_path / "out" / "steps.txt").read_text()
    steps = [line for line in (tmp_path / "out" / "steps.txt").read_text().splitlines() if line.startswith("step ")]
    assert len(steps) == 23 and all(": rc=0 in " in line for line in steps), steps
    assert "wrote " in (tmp_path / "out" / "train-cuda.log").read_text()  # 3 steps trained, on the CPU here
    peak, bound = map(int, (tmp_path / "out" / "train-step-memory.log").read_text().splitlines()[-1].split())
    assert bound < peak, (peak, bound)  # the guard's bound stays under a real step's peak
    assert "Device: CPU rehearsal" in proc.stdout
    compared = (tmp_path / "out" / "cuda-vs-cpu.log").read_text().count("same tokens True")
    assert compared == 8, (tmp_path / "out" / "cuda-vs-cpu.log").read_text()  # 4 packages, an image and a growth each
    steps_log = (tmp_path / "out" / "cuda-steps.log").read_text()  # the prefill and 300 steps, past a growth
    assert "greedy tokens agree at 301 of 301 positions" in steps_log, steps_log
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "target" not in line]
    assert len(rows) == 5 and not any("missing" in row for row in rows), rows
    assert all(row.split(" | ")[2] == "13" for row in rows), rows  # the 4:3 photo: 12 tiles and the thumbnail


def test_table_merges_reports_rows_and_memory(tmp_path):
    bench = {"rows": [{"target": "pkg", "backend": "onnxruntime [package fp32] (CUDA, decoder on CPU)", "views": 7, "prompt_tokens": 1980, "vision_ms_per_view": 12.2, "prefill_ms": 125.0,
                       "time_to_first_token_ms": 289.0, "decode_tokens_per_s": 67.3},
                      {"target": "pkg [onnxruntime-fp16]", "views": 7, "prompt_tokens": 1980, "decode_tokens_per_s": 615.0}]}
    (tmp_path / "bench.json").write_text("progress noise\n" + json.dumps(bench))
    (tmp_path / "mem.log").write_text("1000\n20480\n15000\n")  # MiB
    (tmp_path / "anchor.json").write_text(json.dumps({"target": "HF eager", "views": 7, "decode_tokens_per_s": 40.8,
                                                      "gpu_memory_gb": 8.9}))
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "failed.log").write_text('{"progress": 1}\nTraceback (most recent call last):\nSleighError: no engine onnxruntime-fp16\n')
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_table.py"), "--device", "NVIDIA H200",
                          "--floor-tokens-per-s", "1230", f"FP32 package={tmp_path / 'bench.json'}@{tmp_path / 'mem.log'}",
                          str(tmp_path / "anchor.json"), str(tmp_path / "empty.json"), f"FP16={tmp_path / 'failed.log'}"],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "Device: NVIDIA H200"
    body = [l for l in lines if l.startswith("| ") and "target" not in l]
    assert len(body) == 5
    # the label says what was asked for, "ran as" what ran (a degraded engine is not auto's pick)
    assert body[0].startswith("| FP32 package | onnxruntime [package fp32] (CUDA, decoder on CPU) | 7 | 1980 |")
    assert body[1].startswith("| FP32 package | - |")
    assert "| 67.3 | 21.47 | 5.5 |" in body[0]  # 20,480 MiB = 21.47 GB; 67.3 / 1,230 = 5.5 %
    assert "| 615.0 | 21.47 | 50.0 |" in body[1]
    assert "| 40.8 | 8.9 | 3.3 |" in body[2] and "| - |" in body[2]
    assert "missing or empty" in body[3]
    # a step that failed after printing something: its last line, not a crash of the whole table
    assert body[4].startswith("| FP16: failed (SleighError: no engine onnxruntime-fp16) |")


def test_peak_of_an_empty_log_is_unknown():
    assert gpu_table.peak_gb("") is None and gpu_table.peak_gb("[N/A]\n") is None


def test_the_gqa_probe_runs_every_case_on_the_cpu(tiny_pkg):
    """benchmarks/gqa_cuda_probe.py (gpu_check.sh records what CUDA's GroupQueryAttention refuses): on
    the CPU provider its four cases all run, so a refusal it reports on CUDA is CUDA's; a model it is
    given opens."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gqa_cuda_probe.py"), "--model",
                           str(tiny_pkg / "decoder.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and all(": ran on CPUExecutionProvider, max |out| " in line for line in lines[:4]), lines
    assert lines[4] == f"{tiny_pkg / 'decoder.onnx'} on CPUExecutionProvider: opens"
    # with and without the bias: other outputs (the bias reaches the attention)
    assert lines[0].split("|out| ")[1] != lines[1].split("|out| ")[1]


def _split(data: bytes, parts_dir, pieces: int) -> None:
    parts_dir.mkdir()
    size = -(-len(data) // pieces)
    for i in range(pieces):
        (parts_dir / f"p{i:02d}").write_bytes(data[i * size:(i + 1) * size])


def _install_parts(parts_dir, site):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "install_ort_parts.py"), str(parts_dir), str(site)],
                          capture_output=True, text=True)


def _fake_wheel_files(tmp_path) -> dict[str, bytes]:
    """A package's files as a wheel holds them, with a module big enough to be split in three."""
    return {"fake_ort_probe/__init__.py": b"PROVIDERS = ['CUDAExecutionProvider']\n# " + os.urandom(3000).hex().encode() + b"\n",
            "fake_ort_probe/capi/lib.so": os.urandom(5000),
            "fake_ort_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fake-ort-probe\nVersion: 1.0\n"}


@pytest.mark.parametrize("form", ["tar.xz", "wheel"])  # scripts/ort_gpu_parts.sh's, ../shared/gpu/prepare-ort-gpu.sh's
def test_the_carried_parts_of_either_form_install_into_the_site_folder(form, tmp_path):
    """gpu_check.sh's step 1 on the CPU: the parts joined, told apart by their first bytes, unpacked
    whole; an import from the site folder then finds the package."""
    import io
    import tarfile
    import zipfile

    files, buf = _fake_wheel_files(tmp_path), io.BytesIO()
    if form == "wheel":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w:xz") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    _split(buf.getvalue(), tmp_path / "parts", 3)
    site = tmp_path / "site"
    (site / "fake_ort_probe").mkdir(parents=True)
    (site / "fake_ort_probe" / "stale.py").write_text("")  # an earlier install's file is not kept beside the new ones
    proc = _install_parts(tmp_path / "parts", site)
    assert proc.returncode == 0, proc.stderr
    assert "3 parts unpacked" in proc.stdout
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()) == sorted(files)
    assert all((site / name).read_bytes() == data for name, data in files.items())
    probe = subprocess.run([sys.executable, "-c", "import fake_ort_probe as p; print(p.PROVIDERS)"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert probe.stdout.strip() == "['CUDAExecutionProvider']", probe.stderr


@pytest.mark.parametrize("damage", ["none carried", "a part missing", "not an archive"])
def test_parts_that_do_not_make_an_archive_are_one_line_and_leave_the_site_folder_alone(damage, tmp_path):
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in _fake_wheel_files(tmp_path).items():
            z.writestr(name, data)
    parts = tmp_path / "parts"
    if damage == "none carried":
        parts.mkdir()
    elif damage == "a part missing":
        _split(buf.getvalue(), parts, 3)
        (parts / "p01").unlink()
    else:
        _split(b"<html>not found</html>" * 100, parts, 2)
    site = tmp_path / "site"
    site.mkdir()
    (site / "kept.txt").write_text("kept")
    proc = _install_parts(parts, site)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: onnxruntime-gpu parts | ") and "Expected: " in proc.stderr
    assert [p.name for p in site.iterdir()] == ["kept.txt"]
