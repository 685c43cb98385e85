"""1 process x 8 devices and 2 processes x 4 devices (launch/local.sh) compute the same thing.

One module-scoped experiment on the runlocal demo config:
  - the same shards in two workdirs;
  - baseline trained 1x8 and 2x4: same losses (float32 tolerance) and same final params;
  - branch_jpeg trained 2x4 with process 1 killed (SIGKILL) after a checkpoint, then both relaunched: it
    resumes and ends with the params of an uninterrupted 2x4 run;
  - evaluation 1x8 and 2x4: every example counted exactly once, the same results.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = f"--config={ROOT / 'configs' / 'demo.py'}:runlocal"
OVERRIDES = ["--config.stages.branch.steps=30", "--config.train.checkpoint_every_steps=2",
             "--config.evaluate.methods=('baseline',)"]
pytestmark = pytest.mark.slow


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MSNET_")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _msnet(*args: str) -> list[str]:
  return [sys.executable, "-m", "msnet.cli", *args, CONFIG, *OVERRIDES]


def _one_by_eight(*args: str) -> None:
  subprocess.run(_msnet(*args), env=_env(8), check=True, timeout=600, capture_output=True)


def _two_by_four(*args: str, wait: bool = True) -> subprocess.Popen:
  cmd = ["bash", str(ROOT / "launch" / "local.sh"), "--processes", "2", "--devices-per-process", "4", "--",
         *_msnet(*args)]
  proc = subprocess.Popen(cmd, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if wait:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
  return proc


def _losses(workdir: pathlib.Path, stage: str) -> list[float]:
  lines = (workdir / "train" / stage / "metrics.jsonl").read_text().splitlines()
  return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]


def _params(workdir: pathlib.Path, stage: str) -> list[np.ndarray]:
  code = (f"import jax, numpy as np; from msnet import train; p = train.load_params({str(workdir)!r}, {stage!r}); "
          f"np.savez({str(workdir / (stage + '.npz'))!r}, *jax.tree.leaves(p))")
  subprocess.run([sys.executable, "-c", code], env=_env(1), check=True, timeout=300, capture_output=True)
  with np.load(workdir / f"{stage}.npz") as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _process_pids(workdir: pathlib.Path, process_id: int) -> list[int]:
  """PIDs of msnet processes working on `workdir` with MSNET_PROCESS_ID=process_id."""
  found = []
  for entry in pathlib.Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
      environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
      continue
    if str(workdir) in cmdline and "msnet.cli" in cmdline and f"MSNET_PROCESS_ID={process_id}" in environ:
      found.append(int(entry.name))
  return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("mp")
  single, multi, multi_ref = base / "single", base / "multi", base / "multi_ref"
  _one_by_eight("degrade", f"--workdir={single}")
  shutil.copytree(single / "data", multi / "data")
  _one_by_eight("train", f"--workdir={single}", "--stage=baseline")
  _two_by_four("train", f"--workdir={multi}", "--stage=baseline")

  # branch_jpeg on 2x4 uninterrupted, from the same baseline: the reference for the resumed run.
  shutil.copytree(multi / "data", multi_ref / "data")
  shutil.copytree(multi / "train" / "baseline", multi_ref / "train" / "baseline")
  _two_by_four("train", f"--workdir={multi_ref}", "--stage=branch_jpeg")

  # branch_jpeg on 2x4: kill process 1 once a checkpoint exists, then relaunch both.
  proc = _two_by_four("train", f"--workdir={multi}", "--stage=branch_jpeg", wait=False)
  ckpt = multi / "train" / "branch_jpeg" / "ckpt"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpt.exists() and any(p.name.isdigit() and int(p.name) >= 4
                                                               for p in ckpt.iterdir())):
    time.sleep(0.2)
  killed = _process_pids(multi, 1)
  for pid in killed:
    os.kill(pid, signal.SIGKILL)
  out, _ = proc.communicate(timeout=300)
  interrupted = not (multi / "train" / "branch_jpeg" / "DONE.json").exists()
  _two_by_four("train", f"--workdir={multi}", "--stage=branch_jpeg")

  # Evaluation of the same trained params (single's) on 1x8 and on 2x4.
  _one_by_eight("evaluate", f"--workdir={single}")
  multi_eval = base / "multi_eval"
  for part in ("data", "train"):
    shutil.copytree(single / part, multi_eval / part)
  _two_by_four("evaluate", f"--workdir={multi_eval}")
  return dict(single=single, multi=multi, multi_ref=multi_ref, multi_eval=multi_eval, killed=killed,
              interrupted=interrupted, launcher_rc=proc.returncode)


def test_two_processes_train_like_one(runs):
  # Same data, order and sharding; only float32 rounding differs: XLA's CPU convs (Eigen's forward, the
  # kernel-gradient conv) sum in an order that depends on the process layout. The losses agree to ~1e-5;
  # the tiny test net then amplifies the rounding through ReLU/GroupNorm to ~1-2% of its smallest
  # parameters. A wrong shard or batch changes the losses by 1e-3 or more. Conv biases under GroupNorm
  # have an exact gradient of 0 (the norm subtracts the mean): they hold only rounding noise, ~1e-7.
  np.testing.assert_allclose(_losses(runs["multi"], "baseline"), _losses(runs["single"], "baseline"),
                             rtol=1e-4, atol=1e-6)
  for a, b in zip(_params(runs["multi"], "baseline"), _params(runs["single"], "baseline"), strict=True):
    assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b) + 1e-6


def test_killed_process_resumes_from_checkpoint(runs):
  assert runs["killed"], "process 1 was not found to kill"
  assert runs["interrupted"] and runs["launcher_rc"] != 0, "the killed run should not have completed"
  done = json.loads((runs["multi"] / "train" / "branch_jpeg" / "DONE.json").read_text())
  assert done["resumed_from_step"] >= 4
  # Same 2x4 topology as the uninterrupted reference, so the same arithmetic: equal up to float32 noise.
  for a, b in zip(_params(runs["multi"], "branch_jpeg"), _params(runs["multi_ref"], "branch_jpeg"), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  assert _losses(runs["multi"], "branch_jpeg")[-1] == pytest.approx(_losses(runs["multi_ref"], "branch_jpeg")[-1],
                                                                     rel=1e-6)


def test_two_process_evaluation_counts_every_example_once(runs):
  single = json.loads((runs["single"] / "eval" / "results.json").read_text())["rows"]
  multi = json.loads((runs["multi_eval"] / "eval" / "results.json").read_text())["rows"]
  manifest = json.loads((runs["single"] / "data" / "manifest.json").read_text())
  records = {spec: v["num_records"] for spec, v in manifest["splits"]["test"]["specs"].items()}
  assert single and len(single) == len(multi)
  for a, b in zip(sorted(single, key=lambda r: (r["method"], r["spec"])),
                  sorted(multi, key=lambda r: (r["method"], r["spec"])), strict=True):
    assert (a["method"], a["spec"]) == (b["method"], b["spec"])
    assert a["n"] == b["n"] == records[a["spec"]]
    assert (a["correct1"], a["correct5"]) == (b["correct1"], b["correct5"])
