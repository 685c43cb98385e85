r"""Put a finished demo's Table 1, one figure and its wall times into README.md (nothing typed in by hand).

  msnet demo --workdir=msnet-demo
  python benchmarks/demo_to_readme.py --workdir=msnet-demo --seconds=<wall time of README command (1)>

Copies W/report/fig3.png to benchmarks/results/demo/ and replaces the block between the
`<!-- DEMO-RESULTS -->` markers of README.md with the table (from W/report/table1.csv), the split of the
wall time by stage (W/timings.json) and the machine it ran on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- DEMO-RESULTS -->", "<!-- /DEMO-RESULTS -->"


def _fmt(value: str) -> str:
  return f"{float(value):.1f}" if value not in ("", "nan") else "-"


def _ci(lo: str, hi: str) -> str:
  """A table1.csv interval as the report prints it: '[lo, hi]', 'unbounded' (% change undefined in too many
  resamples), '-' when missing."""
  if "" in (lo, hi) or "nan" in (lo, hi):
    return "-"
  if "inf" in lo or "inf" in hi:
    return "unbounded"
  return f"[{float(lo):.1f}, {float(hi):.1f}]"


def _cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def block(workdir: pathlib.Path, seconds: float) -> str:
  rows = list(csv.DictReader((workdir / "report" / "table1.csv").open()))
  timings = json.loads((workdir / "timings.json").read_text())
  lines = [BEGIN, "", "## Demo results", "",
           f"`msnet demo` on {os.cpu_count()} CPU cores ({_cpu_name()}), no accelerator: "
           f"{seconds / 60:.1f} minutes wall time for command (1) above, run in a clean clone (fresh venv and "
           "pip install included). "
           "Table 1 of this run (top-1 %, 1,000 CIFAR-10 test images, narrow VGG-16 trained for minutes; "
           "c, d = baseline clean / JPEG-10, c', d' = the method's, % change = (d' - d) / (c - d); 95% paired "
           "bootstrap intervals over the test images, 2,000 resamples):", "",
           "| method | c | d | c' | d' | d' - d | 95% CI | % change | 95% CI |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {_fmt(r['c'])} | {_fmt(r['d'])} | {_fmt(r['c_prime'])} | "
                 f"{_fmt(r['d_prime'])} | {_fmt(r['d_gain'])} | {_ci(r['d_gain_lo'], r['d_gain_hi'])} | "
                 f"{_fmt(r['pct_change'])} | {_ci(r['pct_change_lo'], r['pct_change_hi'])} |")
  lines += ["", "Wall time by stage (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
            "", "![baseline vs MS vs AMS vs MAP over JPEG and JPEG 2000](benchmarks/results/demo/fig3.png)", "",
            "The full report (all figures, corruption errors, the master's confusion, the paper's claims "
            "decided one by one from their intervals) is `msnet-demo/report/report.md`.", "", END]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", type=pathlib.Path, required=True)
  parser.add_argument("--seconds", type=float, required=True, help="wall time of README command (1), install included")
  args = parser.parse_args()
  out = ROOT / "benchmarks" / "results" / "demo"
  out.mkdir(parents=True, exist_ok=True)
  shutil.copy(args.workdir / "report" / "fig3.png", out / "fig3.png")
  shutil.copy(args.workdir / "report" / "table1.csv", out / "table1.csv")
  shutil.copy(args.workdir / "timings.json", out / "timings.json")
  readme = (ROOT / "README.md").read_text()
  start = readme.index(BEGIN)
  end = readme.index(END) + len(END) if END in readme else start + len(BEGIN)
  (ROOT / "README.md").write_text(readme[:start] + block(args.workdir, args.seconds) + readme[end:])
  print(f"README.md updated from {args.workdir}")


if __name__ == "__main__":
  main()
