"""`msnet report`: W/report/report.md, table1.csv, ce.csv and PNG figures from the result files alone.

Reads W/eval/results.json, W/eval/correct/*.npz (per-image top-1, for the paired bootstrap intervals of
stats.py), W/eval/master.json, W/eval/receptive_fields.json and W/train/*/DONE.json; imports no JAX or model
code, so a report can be rebuilt anywhere from a copied workdir. Every number in the text is computed from
those files; the only typed-in numbers are the paper's Table 1, labelled as such. run_runs_report (`msnet
report --runs`) writes one report over several runs of a config with different seeds. Sets evaluated with
`msnet evaluate --external` (W/eval/external/<name>/) add a section and W/report/external_<name>.csv each;
a `transcode` sweep adds transcode.csv and transcode.png.
"""

from msnet.report.run import run_report, run_runs_report

__all__ = ["run_report", "run_runs_report"]
