"""The device check's summary (benchmarks/device_check.sh): its measurements against issue 20's targets.

  python benchmarks/device_summary.py --run W --b128 W128_off --b128 W128_on --bench vgg16_224.json \
      [--bench resnet50_224.json] --rc rc.txt --out DIR

Reads the accelerator config's whole run W (W/timings.json: wall time per stage; W/train/*/DONE.json: each stage's
images/s without compilation; W/logs/run-p0.log: every compilation JAX logged with JAX_LOG_COMPILES), the batch-128
baseline runs, the 224x224 benchmarks (bench_device.py: VGG-16, ResNet-50), and writes summary.json and summary.md in --out, with W's Table 1
(from W/report/report.md). The reference clean accuracy is the committed batch-128 reproduction's baseline
(benchmarks/results/reproduction/seed*/train/baseline/DONE.json, the same network and data at batch 128).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import re
import statistics
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
TARGETS = {"vgg16_224_mfu": 0.40, "baseline_img_s": 150_000, "run_wall_s": 120, "clean_accuracy_points": 0.5}
_COMPILE = re.compile(r"Finished XLA compilation of (.+?) in ([0-9.e+-]+) ?s")


def _json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def compilations(log: pathlib.Path) -> dict[str, Any]:
  """Seconds of XLA compilation per function name in a JAX_LOG_COMPILES log (cache hits compile nothing)."""
  per: dict[str, float] = {}
  if log.exists():
    for name, seconds in _COMPILE.findall(log.read_text(errors="replace")):
      per[name] = per.get(name, 0.0) + float(seconds)
  return {"total_s": sum(per.values()), "count_by_name": len(per),
          "slowest": dict(sorted(per.items(), key=lambda kv: -kv[1])[:10])}


def stages(workdir: pathlib.Path) -> dict[str, Any]:
  """Per trained stage: wall time, images/s without compilation, steps, batch, data path, K, accuracies."""
  out = {}
  for done in sorted(workdir.glob("train/*/DONE.json")):
    d = json.loads(done.read_text())
    out[done.parent.name] = {k: d.get(k) for k in ("wall_time_s", "images_per_s", "steps", "global_batch",
                                                  "data_path", "steps_per_call", "val_accuracy")}
  return out


def table1(workdir: pathlib.Path) -> str:
  report = workdir / "report" / "report.md"
  if not report.exists():
    return "(no report: the run did not finish)"
  text = report.read_text()
  start = text.find("## Table 1")
  end = text.find("\n## ", start + 1)
  return text[start:end].strip() if start >= 0 else "(no Table 1 in the report)"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="the accelerator config's workdir")
  ap.add_argument("--b128", action="append", default=[], help="workdirs of the batch-128 baseline runs")
  ap.add_argument("--bench", action="append", required=True, help="bench_device.py's JSON, one per --arch")
  ap.add_argument("--rc", default="", help="the script's exit codes and wall times")
  ap.add_argument("--out", required=True)
  a = ap.parse_args()
  run = pathlib.Path(a.run)
  gpu = stages(run)
  references = [json.loads(pathlib.Path(p).read_text())["val_accuracy"]
                for p in sorted(glob.glob(str(HERE / "results/reproduction/seed*/train/baseline/DONE.json")))]
  b128 = {}
  for w in map(pathlib.Path, a.b128):
    d = _json(w / "train" / "baseline" / "DONE.json") or {}
    b128[w.name] = {k: d.get(k) for k in ("images_per_s", "data_path", "steps", "wall_time_s")}
  benches = [b for b in (_json(pathlib.Path(p)) for p in a.bench) if b]  # a bench cut off by its timeout: none
  best_mfu = {b.get("arch", "vgg16"): max((r["rows"]["train_step_bf16"]["mfu"] or 0 for r in b["batches"]), default=None)
              for b in benches}
  timings = _json(run / "timings.json") or {}
  compiled = compilations(run / "logs" / "run-p0.log")
  baseline = gpu.get("baseline", {})
  clean = baseline.get("val_accuracy")
  summary = {
      "rc": pathlib.Path(a.rc).read_text() if a.rc and os.path.exists(a.rc) else "",
      "targets": TARGETS,
      "a_bench_224": benches, "a_best_train_mfu": best_mfu,
      "b_baseline_batch128": b128, "b_baseline_accelerator_img_s": baseline.get("images_per_s"),
      "c_run_wall_s": sum(timings.values()) if timings else None, "c_timings": timings, "c_stages": gpu,
      "c_compilation": compiled,
      "c_baseline_clean_accuracy": clean, "reference_batch128_clean_accuracy": references,
      "c_clean_minus_batch128_points": (100 * (clean - statistics.mean(references))
                                        if clean is not None and references else None),
  }
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  lines = ["# Device check (benchmarks/device_check.sh)", "", f"```\n{summary['rc'].strip()}\n```", "",
           "## (a) 224x224 slaves (K=3), bf16 train step", "",
           "| arch | batch | img/s | MFU (analytic) | MFU (XLA's count) | compile s |", "|---|---|---|---|---|---|"]
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  for bench in benches:
    for b in bench["batches"]:
      r = b["rows"]["train_step_bf16"]
      lines.append(f"| {bench.get('arch', 'vgg16')} | {b['batch']} | {r['img_s']:.0f} | {pct(r['mfu'])} | "
                   f"{pct(r['xla_mfu'])} | {b['compile_s']:.1f} |")
  lines += ["", f"Target: >= {100 * TARGETS['vgg16_224_mfu']:.0f}% MFU for VGG-16 (ResNet-50: measured, no target).", "",
            "## (b) CIFAR baseline stage, images/s (compilation left out)", "", "| run | data path | img/s |", "|---|---|---|"]
  for name, d in b128.items():
    lines.append(f"| batch 128, {name} | {d['data_path']} | {d['images_per_s'] or 0:.0f} |")
  lines.append(f"| accelerator config (batch {baseline.get('global_batch')}) | {baseline.get('data_path')} | "
               f"{baseline.get('images_per_s') or 0:.0f} |")
  lines += ["", f"Target: >= {TARGETS['baseline_img_s']:,} img/s.", "",
            "## (c) the whole `msnet run` of configs/cifar10_repro.py:gpu", "",
            f"Wall time {summary['c_run_wall_s']} s over the stages (target <= {TARGETS['run_wall_s']} s); "
            f"XLA compilation {compiled['total_s']:.1f} s of it ({compiled['count_by_name']} programs).", "",
            "| stage | wall s |", "|---|---|", *[f"| {k} | {v} |" for k, v in timings.items()], "",
            f"Baseline clean accuracy {clean} against the batch-128 runs' {references} "
            f"({summary['c_clean_minus_batch128_points']} points; target within {TARGETS['clean_accuracy_points']}).",
            "", table1(run), ""]
  (out / "summary.md").write_text("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
