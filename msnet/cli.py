"""The `msnet` command line: subcommands over one config and one workdir. No experiment logic here.

  msnet degrade  --config=configs/demo.py[:runlocal] --workdir=W [--config.a.b=value ...] [--merge]
  msnet show     --workdir=W --spec=jpeg:10 --n=16 --out=grid.png
  msnet train    --config=... --workdir=W [--stage=baseline]   (all stages when --stage is not given)
  msnet evaluate --config=... --workdir=W
  msnet report   --config=... --workdir=W
  msnet run      --config=... --workdir=W     (degrade -> train stages -> evaluate -> report)
  msnet demo     [--workdir=W]                (run with configs/demo.py on the embedded CIFAR-10)

Without --config, a subcommand reads the resolved config a previous command wrote to W/config.json.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from msnet import config as config_lib

SUBCOMMANDS = ("degrade", "show", "train", "evaluate", "report", "run", "demo")
REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py or configs/demo.py:runlocal.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Working directory (local path or gs:// bucket path).")
_STAGE = flags.DEFINE_multi_string("stage", None, "train: only these stages (default: all, in order).")
_SPEC = flags.DEFINE_string("spec", "jpeg:10", "show: the degradation spec to show.")
_SPLIT = flags.DEFINE_string("split", None, "show: source split (default: config.data.eval_split).")
_MERGE = flags.DEFINE_bool("merge", False, "degrade: only check every part's shards (sha256) and merge the "
                           "manifest parts of a job split over machines into W/data/manifest.json.")
_N = flags.DEFINE_integer("n", 16, "show: number of examples.")
_OUT = flags.DEFINE_string("out", None, "show: output PNG path (default: W/show-<spec>.png).")


def _usage() -> str:
  return f"usage: msnet {{{','.join(SUBCOMMANDS)}}} --config=configs/x.py[:arg] --workdir=DIR [--config.a.b=v]"


def _resolve_config(command: str, workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config from --config, else the demo's (for `demo`), else the one saved in the workdir."""
  if _CONFIG.value is not None:
    return _CONFIG.value
  if command == "demo":
    demo = REPO_CONFIGS / "demo.py"
    if not demo.exists():
      raise app.UsageError(f"configs/demo.py not found at {demo}; install msnet from its repository (pip install -e .)")
    spec = importlib.util.spec_from_file_location("msnet_demo_config", demo)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(None)
    cfg.lock()
    return cfg
  saved = workdir / "config.json"
  if not saved.exists():
    raise app.UsageError(f"msnet {command}: give --config=configs/x.py (no {saved} from an earlier command)")
  cfg = config_lib.from_json(saved.read_text())
  cfg.lock()
  return cfg


def _write_config(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  import jax  # noqa: PLC0415 (only the process that writes decides; jax is already up by then)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(cfg) + "\n")


def _main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(_usage())
  command = argv[1]
  if _WORKDIR.value is None and command != "demo":
    raise app.UsageError(f"msnet {command}: --workdir is required")
  workdir = pathlib.Path(_WORKDIR.value or "msnet-demo").absolute()
  cfg = _resolve_config(command, workdir)
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    print(f"msnet {command}: invalid config: {e}", file=sys.stderr)
    sys.exit(2)

  from msnet import parallel, pipeline  # noqa: PLC0415 (keep `msnet --help` fast)
  parallel.maybe_initialize_distributed()
  if command != "show":
    _write_config(cfg, workdir)

  if command == "degrade":
    pipeline.degrade(cfg, workdir, merge_only=_MERGE.value)
  elif command == "show":
    out = pathlib.Path(_OUT.value) if _OUT.value else None
    pipeline.show(cfg, workdir, spec=_SPEC.value, n=_N.value, out=out, split=_SPLIT.value)
  elif command == "train":
    pipeline.train(cfg, workdir, stages=_STAGE.value)
  elif command == "evaluate":
    pipeline.evaluate(cfg, workdir)
  elif command == "report":
    pipeline.report(cfg, workdir)
  elif command in ("run", "demo"):
    pipeline.run(cfg, workdir)


def main() -> None:
  """Console-script entry point. Library INFO logs (orbax, jax) are hidden unless --verbosity=0."""
  flags.FLAGS.set_default("verbosity", -1)
  app.run(_main)


if __name__ == "__main__":
  main()
