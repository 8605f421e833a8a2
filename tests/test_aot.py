"""mor_jax.tools.aot compiles the smoke model's train step for a small TPU topology (needs libtpu, no TPU).

libtpu is kept out of the main virtual environment, so the tool runs with the interpreter of .venv-tpu (see
docs/tpu.md) when that exists, or with this interpreter when it has libtpu.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.path.join(ROOT, ".venv-tpu", "bin", "python")


def tpu_interpreter() -> str | None:
    if os.path.exists(TPU_PYTHON):
        return TPU_PYTHON
    if importlib.util.find_spec("libtpu") is not None:
        return sys.executable
    return None


@pytest.mark.skipif(tpu_interpreter() is None,
                    reason="libtpu is not installed: create .venv-tpu as docs/tpu.md describes to run this test")
def test_aot_reports_memory_and_flops():
    # libtpu allows one process per machine (it locks /tmp/libtpu_lockfile) unless ALLOW_MULTIPLE_LIBTPU_LOAD is
    # set. Compile-only devices use no TPU, so this test may run next to another compile.
    env = dict(os.environ, PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("JAX_PLATFORMS", None)
    process = subprocess.run(
        [tpu_interpreter(), "-m", "mor_jax.tools.aot", "--config", os.path.join(ROOT, "configs", "smoke.yaml"),
         "--topology", "v5e:2x2", "mesh.data=2", "mesh.fsdp=2", "data.batch_size=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["topology"] == "v5e:2x2"
    assert result["hbm_bytes_per_chip"] == 16 * 2**30
    assert result["fits"] is True
    assert 0 < result["per_chip_bytes"] < 2**30
    # The compiled step also counts the optimizer, norms, softmax and the router, which the analytic count leaves
    # out. At smoke size those extras weigh more than at 360M, so the bounds are loose.
    assert 0.5 < result["compiled_flops"] / result["analytic_flops"] < 3.0
