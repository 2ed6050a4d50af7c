"""`make gpu-check` cannot waste a GPU loan: a hung stage is cut at its cap and the stages after it
still run; the benchmark and the report are on disk whatever happens; the extension's build log
keeps the compiler's error; the Triton kernel keeps what it must not specialize."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu_check
import fused_adam
from fused_adam import _ext

QUICK_BENCH = "--sections small --providers fused --budget 0.01"


def test_a_hung_stage_is_cut_and_the_rest_still_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(gpu_check.ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path),
         "--only", "env", "bench", "tests", "sanitizer", "--hang", "tests", "--cap", "tests=3",
         "--bench-args", QUICK_BENCH], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr  # a cut stage is a failed check
    stages = json.loads((tmp_path / "gpu-check.json").read_text())["stages"]
    assert stages["tests"]["status"] == "cut at its 3 s cap"
    assert stages["tests"]["seconds"] < 30
    assert stages["env"]["status"] == stages["bench"]["status"] == "passed"
    assert stages["sanitizer"]["status"] == "passed"  # after the cut stage
    # the device tool brings back 8 files at most: every stage's output is in one log
    assert len(list(tmp_path.iterdir())) <= 8, sorted(p.name for p in tmp_path.iterdir())
    rows = json.loads((tmp_path / "bench-cpu.json").read_text())["rows"]
    assert {r["provider"] for r in rows} >= {"torch fused"}
    report = (tmp_path / "gpu-check.md").read_text()
    assert "| tests | cut at its 3 s cap |" in report and "## Benchmark" in report
    assert json.loads((tmp_path / "env.json").read_text())["torch"] == torch.__version__


def test_the_report_is_written_before_a_stage_ends(tmp_path):
    report = gpu_check.Report(tmp_path, gpu=False)
    report.set("build", status="running", cap=150)
    assert "| build | running |" in (tmp_path / "gpu-check.md").read_text()


def test_the_tests_stage_selects_cuda_cases_only():
    cmd = gpu_check.commands(gpu_check.ROOT, gpu=True, bench_args=None)["tests"]
    assert cmd[cmd.index("-m", cmd.index("pytest")) + 1] == "cuda"
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
                                str(gpu_check.ROOT / "tests" / "test_capturable.py"),
                                str(gpu_check.ROOT / "tests" / "test_optimizer.py")],
                               capture_output=True, text=True, cwd=gpu_check.ROOT).stdout
    assert "test_cuda_graph_capture_and_replay" in collected
    assert "cpu-" not in collected  # no CPU case of the comparison matrix


def test_a_failed_build_keeps_the_compiler_error(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("int main() { return undeclared_name; }\n")
    monkeypatch.setattr(_ext, "CSRC", tmp_path)
    monkeypatch.setattr(_ext, "CPU_SOURCES", ["broken.cpp"])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.raises(Exception) as info:
        _ext._jit_build(torch, verbose=False, cuda=False)
    reason = _ext.failure_reason(info.value)
    assert "undeclared_name" in reason and "error" in reason, reason


def test_cuda_home_is_found_through_an_nvcc_wrapper(tmp_path, monkeypatch):
    """An `nvcc` on PATH that execs the toolkit's (this CI machine's /usr/local/bin/nvcc): torch
    guesses the wrapper's grandparent; the toolkit is where nvcc says it lives."""
    toolkit, wrapper = tmp_path / "cuda-13.0", tmp_path / "wrapper"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    for folder, body in ((toolkit / "bin", f"echo '#$ _HERE_={toolkit}/bin' >&2"),
                         (wrapper / "bin", f'exec {toolkit}/bin/nvcc "$@"')):
        folder.mkdir(parents=True)
        (folder / "nvcc").write_text(f"#!/bin/sh\n{body}\n")
        (folder / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(wrapper / "bin"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert _ext.cuda_home() == str(toolkit)


def test_a_failed_build_runs_the_later_stages_without_the_extension(tmp_path):
    subprocess.run([sys.executable, str(gpu_check.ROOT / "bench" / "gpu_check.py"), "--out",
                    str(tmp_path), "--only", "build", "sanitizer", "--hang", "build", "--cap",
                    "build=2"], capture_output=True, text=True, timeout=300)
    assert "kernels []" in (tmp_path / "gpu-check.log").read_text()


def test_a_killed_check_kills_its_stage_and_says_so(tmp_path):
    proc = subprocess.Popen([sys.executable, str(gpu_check.ROOT / "bench" / "gpu_check.py"),
                             "--out", str(tmp_path), "--only", "bench", "--hang", "bench"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, report = time.time() + 60, tmp_path / "gpu-check.md"
    while not (report.exists() and "running" in report.read_text()):
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1)  # the stage's sleeper has started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    stages = json.loads((tmp_path / "gpu-check.json").read_text())["stages"]
    assert stages["bench"]["status"] == f"killed by signal {int(signal.SIGTERM)}"
    sleepers = subprocess.run(["pgrep", "-f", "time.sleep(1710"], capture_output=True, text=True)
    assert sleepers.stdout == "", "the stage outlived the check"


def test_a_bad_cap_is_refused():
    with pytest.raises(SystemExit, match="STAGE=SECONDS"):
        gpu_check._caps(["tests"])
    with pytest.raises(SystemExit, match="STAGE=SECONDS"):
        gpu_check._caps(["test=3"])


def test_the_triton_kernel_does_not_specialize_per_step_arguments():
    """The segment count changes with the layout and the grads a step has: specialized (== 1),
    it would compile new variants mid-run. Lengths, rows and offsets are in the table."""
    triton_kernel = pytest.importorskip("fused_adam.backends.triton_kernel")
    unspecialized = {p.name for p in triton_kernel._adam_kernel.params if p.do_not_specialize}
    assert {"n_segments"} <= unspecialized


def test_sanitizer_script_runs_every_kernel_here():
    out = subprocess.run([sys.executable, str(gpu_check.ROOT / "bench" / "sanitize_step.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and " 0 failures" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_cases_on_cuda_tensors_get_the_marker():
    import conftest

    class Item:
        def __init__(self, **params):
            self.callspec, self.marks = type("Spec", (), {"params": params}), []

        def add_marker(self, mark):
            self.marks.append(mark.name)

    items = [Item(device="cuda", backend="triton"), Item(device="cpu", backend="cpu"),
             Item(pair=("cpu", "cuda")), Item(device=torch.device("cuda", 1))]
    conftest.pytest_collection_modifyitems(items)
    assert [i.marks for i in items] == [["cuda"], [], ["cuda"], ["cuda"]]


def test_the_torch_backend_keeps_no_workspace_off_the_cpu():
    """Caching allocators reuse blocks already; a workspace would hold the largest step's
    temporaries for the life of the process (~5 GB of GPU memory after a 1B-parameter step)."""
    from fused_adam.backends import torch_ref
    like = torch.empty(1 << 20, device="meta")
    held = dict(getattr(torch_ref._workspace, "buffers", {}))
    assert torch_ref._scratch(like, 0, torch.float32).device.type == "meta"
    assert getattr(torch_ref._workspace, "buffers", {}) == held


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_steps_params_on_a_device_other_than_the_current_one():
    from fused_adam.functional import adam_step_
    if "triton" not in fused_adam.available_backends("cuda"):
        pytest.skip("triton is not available")
    ts = [torch.full((4099,), v, device="cuda:1") for v in (1.0, 0.5, 0.0, 0.0)]
    ref = [t.cpu() for t in ts]
    with torch.cuda.device(0):
        adam_step_(*ts, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, backend="triton")
    adam_step_(*ref, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, backend="torch")
    for a, b in zip(ts, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)


def test_the_report_draws_the_plots_of_a_cut_bench(tmp_path):
    """gpu-check brings back tables only; bench/report.py draws the plots of the sections that ran."""
    pytest.importorskip("matplotlib")
    from bench import report
    results = json.loads((gpu_check.ROOT / "bench" / "results" / "bench-cpu.json").read_text())
    results["rows"] = [r for r in results["rows"] if r["section"] == "models"]  # cut after models
    (tmp_path / "bench-cpu.json").write_text(json.dumps(results))
    # bench/distributed.py's table sits beside it, in another format: no plot of its own
    (tmp_path / "bench-distributed-cpu.json").write_text(json.dumps({"rows": [{"engine": "FSDP2"}]}))
    report.draw(tmp_path)
    assert (tmp_path / "bench-cpu-models.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "bench-cpu-sweep.png").exists()


def test_triton_under_the_interpreter_claims_no_cuda_tensors(monkeypatch):
    triton_kernel = pytest.importorskip("fused_adam.backends.triton_kernel")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "CPU tensors only" in triton_kernel.unavailable_reason(torch.device("cuda"), torch.float32)
    assert triton_kernel.unavailable_reason(torch.device("cpu"), torch.float32) is None
