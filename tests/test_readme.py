"""The README's ecosystem examples are complete scripts: each runs here as written, the
distributed ones under torchrun with two processes (gloo on CPU)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SECTION = README[README.index("## Use with DDP"):README.index("## Backends")]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION, re.S)
NEEDS = {"transformers": ("transformers", "accelerate")}


def test_the_section_has_the_four_examples():
    assert len(BLOCKS) == 4


@pytest.mark.parametrize("code", BLOCKS, ids=["ddp", "fsdp2", "hf_trainer", "compile"])
def test_readme_example_runs(code, tmp_path):
    for marker, modules in NEEDS.items():
        if f"import torch, {marker}" in code:
            for module in modules:
                pytest.importorskip(module)
    script = tmp_path / "example.py"
    script.write_text(code.replace("/tmp/fused_adam_", str(tmp_path / "out_")))
    if code.startswith("# torchrun"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
