#!/usr/bin/env bash
# `msnet degrade` over the whole embedded CIFAR-10 test split (10,000 images) for clean and the jpeg (1-100),
# jp2k, noise and blur sweeps of configs/cifar10_paper.py: times it, kills it with SIGKILL part-way, reruns
# it (complete shards must be kept, not rewritten), then degrades again into a fresh workdir and compares
# every shard checksum.
#
#   bash benchmarks/degrade_test_split.sh [WORKDIR_PREFIX] [SECONDS_BEFORE_KILL]
set -euo pipefail
prefix=${1:-/tmp/msnet-degrade-check}
kill_after=${2:-40}
rm -rf "$prefix-a" "$prefix-b"
args=(--config=configs/cifar10_paper.py --config.data.max_train_examples=1
      "--config.evaluate.sweeps=('clean','jpeg','jp2k','noise','blur')")

echo "== run A, killed with SIGKILL after ${kill_after}s"
msnet degrade "${args[@]}" --workdir="$prefix-a" > "$prefix-a.log" 2>&1 & pid=$!
sleep "$kill_after"; pkill -KILL -P "$pid" || true; kill -KILL "$pid" || true; wait "$pid" || true
complete_before=$(find "$prefix-a/data" -name '*.array_record.json' | wc -l)
find "$prefix-a/data" -name '*.array_record' -printf '%p %i %T@\n' | sort > "$prefix-a.before"
echo "complete shards after the kill: $complete_before"

echo "== run A again (resume)"
start=$SECONDS
msnet degrade "${args[@]}" --workdir="$prefix-a" 2>&1 | tr '\r' '\n' | grep -E "^\[degrade\]|done in" || true
echo "resume took $((SECONDS - start)) s"
rewritten=0
while read -r path inode mtime; do
  now=$(stat -c '%i %Y' "$path" 2>/dev/null || echo gone)
  [[ "$now" == "$inode ${mtime%.*}" ]] || rewritten=$((rewritten + 1))
done < <(while read -r p i m; do [[ -f "$p.json" ]] && echo "$p $i $m"; done < "$prefix-a.before")
echo "complete shards rewritten by the resume: $rewritten"

echo "== run B from scratch (timed)"
start=$SECONDS
msnet degrade "${args[@]}" --workdir="$prefix-b" 2>&1 | tr '\r' '\n' | grep -E "^\[degrade\]|done in" || true
echo "fresh run took $((SECONDS - start)) s"

python3 - "$prefix-a" "$prefix-b" <<'PY'
import json, sys
a, b = (json.load(open(f"{w}/data/manifest.json")) for w in sys.argv[1:3])
def sums(m):
  return {(split, spec, s["file"]): s["sha256"] for split, v in m["splits"].items()
          for spec, e in v["specs"].items() for s in e["shards"]}
sa, sb = sums(a), sums(b)
test = a["splits"]["test"]
print(f"test split: {test['num_records_used']} images x {len(test['specs'])} specs; "
      f"shards {len(sa)} (A) {len(sb)} (B); identical checksums: {sa == sb}")
PY
