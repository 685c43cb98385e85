"""What every benchmark shares: writing its JSON results with the command that produced them."""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def write_results(path: str | os.PathLike, out: dict[str, Any]) -> None:
  """Writes {"command": the command line, **out} as indented JSON to `path` (folders created)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"command": " ".join(["python", *sys.argv]), **out}, f, indent=1)
  print(f"wrote {path}")
