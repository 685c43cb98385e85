#!/bin/bash
# Builds .whl/, the wheels that benchmarks/device_check.sh and device_run.sh install on the lent H200 (its image
# has jax, flax, optax, orbax, numpy, Pillow, but none of these): the versions pinned in pyproject.toml, for its
# Python 3.12. imagecodecs is cut to the codecs a CIFAR run uses (JPEG, JPEG 2000, PNG, WebP and the libraries
# they link): the whole wheel is 26 MiB, and with this 48 MiB repository it passes the tool's 64 MiB limit.
# The codecs left out read as "n/a" in imagecodecs.version() and raise DelayedImportError if called.
#   bash benchmarks/device_wheels.sh        (here, in the repository root; needs pip's registry and readelf)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir .whl
pin() { sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml; }
for p in grain array_record imagecodecs ml-collections; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$p==$(pin "$p")"
done
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl portpicker  # grain's, not in the image
keep="_imcd _shared _shared_cython _jpeg8 _jpeg2k _png _webp _zlib _deflate"
tmp=$(mktemp -d) && wheel=$(ls .whl/imagecodecs-*.whl) && (cd "$tmp" && python3 -m zipfile -e "$OLDPWD/$wheel" .)
for m in "$tmp"/imagecodecs/_*.abi3.so; do
  [[ " $keep " == *" $(basename "$m" .abi3.so) "* ]] || rm "$m"
done
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
libs=" " todo=$(ls "$tmp"/imagecodecs/*.so)
while [ -n "$todo" ]; do
  next=""
  for f in $todo; do for l in $(needed "$f"); do
    if [ -f "$tmp/imagecodecs.libs/$l" ] && [[ "$libs" != *" $l "* ]]; then libs="$libs$l "; next="$next $tmp/imagecodecs.libs/$l"; fi
  done; done
  todo=$next
done
for l in "$tmp"/imagecodecs.libs/*; do [[ "$libs" == *" $(basename "$l") "* ]] || rm "$l"; done
python3 - "$tmp" "$wheel" <<'PY'
"""Rewrite the wheel's RECORD for the files kept, then zip it back in place."""
import base64, hashlib, pathlib, sys, zipfile
root, wheel = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
record = next(root.glob("*.dist-info")) / "RECORD"
files = sorted(p for p in root.rglob("*") if p.is_file() and p != record)
lines = [f"{p.relative_to(root)},sha256="
         f"{base64.urlsafe_b64encode(hashlib.sha256(p.read_bytes()).digest()).rstrip(b'=').decode()},{p.stat().st_size}"
         for p in files]
record.write_text("\n".join(lines + [f"{record.relative_to(root)},,"]) + "\n")
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
  for p in files + [record]:
    z.write(p, p.relative_to(root))
PY
rm -rf "$tmp"
du -sh .whl && ls .whl
