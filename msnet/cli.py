"""The `msnet` command line: subcommands over one config and one workdir. No experiment logic here.

  msnet degrade  --config=configs/demo.py[:runlocal] --workdir=W [--config.a.b=value ...] [--merge]
  msnet show     --workdir=W --spec=jpeg:10 --n=16 --out=grid.png
  msnet train    --config=... --workdir=W [--stage=baseline]   (all stages when --stage is not given)
  msnet evaluate --config=... --workdir=W
  msnet evaluate --workdir=W --external=PATH [--layout=imagenet-c|cifar10-c|folder] [--name=N]
                 (every trained method on a set W did not make: W/eval/external/<name>/, msnet/evaluate/external.py)
  msnet report   --config=... --workdir=W
  msnet report   --workdir=OUT --runs=W1,W2,W3 (one report over runs of one config with different seeds)
  msnet run      --config=... --workdir=W     (degrade -> train stages -> evaluate -> report)
  msnet demo     [--workdir=W]                (run with configs/demo.py on the embedded CIFAR-10)
  msnet study    --config=configs/depth_study.py --workdir=W   (the trunk-depth study: msnet/study.py)
  msnet predict  --workdir=W [--rule=ms] [--top=5] [--json] [--max-pixels=N] PATH...   (msnet/files.py)
  msnet export   --workdir=W --rule=ms --out=DIR [--platforms=cpu,cuda]   (jax.export artifact: msnet/export.py)

Without --config, a subcommand reads the resolved config a previous command wrote to W/config.json;
predict and export always use it (the config the workdir's models were trained with) and write nothing in W
but their log.

The terminal shows msnet's own stage lines and progress bars. Library logs (every Python `logging` record:
absl, jax, orbax; Python warnings) go to W/logs/<command>-p<process index>.log, one file per process that
each command appends to; `--verbosity=0` (or higher) or MSNET_DEBUG=1 shows them on the terminal too.

Exit codes: 0 done; 2 an error the user can fix (`msnet.errors.UserError`: a bad flag or config value, an
unknown or missing stage, a missing or unreadable input file, an image too small, a busy coordinator port),
printed as one line `msnet <command>: <message>` on stderr with its traceback in the log file; 1 any other
error, its traceback on the terminal and in the log file; 3 (predict) the readable files were classified
but some files were skipped, each named on stderr (none readable at all: 2).
"""

from __future__ import annotations

import importlib.util
import logging
import logging.handlers
import os
import pathlib
import sys
from typing import NoReturn

from absl import app, flags, logging as absl_logging
import ml_collections
from ml_collections import config_flags

from msnet import config as config_lib, errors, methods

SUBCOMMANDS = ("degrade", "show", "train", "evaluate", "report", "run", "demo", "study", "predict", "export")
REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
LOGS = "logs"  # W/logs/<command>-p<process index>.log
USER_ERROR_EXIT_CODE = 2
_LOG = logging.getLogger("msnet")  # the command line and tracebacks: the log file only, whatever the verbosity
_LOG.propagate = False
_LOG.setLevel(logging.INFO)

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
_OUT = flags.DEFINE_string("out", None, "show: output PNG path (default: W/show-<spec>.png); export: the output "
                           "directory.")
_RULE = flags.DEFINE_string(
    "rule", "ms", "predict, export: the decision rule or single network whose stages are trained: "
    f"{', '.join(methods.names(methods.RULE, methods.NETWORK))} (msnet.methods; rules routed by the true bin, "
    f"{', '.join(methods.names(bins='true'))}, export only), branch_<bin>, and with the calibrate stage "
    "branch_<bin>_cal.")
_TOP = flags.DEFINE_integer("top", 5, "predict: the N most probable classes of each file.")
_JSON = flags.DEFINE_bool("json", False, "predict: one JSON object per file instead of a text line.")
_PLATFORMS = flags.DEFINE_list("platforms", None, "export: the platforms the artifact runs on, e.g. cpu,cuda,tpu "
                               "(default: this machine's).")
_EXTERNAL = flags.DEFINE_string("external", None, "evaluate: the directory of a benchmark set the workdir did not "
                                "make (ImageNet-C, CIFAR-10-C, <class>/<file>); results in W/eval/external/<name>/.")
_LAYOUT = flags.DEFINE_string("layout", None, "evaluate --external: imagenet-c, cifar10-c or folder (default: "
                              "detected from the files).")
_NAME = flags.DEFINE_string("name", None, "evaluate --external: the results' directory under W/eval/external/ "
                            "(default: the set directory's name).")
_MAX_PIXELS = flags.DEFINE_integer(
    "max-pixels", None, "predict, evaluate, degrade, run: refuse image files whose header claims more pixels than "
    "this, before decoding (default config.data.max_pixels: Pillow's MAX_IMAGE_PIXELS, 89,478,485).")
_RUNS = flags.DEFINE_list("runs", None, "report: one report in --workdir over these workdirs (runs of one config "
                          "with different seeds): per-seed Table 1, mean +- sd, intervals over the pooled images.")


def _usage() -> str:
  return f"usage: msnet {{{','.join(SUBCOMMANDS)}}} --config=configs/x.py[:arg] --workdir=DIR [--config.a.b=v]"


class _LibraryLogs:
  """Every Python logging record of this process into W/logs/<command>-p<i>.log; not on the terminal
  unless `to_terminal` (then absl's stderr handler stays beside the file).

  Records wait in memory until the process index is known, after jax.distributed.initialize.
  """

  def __init__(self, directory: pathlib.Path, command: str, to_terminal: bool):
    self._directory, self._command = directory, command
    self._buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    self._file: logging.FileHandler | None = None
    if not to_terminal:
      logging.root.removeHandler(absl_logging.get_absl_handler())
      logging.captureWarnings(True)
    logging.root.addHandler(self._buffer)

  def open(self, process: int | str) -> None:
    """Start appending to this process's file, with the records held so far."""
    self._directory.mkdir(parents=True, exist_ok=True)
    self._file = logging.FileHandler(self._directory / f"{self._command}-p{process}.log")
    self._file.setFormatter(absl_logging.PythonFormatter())
    _LOG.addHandler(self._file)
    _LOG.info("msnet %s", " ".join(sys.argv[1:]))
    self._buffer.setTarget(self._file)
    self._buffer.close()  # hands the held records to the file
    logging.root.removeHandler(self._buffer)
    logging.root.addHandler(self._file)

  def write_traceback(self) -> None:
    """The exception being handled, with its traceback, into the file only: the terminal shows it once.

    A command that fails before joining the job names the file by the launcher's process id; one refused
    before any work (a bad config) leaves a workdir that does not exist yet uncreated, and unlogged.
    """
    if self._file is None:
      if not self._directory.parent.exists():
        return
      self.open(os.environ.get("MSNET_PROCESS_ID", "0"))
    _LOG.exception("msnet %s failed", self._command)


def _debug() -> bool:
  """Library logs on the terminal too: --verbosity=0 or higher given, or MSNET_DEBUG=1."""
  verbosity = flags.FLAGS["verbosity"]
  return os.environ.get("MSNET_DEBUG") == "1" or (verbosity.present > 0 and verbosity.value >= 0)


def _exit_user_error(command: str, message: str) -> NoReturn:
  """One line on stderr, `msnet <command>: <message>`; a message that quotes a traceback keeps its first
  and last lines."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if "Traceback (most recent call last):" in lines:
    lines = [lines[0], lines[-1]]
  print(f"{' '.join(filter(None, ('msnet', command)))}: {' '.join(lines)}", file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT_CODE)


def _config_load_error(error: OSError) -> str:
  """ml_collections' failure to load a config file lists every path it tried; its last line is the cause."""
  return f"--config: cannot load the config file: {str(error).strip().splitlines()[-1].strip()}"


def _missing_field_error(argv: list[str], error: KeyError) -> str:
  """ml_collections' KeyError for an override of a field the config lacks, naming the override's flag."""
  field, _, hint = str(error.args[0]).partition("\n")
  field = field.strip("'\"")
  overrides = [a.partition("=")[0] for a in argv if a.startswith("--config.")]
  flag = next((o for o in overrides if field in o.split(".")), "--config.*")
  return f"{flag}: the config has no field {field!r}; {hint or 'the fields are in msnet/config.py:base_config()'}"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, --config file or --config.x override as one line and exit code 2."""
  command = next((a for a in argv[1:] if a in SUBCOMMANDS), "")
  try:
    return flags.FLAGS(argv)
  except KeyError as e:
    _exit_user_error(command, _missing_field_error(argv, e))
  except AttributeError as e:  # ml_collections wraps the KeyError of a missing top-level field in one
    cause = e.args[0] if e.args else None
    _exit_user_error(command, _missing_field_error(argv, cause) if isinstance(cause, KeyError) else f"--config: {e}")
  except OSError as e:
    _exit_user_error(command, _config_load_error(e))
  except flags.Error as e:
    _exit_user_error(command, str(e))


def _resolve_config(command: str, workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The config from --config, else the demo's (for `demo`), else the one saved in the workdir."""
  if _CONFIG.value is not None:
    try:
      _CONFIG.value.lock()  # a config file that did not load raises on first use (ml_collections defers it)
    except OSError as e:
      raise errors.UserError(_config_load_error(e)) from e
    return _CONFIG.value
  if command == "demo":
    demo = REPO_CONFIGS / "demo.py"
    if not demo.exists():
      raise errors.MissingInputError(f"configs/demo.py not found at {demo}; install msnet from its repository "
                                     "(pip install -e .)")
    spec = importlib.util.spec_from_file_location("msnet_demo_config", demo)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(None)
    cfg.lock()
    return cfg
  saved = workdir / "config.json"
  if not saved.exists():
    raise errors.MissingInputError(f"no --config and no {saved} from an earlier command: give "
                                   "--config=configs/x.py")
  cfg = config_lib.from_json(saved.read_text())
  cfg.lock()
  return cfg


def _write_config(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  import jax  # noqa: PLC0415 (only the process that writes decides; jax is already up by then)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_lib.to_json(cfg) + "\n")


def _main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS or (len(argv) > 2) != (argv[1] == "predict"):
    raise app.UsageError(_usage() + "\n       msnet predict --workdir=DIR [--rule=ms] PATH... (image files or "
                         "directories)", exitcode=USER_ERROR_EXIT_CODE)
  command = argv[1]
  if _WORKDIR.value is None and command != "demo":
    _exit_user_error(command, "--workdir is required: the directory (or gs:// path) of this experiment's files")
  workdir = pathlib.Path(_WORKDIR.value or "msnet-demo").absolute()
  logs = _LibraryLogs(workdir / LOGS, command, to_terminal=_debug())
  try:
    _run(command, workdir, logs, argv[2:])
  except errors.UserError as e:
    logs.write_traceback()
    _exit_user_error(command, str(e))
  except Exception:
    logs.write_traceback()
    raise


def _use_trained(command: str, workdir: pathlib.Path, logs: _LibraryLogs, paths: list[str]) -> None:
  """predict / export: the workdir's trained models under the config they were trained with (W/config.json)."""
  if _CONFIG.value is not None:
    raise errors.InvalidInputError(f"{command} uses the config the workdir's models were trained with "
                                   f"({workdir / 'config.json'}); drop --config")
  if command == "export" and not _OUT.value:
    raise errors.InvalidInputError("export: --out=DIR is required (the directory for model.jaxexport and export.json)")
  import jax  # noqa: PLC0415
  from msnet import predict  # noqa: PLC0415
  logs.open(jax.process_index())
  if command == "predict":
    from msnet import files  # noqa: PLC0415
    if files.predict_files(predict.load(workdir), paths, rule=_RULE.value, top=_TOP.value, as_json=_JSON.value,
                           max_pixels=_MAX_PIXELS.value):
      sys.exit(files.SKIPPED_EXIT_CODE)
  else:
    from msnet import export  # noqa: PLC0415
    out = export.export(workdir, _RULE.value, _OUT.value, platforms=_PLATFORMS.value)
    print(f"[msnet] export: rule {_RULE.value!r} -> {out / export.ARTIFACT}, {out / export.META}", file=sys.stderr)


def _run(command: str, workdir: pathlib.Path, logs: _LibraryLogs, paths: list[str]) -> None:
  if command == "report" and _RUNS.value:  # reads the runs' result files only: no config, no JAX
    from msnet import report  # noqa: PLC0415
    print(f"[msnet] report: {report.run_runs_report(_RUNS.value, workdir)}", file=sys.stderr)
    return
  if ((_LAYOUT.value or _NAME.value) and not _EXTERNAL.value) or (_EXTERNAL.value and command != "evaluate"):
    raise errors.InvalidInputError("--external, --layout and --name belong to `msnet evaluate --external=PATH`; "
                                   "give --external=PATH to evaluate with --layout or --name")
  if command in ("predict", "export"):
    _use_trained(command, workdir, logs, paths)
    return
  cfg = _resolve_config(command, workdir)
  if _MAX_PIXELS.value is not None:
    cfg.data.max_pixels = _MAX_PIXELS.value
  config_lib.validate(cfg)

  import jax  # noqa: PLC0415 (keep `msnet --help` fast)
  from msnet import parallel, pipeline  # noqa: PLC0415
  parallel.maybe_initialize_distributed()
  logs.open(jax.process_index())
  if command != "show":
    _write_config(cfg, workdir)

  if command == "degrade":
    pipeline.degrade(cfg, workdir, merge_only=_MERGE.value)
  elif command == "show":
    out = pathlib.Path(_OUT.value) if _OUT.value else None
    pipeline.show(cfg, workdir, spec=_SPEC.value, n=_N.value, out=out, split=_SPLIT.value)
  elif command == "train":
    pipeline.train(cfg, workdir, stages=_STAGE.value)
  elif command == "evaluate" and _EXTERNAL.value:
    from msnet.evaluate import external  # noqa: PLC0415
    external.run_external(cfg, workdir, _EXTERNAL.value, layout=_LAYOUT.value, name=_NAME.value)
  elif command == "evaluate":
    pipeline.evaluate(cfg, workdir)
  elif command == "report":
    pipeline.report(cfg, workdir)
  elif command in ("run", "demo"):
    pipeline.run(cfg, workdir)
  elif command == "study":
    from msnet import study  # noqa: PLC0415
    study.run_study(cfg, workdir)


def main() -> None:
  """Console-script entry point."""
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
