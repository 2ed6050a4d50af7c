"""`make gpu-check`: on a GPU box (no network, its own torch and triton) run the whole test suite,
CUDA cases included, then the benchmark on the GPU, and write one short report.

Output goes to $OUT when set, else bench/results/: gpu-check.md (the report), pytest.log and the
benchmark's bench-cuda.json / .csv / .md with its plots (the full sweep to 2^28, a 1B Llama,
GPT-2, ViT-B/16, 1000 small tensors, mixed precision; when matplotlib is there). Copy them into
bench/results/ and run bench/report.py: the README then shows them. Budget: under 6 minutes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.time()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-ra"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    (out / "pytest.log").write_text(tests.stdout + tests.stderr)
    summary = (tests.stdout.strip().splitlines() or ["(no pytest output)"])[-1]
    test_s = time.time() - t0

    import torch

    from bench import bench
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = bench.main(["--device", device, "--out", str(out)])
    table = (out / f"bench-{device}.md").read_text()
    import fused_adam
    from fused_adam import backends
    reasons = {n: backends.unavailable_reason(n, torch.device(device)) for n in backends.NAMES[1:]}
    report = ["# gpu-check report", "",
              f"- tests ({test_s:.0f} s): `{summary}` (exit {tests.returncode}; log in pytest.log)",
              f"- CUDA cases ran: {'yes' if device == 'cuda' else 'no: no GPU here'}",
              f"- backends on {device}: {fused_adam.available_backends(device)}; unavailable: "
              + (", ".join(f"{n} ({r})" for n, r in reasons.items() if r) or "none"),
              "", "## Benchmark", "", table]
    failed = [line for line in tests.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if failed:
        report += ["", "## Failures", "", *failed[:40]]
    (out / "gpu-check.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))
    return tests.returncode or (0 if rows else 1)


if __name__ == "__main__":
    sys.exit(main())
