"""Device mesh, sharding rules and multi-process start: the one place that knows about devices."""

from __future__ import annotations

import os
import re
import socket
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msnet import errors


class PortInUseError(errors.UserError, OSError):
  """The coordinator's port is held by another program, e.g. an earlier run that is still alive."""


def maybe_initialize_distributed() -> None:
  """Join a multi-process job when the launcher set one up (launch/*.sh, SLURM, Cloud TPU).

  `launch/local.sh` exports MSNET_COORDINATOR, MSNET_NUM_PROCESSES and MSNET_PROCESS_ID; on SLURM and
  Cloud TPU `jax.distributed.initialize()` detects the cluster itself (MSNET_DISTRIBUTED=auto).
  A single plain process does nothing.
  """
  if os.environ.get("MSNET_COORDINATOR"):
    if os.environ["MSNET_PROCESS_ID"] == "0":  # process 0 serves the coordinator on that port
      _check_port_free(os.environ["MSNET_COORDINATOR"])
    jax.distributed.initialize(
        coordinator_address=os.environ["MSNET_COORDINATOR"],
        num_processes=int(os.environ["MSNET_NUM_PROCESSES"]),
        process_id=int(os.environ["MSNET_PROCESS_ID"]),
    )
  elif os.environ.get("MSNET_DISTRIBUTED") == "auto":
    jax.distributed.initialize()


def _check_port_free(address: str) -> None:
  """Refuse a busy coordinator port up front: jax's RPC server fails on one, at times with a segfault.

  jax listens on all interfaces ([::]:port); SO_REUSEADDR, as gRPC sets it, lets a port in TIME_WAIT pass.
  """
  port = int(address.rpartition(":")[2])
  try:
    probe, host = socket.socket(socket.AF_INET6, socket.SOCK_STREAM), "::"
  except OSError:  # a kernel without IPv6
    probe, host = socket.socket(socket.AF_INET, socket.SOCK_STREAM), "0.0.0.0"
  with probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind((host, port))
    except OSError as e:
      raise PortInUseError(f"MSNET_COORDINATOR={address}: port {port} is in use ({e.strerror}); stop the program "
                           "that holds it or pick a free port (launch/local.sh --port N)") from None


def make_mesh(axes: Sequence[Sequence[Any]]) -> Mesh:
  """A mesh over all devices of all processes from config.mesh, e.g. [("data", -1), ("model", 2)]."""
  names = tuple(str(a[0]) for a in axes)
  sizes = [int(a[1]) for a in axes]
  n = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {list(axes)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"config.mesh: {list(axes)} does not divide {n} devices")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"config.mesh: sizes {sizes} use {int(np.prod(sizes))} devices but there are {n}")
  # Auto axes: XLA propagates the shardings (data parallel needs no per-op annotations); jax.make_mesh's
  # default, Explicit, makes every op with a sharded contracting dim (e.g. a conv's weight gradient over
  # the batch) demand an out_sharding.
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=jax.devices())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split along their leading axis over the 'data' mesh axis."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[Sequence[str]]) -> Any:
  """Shardings for a param pytree from (path regex, rule) pairs; the first matching rule wins.

  A rule is "replicate" or the name of a mesh axis: then the largest dimension of the array that the
  axis size divides is split over that axis (FSDP style), e.g. fc6 of each branch over "model".
  """
  def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    for pattern, rule in rules:
      if re.fullmatch(pattern, name):
        if rule == "replicate":
          return NamedSharding(mesh, P())
        if rule not in mesh.axis_names:
          raise ValueError(f"config.sharding_rules: {rule!r} is not a mesh axis {mesh.axis_names}")
        size = mesh.shape[rule]
        dims = sorted(range(len(leaf.shape)), key=lambda d: -leaf.shape[d])
        for d in dims:
          if leaf.shape[d] % size == 0 and leaf.shape[d] >= size:
            spec = [None] * len(leaf.shape)
            spec[d] = rule
            return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, params)


def process_slice(n: int) -> tuple[int, int]:
  """[start, stop) of this process's contiguous part of n items (evaluation, degrade)."""
  pid, count = jax.process_index(), jax.process_count()
  per = -(-n // count)
  return min(pid * per, n), min((pid + 1) * per, n)


def announce(key: str, value: str) -> None:
  """Publish `value` under `key` to every process of the job (the coordinator's key-value store)."""
  _coordinator().key_value_set(key, value)


def await_key(key: str) -> str:
  """The value some process announced under `key`, waiting as long as that process takes.

  For steps whose processes finish minutes apart (the degrade's parts): a collective over gloo gives up
  on a process that arrives 30 s after the others. A process that dies without announcing stops the job
  through the launcher (launch/local.sh, srun --kill-on-bad-exit) or the coordinator's heartbeat.
  """
  client = _coordinator()
  while True:
    try:
      return client.blocking_key_value_get(key, 60_000)
    except jax.errors.JaxRuntimeError as e:
      if "DEADLINE_EXCEEDED" not in str(e):
        raise


def _coordinator() -> Any:
  from jax._src import distributed  # noqa: PLC0415 (no public handle on the client; orbax reads it the same way)
  if distributed.global_state.client is None:
    raise RuntimeError("this process did not join a multi-process job through jax.distributed.initialize "
                       "(msnet.parallel.maybe_initialize_distributed, launch/*.sh)")
  return distributed.global_state.client
