"""docs/cluster.md as a user follows it: every shell code block runs, in order, in one shell.

SLURM is simulated: stub ``sbatch`` and ``srun`` commands (written here, put first on PATH)
run each job at once on this machine with the environment variables SLURM gives a job
(``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT`` of *that submission*, ...). The only
substitutions are the ones the page itself names (``$SCRATCH``/``$TMPDIR`` temporary
directories, ``TASKS=2``, ``task=1``, the allocation's variables for the ``dask scheduler``
block, a ``"kind": "local"`` config for the last ``sbatch``); each is asserted to apply, so
an edit of the page that drops one fails here instead of silently testing less.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import gsnr_stats as gs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/cluster.md"
SBATCH = ROOT / "examples" / "slurm" / "dump_array.sbatch"
BIN = Path(sys.executable).parent
HANG_GUARD = 300  # s: only so that a regression fails instead of hanging the suite


def bash_blocks(text: str) -> list[str]:
    """The ```bash fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.M | re.S)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- stub SLURM -------------------------------------------------------------------------

SBATCH_STUB = r'''#!{python}
"""Stub sbatch: runs the job (every array task, in parallel) at once; stricter than SLURM in
that a failed job makes sbatch itself fail, so the test sees it."""
import os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["STUB_SLURM_STATE"])
args, opts, wrap, script, rest = sys.argv[1:], {{}}, None, None, []
i = 0
while i < len(args):
    a = args[i]
    if a == "--wrap":
        wrap, i = args[i + 1], i + 2
        continue
    if a == "--parsable":
        opts["parsable"] = True
    elif a.startswith("--") and "=" in a:
        k, v = a[2:].split("=", 1)
        opts[k] = v
    elif a.startswith("-"):
        sys.exit(f"sbatch stub: unsupported option {{a}}")
    else:
        script, rest = a, args[i + 1:]
        break
    i += 1
counter = state / "next"
jid = int(counter.read_text()) if counter.exists() else 1000
counter.write_text(str(jid + 1))
dep = opts.get("dependency")
if dep:
    kind, _, ids = dep.partition(":")
    if kind != "afterok" or not ids:
        sys.exit(f"sbatch: error: Batch job submission failed: Job dependency problem ({{dep}})")
    for d in ids.split(":"):
        rc = state / f"{{d}}.rc"
        if not rc.exists() or rc.read_text() != "0":
            sys.exit(f"sbatch: error: Batch job submission failed: Job dependency problem "
                     f"(job {{d!r}} unknown or failed)")
env = dict(os.environ)
export = opts.get("export", "ALL").split(",")
if export[0] != "ALL":
    sys.exit("sbatch stub: only --export=ALL,... is simulated")
for kv in export[1:]:
    k, _, v = kv.partition("=")
    env[k] = v
env.update(SLURM_JOB_ID=str(jid), SLURM_SUBMIT_DIR=os.getcwd())
if wrap is not None:
    r = subprocess.run(["bash", "-c", wrap], env=env, capture_output=True, text=True)
    (state / f"{{jid}}.out").write_text(r.stdout + r.stderr)
    runs = [r.returncode]
else:
    text = Path(script).read_text()
    m = re.search(r"^#SBATCH --cpus-per-task=(\d+)", text, re.M)
    env["SLURM_CPUS_PER_TASK"] = m.group(1) if m else "1"
    spec = opts.get("array") or re.search(r"^#SBATCH --array=(\S+)", text, re.M).group(1)
    tasks = []
    for part in spec.split("%")[0].split(","):
        a, _, b = part.partition("-")
        tasks += list(range(int(a), int(b or a) + 1))
    procs = []
    for t in tasks:
        e = dict(env, SLURM_ARRAY_JOB_ID=str(jid), SLURM_ARRAY_TASK_ID=str(t),
                 SLURM_ARRAY_TASK_COUNT=str(len(tasks)), SLURM_ARRAY_TASK_MIN=str(min(tasks)),
                 SLURM_ARRAY_TASK_MAX=str(max(tasks)))
        log = open(state / f"{{jid}}_{{t}}.out", "w")
        procs.append((t, log, subprocess.Popen(["bash", script, *rest], env=e, stdout=log,
                                                stderr=subprocess.STDOUT)))
    runs = []
    for t, log, p in procs:
        runs.append(p.wait())
        log.close()
rc = max(runs)
(state / f"{{jid}}.rc").write_text(str(rc))
if rc:
    logs = "".join(p.read_text() for p in sorted(state.glob(f"{{jid}}*.out")))
    sys.exit(f"sbatch stub: job {{jid}} failed (exit {{rc}}):\n{{logs}}")
print(jid if opts.get("parsable") else f"Submitted batch job {{jid}}")
'''

SRUN_STUB = """#!/bin/bash
# Stub srun: a job step is the command itself, inside an allocation only (as srun).
[[ -n "${SLURM_JOB_ID:-}" ]] || { echo "srun: error: not inside a job allocation" >&2; exit 1; }
exec "$@"
"""


def slurm_sandbox(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A working directory (with this checkout's examples/) and the environment of a login
    node: stub sbatch/srun first on PATH, no SLURM_* variables."""
    bindir, state, work = tmp / "bin", tmp / "slurm-state", tmp / "work"
    for d in (bindir, state, work, tmp / "scratch", tmp / "tmp"):
        d.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    (bindir / "sbatch").write_text(SBATCH_STUB.format(python=sys.executable))
    (bindir / "srun").write_text(SRUN_STUB)
    for f in ("sbatch", "srun"):
        (bindir / f).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bindir}{os.pathsep}{BIN}{os.pathsep}{env.get('PATH', '')}",
               SCRATCH=str(tmp / "scratch"), TMPDIR=str(tmp / "tmp"),
               STUB_SLURM_STATE=str(state), PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    return work, env


def substitute(block: str, old: str, new: str) -> str:
    assert old in block, f"docs/cluster.md no longer has {old!r}: update this test with it"
    return block.replace(old, new, 1)


def doc_script(blocks: list[str], jobqueue: bool) -> str:
    """The page's blocks as one bash script, with the documented substitutions."""
    out = ["set -euo pipefail"]
    for b in blocks:
        if "TASKS=8 " in b and "jid=$(sbatch" in b:
            b = substitute(b, "TASKS=8 ", "TASKS=2 ")
        elif b.startswith("task=5"):
            # the failed task left a truncated shard behind
            out.append('head -c 2000 "$RUN/shard-0001.h5" > "$TMPDIR/t" && '
                       'mv "$TMPDIR/t" "$RUN/shard-0001.h5"')
            b = substitute(b, "task=5 ", "task=1 ")
        elif "SLURM_ARRAY_TASK_ID=0 bash" in b:
            # the dry run as one task of one: all samples in one file, the reference below
            b = substitute(b, "TASKS=8 ", "TASKS=1 ")
        elif "dask scheduler" in b:
            # inside one allocation
            b = f"(\nexport SLURM_JOB_ID=77 SLURM_CPUS_PER_TASK=1\n{b}\n)"
        elif "--print-job-script" in b:
            check = "python examples/slurm/reduce_slurm.py --config cluster.json --print-job-script"
            local = ("> \"$TMPDIR/job-script.txt\"\n"
                     "echo '{\"kind\": \"local\", \"workers\": 1, \"dashboard_address\": \":0\"}'"
                     " > cluster.json")
            b = substitute(b, check, (check if jobqueue else ": no dask-jobqueue, skipped") + " "
                           + local + "\n: ")  # the rest of that line is its comment
        if b.startswith("gsnr-stats info"):
            b = b.rstrip("\n") + ' > "$TMPDIR/info.txt"'
        elif b.startswith("gsnr-stats reduce"):
            b = b.rstrip("\n") + ' && cp stats.nc "$TMPDIR/inprocess.nc"'
        elif "dask scheduler" in b:
            b += '\ncp stats.nc "$TMPDIR/dask.nc"'
        out.append(b)
    out.append('cp stats.nc "$TMPDIR/slurm.nc"')
    return "\n".join(out) + "\n"


@pytest.mark.slow
def test_every_command_of_the_page_runs(tmp_path):
    """The whole page: array dump through stub SLURM, a truncated shard rewritten by the
    documented retry of that one task (which, as in SLURM, is an array
    of one task), a local dry run, and the in-process, ``dask scheduler``/``srun dask
    worker`` and ``reduce_slurm.py`` reduces; every result equals one unsharded dump of the
    same training run (the dry run, as task 0 of 1) reduced in-process. Slow (about 14 Python
    processes, each importing the stack) but the only test of the page as a user runs it."""
    pytest.importorskip("distributed", reason="the dask blocks need the distributed extra")
    jobqueue = importlib.util.find_spec("dask_jobqueue") is not None
    blocks = bash_blocks(DOC.read_text())
    assert len(blocks) >= 6
    work, env = slurm_sandbox(tmp_path)
    script = doc_script(blocks, jobqueue)
    p = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=HANG_GUARD)
    finally:
        try:  # whatever the blocks left running (a scheduler after a failure)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode == 0, f"{out}\n--- script ---\n{script}"
    tmp = tmp_path / "tmp"
    run = tmp_path / "scratch" / "run42"
    shards = sorted(run.glob("shard-*.h5"))
    assert [s.name for s in shards] == ["shard-0000.h5", "shard-0001.h5"]
    # the truncated shard is whole again after the retry
    info = (tmp / "info.txt").read_text()
    assert "2 shards: 2 valid" in info, info
    for s in shards:
        with gs.open_store(s) as st:
            assert st.attrs["run_id"] == "run42"  # the retry kept the run's id
            assert st.attrs["user_attrs"]["tasks"] == 2  # and the run's task count
    # the dry run (no srun: not in a job) as task 0 of 1: one unsharded dump of the same
    # training run, the independent route for the reduces of the shards
    with gs.open_store(tmp / "gsnr-dry-run" / "shard-0000.h5") as st:
        assert st.attrs["user_attrs"]["tasks"] == 1 and st.attrs["user_attrs"]["task"] == 0
    whole = gs.reduce(tmp / "gsnr-dry-run" / "shard-0000.h5")
    # digits: 1797 samples, test_size=0.4 -> 719 test (ceil), 1078 train; 539 + 539 in 2 shards
    assert int(whole["count"].sel(step=2, split="train").max()) == 1078
    with gs.open_store(shards[1]) as st:
        assert st.record(2, "train").n_samples == 539 and st.record(2, "test").n_samples == 359
    names = ["inprocess.nc", "dask.nc", "slurm.nc"]
    for name in names:
        got = xr.load_dataset(tmp / name)
        assert got.sizes == whole.sizes, name
        np.testing.assert_array_equal(got["count"].values, whole["count"].values, err_msg=name)
        for v in ("mean", "var", "gsnr", "loss_mean"):
            np.testing.assert_allclose(got[v].values, whole[v].values, rtol=1e-9, atol=0,
                                       equal_nan=True, err_msg=f"{name}: {v}")
    if jobqueue:
        job = (tmp / "job-script.txt").read_text()
        assert "--interface ib0" in job and "#SBATCH -A proj42" in job, job


def test_job_script_outside_slurm_says_what_to_do(tmp_path):
    """Outside SLURM the job script stopped at ``SLURM_ARRAY_TASK_ID: unbound variable``; now
    it names what is missing and the documented local dry run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OUT"}
    r = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "unbound variable" not in r.stderr
    assert "OUT is not set" in r.stderr
    r = subprocess.run(["bash", str(SBATCH)], env=dict(env, OUT=str(tmp_path / "r")),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unbound variable" not in r.stderr
    assert "SLURM_ARRAY_TASK_ID=0 bash" in r.stderr and not (tmp_path / "r").exists()
    # and the page documents that dry run
    assert any("SLURM_ARRAY_TASK_ID=0 bash examples/slurm/dump_array.sbatch" in b
               for b in bash_blocks(DOC.read_text()))


def test_no_single_quoted_variables_in_commands():
    """``'/scratch/$USER/...'`` in single quotes is never expanded by the shell; a command
    of the page passes a variable in single quotes only inside a double-quoted string."""
    text = DOC.read_text()
    inline = re.findall(r"`([^`\n]*(?:gsnr-stats|sbatch|python)[^`\n]*)`", text)
    for cmd in [*bash_blocks(text), *inline]:
        for line in cmd.splitlines():
            bare = re.sub(r'"[^"]*"', '""', line)  # single quotes inside "..." are literal
            bare = re.sub(r"<<'EOF'", "", bare)
            bare = re.sub(r"\s#\s.*$", "", bare)  # a comment
            for q in re.findall(r"'[^']*'", bare):
                assert "$" not in q, f"docs/cluster.md: {q} is never expanded: {line}"


def test_throughput_numbers_come_from_one_place():
    """The per-core rate of the projection is what ``bench/scale.py`` takes from the quiet
    run's table (the least GB per CPU-second of the Dask rows), every mention of it says the
    same number, and the projection table is ``bench.scale.project`` of it."""
    text = DOC.read_text()
    sec = text[text.index("## 4."):text.index("## 5.")]
    rows = re.findall(r"^\| Dask, [^|]*\|[^|]*\|[^|]*\| ([\d.]+) \|", sec, re.M)
    assert len(rows) == 2
    rate = min(float(r) for r in rows)
    mentions = [float(x) for x in re.findall(r"(?:uses|With|at|×) ([\d.]+) GB(?: per|/s per core|/s ≈)",
                                             sec)]
    assert len(mentions) >= 4 and set(mentions) == {rate}, mentions
    scale = _load(ROOT / "bench" / "scale.py", "bench_scale")
    pj = scale.project(rate, nodes=100, cores=64, tb=10.0, fs_gbps=200.0, nic_gbps=12.5)
    table = dict(re.findall(r"^\| (compute|per-node|parallel)[^|]*\| ([\d.]+) TB/s \|", sec, re.M))
    assert float(table["compute"]) == round(pj["compute_GBps"] / 1e3, 1)
    assert float(table["per-node"]) == round(pj["nic_GBps"] / 1e3, 2)
    assert f"| {pj['compute_GBps'] / 1e3:.1f} TB/s | {10e12 / (pj['compute_GBps'] * 1e9):.2f} s |" \
        in sec
    assert f"about {round(200 / rate)} cores" in sec


def test_page_names_the_extras_it_needs():
    """The page says which extra each part needs, and those are real extras of the package."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    text = DOC.read_text()
    assert "distributed" in extras and 'pip install "gsnr-stats[distributed]"' in text
    assert any(d.startswith("dask-jobqueue") for d in extras["test"])
    assert "`dask-jobqueue`" in text and "pip install dask-jobqueue" in text


def test_bash_blocks_parse():
    """Each block is valid bash on its own (``bash -n``)."""
    for b in bash_blocks(DOC.read_text()):
        r = subprocess.run(["bash", "-n"], input=b, capture_output=True, text=True)
        assert r.returncode == 0, (b, r.stderr)
