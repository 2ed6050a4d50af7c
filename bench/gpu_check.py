"""`make gpu-check`: everything a lent GPU box (no network, its own torch and triton, ~15 minutes
of device time per task, one command at most 10) should bring back, in one command of under
7 minutes, each stage in its own process under its own time cap, in order of value:

  env        GPU, clocks, driver, versions, tools (env.json)
  build      the extension, JIT-built with ninja, verbose log kept; a failed build
             does not stop the rest: Triton and the torch backend still run
  bench      bench/bench.py on the GPU: models, 1000 small tensors, mixed precision, the size
             sweep (bench-cuda.json/.csv/.md, written after every case; no plots: see below)
  tests      the CUDA test cases only (marker `cuda`; CI runs the CPU ones), with pytest-xdist and
             a per-test timeout where installed
  sanitizer  compute-sanitizer --tool memcheck over bench/sanitize_step.py: both kernels, odd
             sizes, misaligned views, every mode; without compute-sanitizer or a
             GPU the script runs bare, which rehearses it

Everything goes to $OUT when set, else bench/results/ (build/gpu-check/ without a GPU, so that a
rehearsal never overwrites the committed CPU results), AS IT GOES: the report (gpu-check.md,
gpu-check.json) is rewritten before and after every stage, so a run killed at any point keeps
all that finished before it and says which stage was running. A stage that overruns its cap is
killed with its process group and reported `cut`; the next one starts. Every stage's output goes
to one log, gpu-check.log: the device tool brings back at most 8 files (the first run, 2026-11-27,
wrote 13 and lost the report, the test log and the sanitizer's), so a run writes 7: gpu-check.md,
.json, .log, env.json, bench-cuda.json/.csv/.md. Copy bench-cuda.* into bench/results/ and run
bench/report.py: it draws the plots from the JSON and puts the GPU results in the README.

    python bench/gpu_check.py [--out DIR] [--only STAGE ...] [--cap STAGE=SECONDS ...]
                              [--bench-args "..."] [--hang STAGE]

`--hang STAGE` replaces that stage by a sleep longer than its cap: how the tests check that a
hung stage is cut and the rest still runs.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAGES = ("env", "build", "bench", "tests", "sanitizer")
# Seconds per stage, 410 in all: the budget is 7 minutes, of a device call's 9 (a machine start
# costs 1-2 of a task's 15). The JIT build (four sources, CUDA part for the visible GPU) took
# 10 s on the 2-core CI machine with torch 2.11 + nvcc 13.0 (`make compat`), so its cap is
# mostly margin; the bench is ordered by value and writes each case as it finishes, so a cut
# keeps the models and the small-tensor case; the sanitizer prints its progress as it goes.
CAPS = dict(env=15, build=90, bench=165, tests=90, sanitizer=50)
# On the GPU: the headline comparisons first; our torch reference backend left out to fit the cap.
GPU_BENCH_ARGS = ["--sections", "models", "small", "precision", "sweep", "--providers", "triton",
                  "cuda", "fused", "foreach", "for-loop", "--budget", "0.3"]
# Without a GPU (a rehearsal) the bench only shows that it runs and writes.
CPU_BENCH_ARGS = ["--sections", "small", "sweep", "--sizes", "12", "14", "--budget", "0.05"]


def facts(path: Path) -> dict:
    """The environment, as far as it can be read; never raises. Written to `path` after every
    fact, so a slow tool that gets the stage cut loses only what comes after it."""
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               python=platform.python_version(), cpus=os.cpu_count(), host=platform.node())

    def record(key, value):
        out[key] = value
        _write_atomic(path, json.dumps(out, indent=1))

    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unavailable: {exc}"

    for module in ("torch", "triton", "numpy", "pytest", "xdist", "pytest_timeout", "matplotlib",
                   "ninja"):
        try:
            record(module, getattr(__import__(module), "__version__", "installed"))
        except Exception as exc:  # noqa: BLE001 - a fact, not a failure
            record(module, f"unavailable: {type(exc).__name__}: {exc}")
    try:
        import torch
        record("torch_cuda", torch.version.cuda)
        record("gpu", [dict(name=p.name, capability=f"{p.major}.{p.minor}",
                            sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                            l2_mib=getattr(p, "L2_cache_size", 0) / 2**20)
                       for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))])
    except Exception as exc:  # noqa: BLE001
        record("gpu", f"unavailable: {type(exc).__name__}: {exc}")
    record("nvidia_smi", run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                             "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,"
                             "power.limit,temperature.gpu,compute_mode,mig.mode.current",
                             "--format=csv"))
    record("compute_sanitizer", sanitizer_path())
    record("nvcc", run("nvcc", "--version").splitlines()[-1:] or None)
    try:
        from fused_adam import _ext
        record("cuda_home", _ext.cuda_home())
    except Exception as exc:  # noqa: BLE001
        record("cuda_home", f"unavailable: {type(exc).__name__}: {exc}")
    record("nvidia_smi_clocks", run("nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE"))
    return out


def _write_atomic(path: Path, text: str) -> None:
    """A reader (the report, a copy made when the run is killed) sees the old or the new file,
    never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sanitizer_path() -> str | None:
    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and root and Path(root, "bin", "compute-sanitizer").exists():
            found = str(Path(root, "bin", "compute-sanitizer"))
    return found


def has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def commands(out: Path, gpu: bool, bench_args: list[str] | None) -> dict:
    """Each stage's command line."""
    py = sys.executable
    # -v streams each test's outcome as it ends (under xdist -q names failures only in the final
    # summary, lost when the stage is cut); the thread method of pytest-timeout also ends a test
    # hung inside a CUDA call, where a signal would wait for the call to return.
    pytest_args = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-ra", "-m", "cuda"]
    if importlib.util.find_spec("xdist"):
        pytest_args += ["-n", str(min(8, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout"):
        pytest_args += ["--timeout", "60", "--timeout-method", "thread"]
    sanitizer = sanitizer_path()
    script = [py, str(ROOT / "bench" / "sanitize_step.py")]
    return dict(
        env=[py, str(Path(__file__).resolve()), "--facts", str(out / "env.json")],
        build=[py, "-m", "fused_adam._ext"],
        bench=[py, str(ROOT / "bench" / "bench.py"), "--device", "cuda" if gpu else "cpu",
               "--out", str(out), "--no-plots", *(bench_args if bench_args is not None else
                                    GPU_BENCH_ARGS if gpu else CPU_BENCH_ARGS)],
        tests=pytest_args,
        # Only our kernels are instrumented (torch's run at full speed): "adam_kernel" is in the
        # names of the Triton kernel and of the extension's CUDA kernels.
        sanitizer=([sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit",
                    "20", "--kernel-name", "kns=adam_kernel", *script] if sanitizer and gpu
                   else script),
    )


class Report:
    """gpu-check.md / .json, rewritten whenever a stage starts or ends."""

    def __init__(self, out: Path, gpu: bool):
        self.out, self.gpu, self.stages = out, gpu, {}
        self.started = time.time()

    def set(self, stage, **fields):
        self.stages.setdefault(stage, {}).update(fields)
        try:
            self.write()
        except Exception as exc:  # noqa: BLE001 - the report must never stop the check
            print(f"report not written: {type(exc).__name__}: {exc}", flush=True)

    def _fresh(self, name: str) -> Path | None:
        """`name` under out when this run wrote it (not a file left by an earlier run)."""
        path = self.out / name
        return path if path.exists() and path.stat().st_mtime >= self.started else None

    def write(self):
        lines = ["# gpu-check report", "",
                 f"{'GPU' if self.gpu else 'no GPU (a rehearsal)'}; started "
                 f"{datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
                 f"{time.time() - self.started:.0f} s so far.", "",
                 "| stage | status | seconds | cap | last line (gpu-check.log) |", "|---|---|---:|---:|---|"]
        for name, s in self.stages.items():
            last = s.get("last", "").replace("|", "/")[:160]
            lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {s.get('cap', '')} | "
                         f"{last} |")
        env = self._fresh("env.json")
        if env:
            e = json.loads(env.read_text())
            lines += ["", "## Environment", "", f"- GPU: {e.get('gpu')}",
                      f"- torch {e.get('torch')} (CUDA {e.get('torch_cuda')}), triton {e.get('triton')}, "
                      f"Python {e.get('python')}, nvcc {e.get('nvcc')}, CUDA_HOME {e.get('cuda_home')}",
                      "", "```", str(e.get("nvidia_smi")), "```"]
        bench = self._fresh(f"bench-{'cuda' if self.gpu else 'cpu'}.md")
        if bench:
            lines += ["", "## Benchmark", "", bench.read_text()]
        log = self._fresh("gpu-check.log")
        failed = [] if log is None else [
            line for line in log.read_text(errors="replace").splitlines()
            if re.search(r"\b(FAILED|ERROR) tests/", line)]
        if failed:
            lines += ["", "## Test failures", "", *dict.fromkeys(failed[:40])]
        _write_atomic(self.out / "gpu-check.md", "\n".join(lines) + "\n")
        _write_atomic(self.out / "gpu-check.json", json.dumps(
            dict(gpu=self.gpu, started=self.started, stages=self.stages), indent=1))


class Stage:
    """One stage's process, in a process group of its own so that a cut kills its children
    (xdist workers, ninja, the sanitized python) too."""

    def __init__(self, name, cmd, log: Path, env):
        self.log = log.open("a")
        self.log.write(f"\n===== {name}: $ {shlex.join(cmd)}\n")
        self.log.flush()
        self.start = self.log.tell()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=env, start_new_session=True)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def run_stage(name, stage: Stage, cap) -> str:
    """Wait for `stage` up to `cap` seconds; its status."""
    try:
        rc = stage.proc.wait(timeout=cap)
        status = "passed" if rc == 0 else f"failed (exit {rc})"
        if name == "tests" and rc == 5:
            status = "no CUDA test cases here (no GPU)"
    except subprocess.TimeoutExpired:
        status = f"cut at its {cap:g} s cap"
    stage.kill()  # a cut stage, or leftovers of a finished one
    return status


def _last_line(log: Path, start: int) -> str:
    """The last line the stage that began at byte `start` of `log` wrote."""
    with log.open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace").strip().splitlines()
    return text[-1] if text else ""


def _caps(specs: list[str]) -> dict:
    caps = dict(CAPS)
    for spec in specs:
        name, sep, seconds = spec.partition("=")
        if name not in CAPS or not sep:
            raise SystemExit(f"--cap takes STAGE=SECONDS with STAGE one of {', '.join(STAGES)}: {spec!r}")
        caps[name] = float(seconds)
    return caps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--cap", nargs="+", default=[], metavar="STAGE=SECONDS")
    parser.add_argument("--bench-args", default=None, help="replace the bench's arguments")
    parser.add_argument("--hang", choices=STAGES, help="simulate a hung stage")
    parser.add_argument("--facts", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.facts:  # the env stage, in its own process
        data = facts(Path(args.facts))
        print(json.dumps(data, indent=1))
        gpus = ", ".join(g["name"] for g in data["gpu"]) if isinstance(data["gpu"], list) else ""
        print(f"{gpus or 'no GPU'}; torch {data['torch']}, triton {data['triton']}, "
              f"Python {data['python']}")
        return 0
    caps = _caps(args.cap)
    gpu = has_gpu()
    out = Path(args.out or ROOT / ("bench/results" if gpu else "build/gpu-check")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmds = commands(out, gpu, None if args.bench_args is None else shlex.split(args.bench_args))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # gloo, used by the distributed tests, picks an interface by the host name; on a box with no
    # network that name may resolve to nothing: loopback always exists.
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    report = Report(out, gpu)
    log = out / "gpu-check.log"
    log.write_text("")
    current: dict = {}

    def killed(signum, _frame):  # the outer tool's timeout: end the stage, say so, stop
        if current:
            current["stage"].kill()
            report.set(current["name"], status=f"killed by signal {signum}",
                       seconds=round(time.time() - current["t0"]))
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, killed)
    signal.signal(signal.SIGINT, killed)
    failed = False
    for name in args.only:
        cmd = cmds[name]
        if args.hang == name:
            cmd = [sys.executable, "-c", f"import time; time.sleep({caps[name] * 10 + 60})"]
        stage_env = env
        if name == "sanitizer":  # exact allocations: memcheck then sees a read past any tensor
            stage_env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        report.set(name, status="running", cap=caps[name])
        stage = Stage(name, cmd, log, stage_env)
        current.update(name=name, t0=time.time(), stage=stage)
        status = run_stage(name, current["stage"], caps[name])
        seconds = time.time() - current.pop("t0")
        current.clear()
        ok = status.startswith(("passed", "no CUDA"))
        failed |= not ok
        if name == "build" and not ok:
            # The later stages run without the extension (Triton and the torch backend still
            # do) rather than each retrying the build, or waiting on a cut build's lock file.
            env["FUSED_ADAM_NO_EXT"] = "1"
        last = _last_line(log, stage.start)
        report.set(name, status=status, seconds=round(seconds), last=last)
        print(f"{name:10} {status} ({seconds:.0f} s): {last}", flush=True)
    print((out / "gpu-check.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
