"""`msnet evaluate`: every method over every spec of the configured sweeps, as masked sums on the mesh.

A method is a function from (params, batch) to [B, C] class probabilities. They run in two model groups,
each one jitted function with explicit shardings, compiled once for the whole sweep (the eval batch shape
is fixed; padding rows are masked):
  shared: everything computed from the baseline's trunk, which runs once per batch: the heads of the K=1
          methods whose trunk is bitwise the baseline's (baseline, da_fc8/67/678) and the assembled slave's
          K branches, stacked into one vmapped call; every branch alone (`branch_<bin>`), AMS, the oracle
          and bitstream routings and, with the master (run once too), MS and MAP all come from the same
          [K, B, C] slave logits; DeepCloak is the baseline head on the masked trunk features. It also
          counts the master's and the bitstream's bin confusion.
  single: K=1 networks with a trunk of their own (stability trains every layer; the AlexNet baseline),
          one jitted step per architecture, one call per method.
Methods whose training stages are not complete are skipped, printed and listed in the meta as "missing".
Sums are global arrays reduced by jit across devices and processes and fetched once per spec.

Two data paths, the same results (resident.py; config.evaluate.device_data decides per spec): a spec's records
put on the devices once, every batch of it run by each group's step scanned (`lax.scan`) in one call, the next
spec read on a thread meanwhile; or streamed from the shards batch by batch (loader.eval_batches), one call
per batch, for data that does not fit the budget.

Outputs (process 0 writes):
  W/eval/cells.jsonl   one line per finished spec (the resume log; a rerun skips specs whose line has
                       the same set of methods and whose per-image file exists).
  W/eval/results.json  {"rows": [...], "meta": {...}}: a row per (method, spec) with ROW_FIELDS:
                         method, spec (canonical), sweeps (names of the sweeps holding the spec),
                         kind, level (the last op: "jpeg" 10.0, "noise" 20.0, "clean" null),
                         codec, codec_level (the chain's last codec, "" / null without one),
                         pre (canonical chain before the last op, "" for a single op),
                         top1, top5 (fractions), n, correct1, correct5 (counts),
                         ci95_low, ci95_high (Wilson 95% interval of top1),
                         psnr (mean over images with finite PSNR, null if all identical), bpp (mean or null).
                       meta: methods, missing ({method: why}), bins, sweeps ({name: canonical specs}),
                         specs, skipped (count of source records degrade skipped as unreadable, what n leaves
                         out; null without a manifest), evaluated_now, device_data (the specs of evaluated_now
                         evaluated from device-resident records), global_batch, devices, processes, traces
                         (compiles per group in this call), flops (per image: slave, master, baseline), wall_s.
  W/eval/results.csv   the same rows (sweeps joined with ';', null as empty).
  W/eval/correct/<spec slug>.npz  every method's top-1 per record of the spec (packed bits, record order: every
                       spec holds the same source records in the same order), for the report's paired bootstrap;
                       see results.write_correct.
  W/eval/master.json   {"bins": [...], "specs": {spec: {n, true_bin, master_accuracy, master_confusion,
                       bitstream_accuracy, bitstream_confusion}}}; confusion rows = true bin.
  W/eval/receptive_fields.json  [{arch, variant, layers: [{layer, rf, stride}]}] for the report's Fig. 1c
                       (the report imports no model code).

`msnet evaluate --external=PATH` (external.py) runs the same groups and steps (`evaluate_batches`) over a
benchmark set read from its own files (ImageNet-C, CIFAR-10-C, <class>/<file>) into W/eval/external/<name>/,
with the same row fields (kind = corruption, level = severity), leaving W/data and the files above alone.
"""

from msnet.evaluate.external import run_external
from msnet.evaluate.groups import Groups, build_groups
from msnet.evaluate.plan import ROUTED, Plan, make_plan, method_names, spec_plan, stage_done
from msnet.evaluate.results import (ROW_FIELDS, correct_path, read_cells, rows_of, skipped_records, spec_fields,
                                   spec_stats, wilson, write_correct, write_results)
from msnet.evaluate.run import evaluate_batches, evaluate_resident, evaluate_spec, run_evaluate
from msnet.evaluate.steps import Layout, make_shared_step, make_single_step

__all__ = ["ROUTED", "ROW_FIELDS", "Groups", "Layout", "Plan", "build_groups", "correct_path", "evaluate_batches",
           "evaluate_resident", "evaluate_spec", "make_plan", "make_shared_step", "make_single_step", "method_names",
           "read_cells", "rows_of", "run_evaluate", "run_external", "skipped_records", "spec_fields", "spec_plan",
           "spec_stats", "stage_done", "wilson", "write_correct", "write_results"]
