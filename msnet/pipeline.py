"""`msnet run` / `msnet demo`: the stage graph degrade -> train stages -> evaluate -> report.

Every stage skips work whose outputs are complete (shards with checksums, DONE.json of a training
stage, finished evaluation cells), so rerunning the same command after a crash continues.
Wall time per stage goes to W/timings.json.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Callable, Sequence

import jax
import ml_collections

from msnet import errors


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[msnet] {message}", flush=True)


def _timed(workdir: pathlib.Path, name: str, fn: Callable[[], object]) -> object:
  """Run one stage and add its wall time to the stage's in W/timings.json (process 0 writes it): a resumed stage
  sums its runs, and a rerun that finds the stage complete adds only its check, keeping the work's time."""
  _log(f"== {name}")
  start = time.perf_counter()
  out = fn()
  seconds = time.perf_counter() - start
  _log(f"== {name} done in {seconds:.1f} s")
  if jax.process_index() == 0:
    path = workdir / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[name] = round(timings.get(name, 0.0) + seconds, 2)
    path.write_text(json.dumps(timings, indent=2) + "\n")
  return out


def link_dir(path: pathlib.Path, target: pathlib.Path) -> None:
  """A relative symlink path -> target, made once (the workdir can move as a whole)."""
  if path.is_symlink():
    return
  if path.exists():
    raise errors.InvalidInputError(f"{path} exists and is not a link to {target}, which this run shares: remove "
                                   f"{path} or give a fresh workdir")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(os.path.relpath(target, path.parent), target_is_directory=True)


def share(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Link what config.shared reuses from another run (its data/, its completed stages); done once."""
  s = config.shared
  if not s.workdir:
    return
  from msnet.train import stages as stages_lib
  source = pathlib.Path(s.workdir)
  if s.data:
    if not (source / "data" / "manifest.json").exists():
      raise errors.MissingInputError(f"config.shared.data: {source / 'data' / 'manifest.json'} is missing; run "
                                     f"`msnet degrade --workdir={source}` first")
    link_dir(workdir / "data", source / "data")
  for entry in s.stages:
    stage, _, src = entry.partition("=")
    stages_lib.share_stage(source, workdir, config, stage, src or None)


def degrade(config: ml_collections.ConfigDict, workdir: pathlib.Path, merge_only: bool = False) -> None:
  from msnet.data import degrade as degrade_lib
  share(config, workdir)
  if merge_only:  # parts written by several machines: verify every shard's sha256, write manifest.json
    manifest = degrade_lib.merge_manifests(workdir, verify=True)
    _log(f"merged {manifest['num_parts']} manifest parts into {workdir / 'data' / 'manifest.json'}")
  else:
    manifest = _timed(workdir, "degrade", lambda: degrade_lib.run_degrade(config, workdir))
  _log_skipped(manifest, workdir)


def _log_skipped(manifest: dict, workdir: pathlib.Path, first: int = 5) -> None:
  """One line per split with skipped source files: how many, the first few, where the full list is."""
  for split, entry in manifest["splits"].items():
    names = entry.get("skipped_names", [])
    if names:
      more = ", ..." if len(names) > first else ""
      _log(f"degrade skipped {len(names)} of {entry['num_records_used']} files of split {split!r} that cannot "
           f"be used (degrade.on_corrupt='skip'): {', '.join(names[:first])}{more}; all of them in "
           f"{workdir / 'data' / 'manifest.json'} (splits.{split}.skipped_names)")


def show(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, spec: str, n: int,
         out: pathlib.Path | None, split: str | None) -> None:
  from msnet import degradations
  from msnet.data import show as show_lib
  out = out or workdir / f"show-{degradations.spec_slug(spec)}.png"
  show_lib.render_grid(workdir, split or config.data.eval_split, spec, n, out, config)
  _log(f"wrote {out}")


def train(config: ml_collections.ConfigDict, workdir: pathlib.Path,
          stages: Sequence[str] | None = None) -> None:
  from msnet import train as train_lib
  share(config, workdir)
  known = train_lib.stage_names(config)
  stages = list(stages or known)
  for stage in stages:
    if stage not in known:
      raise errors.InvalidInputError(f"--stage={stage}: no such stage in this config; its stages are {known}")
  if "baseline" in stages:
    _check_pretrained(config, workdir)
  for stage in stages:
    _timed(workdir, f"train/{stage}", lambda s=stage: train_lib.run_stage(config, workdir, s))


def _check_pretrained(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """A missing config.model.pretrained file fails before any work, not when the baseline stage starts."""
  from msnet.train import loop
  path = config.model.pretrained
  if path and not os.path.isfile(path) and loop.read_done(workdir, "baseline") is None:
    raise errors.MissingInputError(f"config.model.pretrained: no file {path}; give the path of the VGG-16 "
                                   "weights (a Keras .h5, torchvision .safetensors or .pth file)")


def evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  from msnet import evaluate as evaluate_lib
  _timed(workdir, "evaluate", lambda: evaluate_lib.run_evaluate(config, workdir))


def report(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  from msnet import report as report_lib
  _timed(workdir, "report", lambda: report_lib.run_report(config, workdir))
  _log(f"report: {workdir / 'report' / 'report.md'}")


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """The whole experiment of one config; a rerun continues where the last one stopped."""
  start = time.perf_counter()
  _check_pretrained(config, workdir)
  degrade(config, workdir)
  train(config, workdir)
  evaluate(config, workdir)
  report(config, workdir)
  _log(f"all stages done in {time.perf_counter() - start:.0f} s; report: {workdir / 'report' / 'report.md'}")
