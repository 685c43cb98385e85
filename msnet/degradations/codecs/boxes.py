"""ISO base media boxes (JP2, JPEG XL containers): length, type, payload."""

from __future__ import annotations


def top_level(data: bytes, what: str) -> dict[bytes, bytes]:
  """Top-level boxes of a container file, type -> payload (the first of each type); ValueError naming `what`
  (e.g. "JP2 file") when a box runs past the end."""
  boxes, i = {}, 0
  while i + 8 <= len(data):
    length, kind, header = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8], 8
    if length == 1:
      length, header = int.from_bytes(data[i + 8:i + 16], "big"), 16
    elif length == 0:
      length = len(data) - i
    if length < header or i + length > len(data):
      raise ValueError(f"corrupt {what}: box {kind!r} at byte {i} runs past the end")
    boxes.setdefault(kind, data[i + header:i + length])
    i += length
  return boxes
