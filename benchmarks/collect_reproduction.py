"""Copy the committed evidence of the CIFAR-10 reproduction out of its workdirs into benchmarks/results/reproduction/.

  python benchmarks/collect_reproduction.py --run runs/repro-s0 [--run runs/repro-s1 ...] [--study runs/depth]
  python benchmarks/collect_reproduction.py --into beyond --run runs/beyond-s0 ...   # -> reproduction/beyond/seed0
  python benchmarks/collect_reproduction.py --run runs/web --dest benchmarks/results/web/per_codec  # any one run
  python benchmarks/collect_reproduction.py --study runs/depth-repro --study-dest depth_study_repro  # -> reproduction/

Per run (seed<N>/): config.json, timings.json, every stage's DONE.json, the baseline's metrics.jsonl (unless it is
shared from another run: config.shared), and
W/eval (results.json/.csv, master.json, reliability.json, correct/: every image's top-1 per method and spec),
which is all `msnet report --runs` reads, so later seeds pool with these without re-running them; W/report
(report.md, table1.csv, figures); and a run.log.gz beside the workdir's files (benchmarks/device_run.sh's log). From the depth study: W/study (depth.md, depth.csv, depth_vs_reference.csv, depth.png), its timings.json and each depth's
eval/ and timings.json (so the depths' per-image results can be compared again without re-running them). Checkpoints and
shards are not copied (they are rebuilt by the commands in the README).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

OUT = pathlib.Path(__file__).resolve().parent / "results" / "reproduction"


def _copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  if not src.exists():
    raise SystemExit(f"collect_reproduction: {src} is missing; finish that run first")
  dst.parent.mkdir(parents=True, exist_ok=True)
  if src.is_dir():
    shutil.copytree(src, dst, dirs_exist_ok=True)
  else:
    shutil.copy2(src, dst)


def collect_run(run: pathlib.Path, into: str = "", dest: pathlib.Path | None = None) -> pathlib.Path:
  seed = json.loads((run / "config.json").read_text())["seed"]
  dst = dest or OUT / into / f"seed{seed}"
  for name in ("config.json", "timings.json", "eval", "report"):
    _copy(run / name, dst / name)
  if "shared_from" not in json.loads((run / "train" / "baseline" / "DONE.json").read_text()):  # trained here
    _copy(run / "train" / "baseline" / "metrics.jsonl", dst / "train" / "baseline" / "metrics.jsonl")
  for done in sorted((run / "train").glob("*/DONE.json")):
    _copy(done, dst / "train" / done.parent.name / "DONE.json")
  if (run / "run.log.gz").exists():
    _copy(run / "run.log.gz", dst / "run.log.gz")
  return dst


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", action="append", default=[], type=pathlib.Path, help="a finished `msnet run` workdir")
  parser.add_argument("--study", type=pathlib.Path, help="a finished `msnet study` workdir")
  parser.add_argument("--into", default="", help="a subfolder of reproduction/ for the runs (e.g. beyond)")
  parser.add_argument("--dest", type=pathlib.Path, help="the destination folder of a single --run")
  parser.add_argument("--study-dest", default="depth_study", help="the --study's folder under reproduction/")
  args = parser.parse_args()
  if args.dest and len(args.run) != 1:
    parser.error("--dest takes exactly one --run")
  for run in args.run:
    print(f"{run} -> {collect_run(run, args.into, args.dest)}")
  if args.study:
    dst = OUT / args.study_dest
    _copy(args.study / "study", dst)
    _copy(args.study / "timings.json", dst / "timings.json")
    for depth in sorted(args.study.glob("depth-*/")):
      for name in ("eval", "timings.json"):
        _copy(depth / name, dst / depth.name / name)
    print(f"{args.study / 'study'} -> {dst}")


if __name__ == "__main__":
  main()
