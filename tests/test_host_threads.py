"""No call of the toolkit changes the host framework's thread count (issue 12).

Numba's ``omp`` threading layer sets the OpenMP thread count of the thread that starts it;
torch on the same libgomp reads that value back as its own, so ``torch.set_num_threads(1)``
came back as 2 after the first ``gs.reduce``. Each case runs in a fresh interpreter because
the layer starts once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

_WRITE = """
import numpy as np
import gsnr_stats as gs
rng = np.random.default_rng(0)
with gs.GradientWriter(PATH, [("w", (300,))]) as w:
    w.write(0, "train", rng.standard_normal((64, 300)).astype(np.float32))
    w.end_record(0, "train")
"""


def _run(tmp_path, body: str) -> str:
    code = textwrap.dedent(body).replace("WRITE", _WRITE).replace("PATH", repr(str(tmp_path / "s.h5")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "NUMBA_"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("threads", [1, None])
def test_torch_threads_set_before_import_survive_reduce(tmp_path, threads):
    out = _run(tmp_path, f"""
        import torch
        torch.set_num_threads(1)
        WRITE
        assert torch.get_num_threads() == 1  # torch's lazy thread init runs here, as in a loop
        gs.reduce(PATH, threads={threads!r})
        gs.reduce(PATH, threads={threads!r})
        print(torch.get_num_threads())
    """)
    assert out == "1"


def test_torch_threads_set_after_import_survive_reduce(tmp_path):
    out = _run(tmp_path, """
        WRITE
        import torch
        torch.set_num_threads(1)
        torch.ones(64, 64) @ torch.ones(64, 64)
        gs.reduce(PATH, threads=1)
        print(torch.get_num_threads())
    """)
    assert out == "1"


def test_importing_the_toolkit_leaves_torch_default(tmp_path):
    # torch's own default, measured in a clean interpreter, is the reference
    plain = _run(tmp_path, "import torch\nprint(torch.get_num_threads())")
    out = _run(tmp_path, """
        import torch
        WRITE
        torch.ones(64, 64) @ torch.ones(64, 64)
        gs.reduce(PATH)
        print(torch.get_num_threads())
    """)
    assert out == plain
