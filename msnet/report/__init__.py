"""`msnet report`: W/report/report.md, table1.csv, ce.csv and PNG figures from the result files alone.

Reads W/eval/results.json, W/eval/master.json, W/eval/receptive_fields.json and W/train/*/DONE.json; imports
no JAX or model code, so a report can be rebuilt anywhere from a copied workdir. Every number in the text
is computed from those files; the only typed-in numbers are the paper's Table 1, labelled as such.
"""

from msnet.report.run import run_report, run_runs_report

__all__ = ["run_report", "run_runs_report"]
