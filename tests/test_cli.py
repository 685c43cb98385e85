"""The `msnet` console: stage lines and progress bars on the terminal, library logs in W/logs/, and an error
the user can fix as one line on stderr with exit code 2 (its traceback in the log file)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = f"--config={ROOT / 'configs' / 'demo.py'}:runlocal"
# The runlocal pipeline without the comparison methods and with one sweep: every stage kind still runs.
SHRINK = ["--config.comparisons=()", "--config.evaluate.methods=('baseline','ms')", "--config.evaluate.sweeps=('jpeg',)"]
ABSL_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl's prefix: level, MMDD, then the time
ABSL_HEADER = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} ")  # the same anywhere, e.g. after a progress bar's \r
PROGRESS_BAR = re.compile(r"^[\w/ ]+: +\d+%\|")  # tqdm's "degrade:  40%|████  | 2/5 [...]"


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MSNET_")}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def _msnet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "msnet.cli", *args], env=env or _env(), capture_output=True,
                        text=True, timeout=600, cwd=ROOT)


def _lines(text: str) -> list[str]:
  """Terminal lines: a progress bar redraws with \\r, so a log line can start after one."""
  return [line for line in re.split(r"[\r\n]", text) if line.strip()]


@pytest.fixture(scope="module")
def runlocal(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
  workdir = tmp_path_factory.mktemp("runlocal")
  return _msnet("run", CONFIG, f"--workdir={workdir}", *SHRINK), workdir


@pytest.mark.slow
def test_runlocal_console_has_no_library_logs(runlocal):
  proc, workdir = runlocal
  assert proc.returncode == 0, proc.stderr[-3000:]
  console = _lines(proc.stdout) + _lines(proc.stderr)
  assert [line for line in console if ABSL_LINE.match(line)] == []
  assert not ABSL_HEADER.search(proc.stdout + proc.stderr)
  for stage in ("degrade", "train/baseline", "train/branch_jpeg", "train/master", "evaluate", "report"):
    assert f"[msnet] == {stage} done in" in proc.stdout
  assert "baseline: 100%" in proc.stderr  # the training progress bar stays
  assert (workdir / "report" / "report.md").exists()


@pytest.mark.slow
def test_runlocal_library_logs_go_to_the_workdir(runlocal):
  proc, workdir = runlocal
  # the degrade workers' file: their Python warnings and C libraries' stderr (msnet.data.degrade._init_worker)
  assert sorted(p.name for p in (workdir / "logs").iterdir()) == ["degrade-part0-workers.log", "run-p0.log"]
  log = (workdir / "logs" / "run-p0.log").read_text().splitlines()
  assert log[0].endswith("] msnet " + " ".join(["run", CONFIG, f"--workdir={workdir}", *SHRINK]))
  # orbax's checkpoint manager logs every save at INFO, in absl's format.
  assert any(ABSL_LINE.match(line) and "checkpoint_manager.py:" in line for line in log)
  assert "Traceback" not in "\n".join(log)


def _one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  lines = [line for line in _lines(proc.stderr) if not PROGRESS_BAR.match(line)]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"msnet {command}: ")
  return lines[0]


def _logged_traceback(workdir: pathlib.Path, command: str, error: str) -> None:
  log = (workdir / "logs" / f"{command}-p0.log").read_text()
  assert "Traceback (most recent call last):" in log and error in log


def test_bad_config_value_is_one_line(tmp_path):
  line = _one_error_line(_msnet("train", CONFIG, f"--workdir={tmp_path}", "--config.train.global_batch=0"), "train")
  assert "config.train.global_batch" in line and ">= 1" in line
  _logged_traceback(tmp_path, "train", "ConfigError")


@pytest.mark.parametrize("override, named", [
    ("--config.train.global_bach=3", ["--config.train.global_bach", "'global_bach'", '"global_batch"']),
    ("--config.train.global_batch=abc", ["--config.train.global_batch=abc", "'abc'"]),
])
def test_bad_config_override_is_one_line(tmp_path, override, named):
  line = _one_error_line(_msnet("train", CONFIG, f"--workdir={tmp_path}", override), "train")
  assert all(n in line for n in named), line


def test_missing_config_file_is_one_line(tmp_path):
  missing = tmp_path / "nope.py"
  line = _one_error_line(_msnet("train", f"--config={missing}", f"--workdir={tmp_path}"), "train")
  assert f"--config: cannot load the config file: [Errno 2] No such file or directory: '{missing}'" in line


def test_unknown_stage_is_one_line(tmp_path):
  line = _one_error_line(_msnet("train", CONFIG, f"--workdir={tmp_path}", "--stage=nope"), "train")
  assert "--stage=nope" in line and "'baseline'" in line
  _logged_traceback(tmp_path, "train", "InvalidInputError")


def test_evaluate_before_training_is_one_line(tmp_path):
  line = _one_error_line(_msnet("evaluate", CONFIG, f"--workdir={tmp_path}"), "evaluate")
  assert "msnet train" in line


def test_train_before_degrade_is_one_line(tmp_path):
  line = _one_error_line(_msnet("train", CONFIG, f"--workdir={tmp_path}", "--stage=baseline"), "train")
  assert "data/train/clean" in line and "run `msnet degrade`" in line
  _logged_traceback(tmp_path, "train", "MissingInputError")


def test_missing_pretrained_weights_is_one_line(tmp_path):
  weights = tmp_path / "vgg16_weights.h5"
  proc = _msnet("run", CONFIG, f"--workdir={tmp_path}", f"--config.model.pretrained={weights}")
  line = _one_error_line(proc, "run")
  assert f"config.model.pretrained: no file {weights}" in line
  assert not (tmp_path / "data").exists()  # refused before degrading anything


def test_busy_coordinator_port_is_one_line(tmp_path):
  with socket.socket() as holder:
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    env = _env(MSNET_COORDINATOR=f"127.0.0.1:{port}", MSNET_NUM_PROCESSES="1", MSNET_PROCESS_ID="0")
    line = _one_error_line(_msnet("train", CONFIG, f"--workdir={tmp_path}", env=env), "train")
  assert f"MSNET_COORDINATOR=127.0.0.1:{port}: port {port} is in use" in line
  _logged_traceback(tmp_path, "train", "PortInUseError")


def _folder_source(root: pathlib.Path, image: bytes) -> list[str]:
  """An ImageFolder of one image per split and class, and the overrides that read it."""
  for split in ("train", "test"):
    for cls in ("a", "b"):
      (root / split / cls).mkdir(parents=True)
      (root / split / cls / "x.png").write_bytes(image)
  return ["--config.data.source=folder", f"--config.data.path={root}", "--config.degrade.on_corrupt=raise"]


def _png(size: int) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("image, named", [
    (_png(16), "image is 16x16, smaller than config.data.image_size=32"),
    (b"not an image", "not an image: neither JPEG"),
], ids=["too-small", "not-an-image"])
def test_bad_source_image_is_one_line(tmp_path, image, named):
  workdir = tmp_path / "w"
  overrides = _folder_source(tmp_path / "images", image)
  line = _one_error_line(_msnet("degrade", CONFIG, f"--workdir={workdir}", *overrides), "degrade")
  assert "x.png" in line and named in line, line


def test_unexpected_error_keeps_its_traceback(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  proc = _msnet("train", f"--workdir={tmp_path}")
  assert proc.returncode == 1
  assert "Traceback (most recent call last):" in proc.stderr and "JSONDecodeError" in proc.stderr
  _logged_traceback(tmp_path, "train", "JSONDecodeError")


def test_timings_add_up_over_reruns_so_a_skipped_stage_keeps_its_work(tmp_path, monkeypatch):
  """W/timings.json: a stage's wall time is the sum over the commands that ran it (a rerun that finds it
  complete adds its check; before, it overwrote the stage's hours with that check's seconds)."""
  from msnet import pipeline  # noqa: PLC0415
  clock = iter([0.0, 100.0, 200.0, 200.5])
  monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(clock))
  assert pipeline._timed(tmp_path, "train/baseline", lambda: "trained") == "trained"
  pipeline._timed(tmp_path, "train/baseline", lambda: "skipped")
  assert json.loads((tmp_path / "timings.json").read_text()) == {"train/baseline": 100.5}
