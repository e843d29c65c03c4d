#!/usr/bin/env bash
# The fault suite under load, the way issue 14 asks to show it: run `tests/faults` RUNS times in
# a row while a busy loop pinned to one core (taskset) keeps that core at 100%. Each run's
# pytest summary, log and scenario reports (NEWSREC_FAULT_REPORT_DIR) land in OUT_DIR/run-K/;
# OUT_DIR/summary.json counts passed/failed/xfailed per run.
#
#   tools/fault_soak.sh [OUT_DIR]      env: RUNS (default 3), HOG_CORE (default 1, "" for no hog)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results/fault-soak}
RUNS=${RUNS:-3}
HOG_CORE=${HOG_CORE-1}
mkdir -p "$OUT"

hog_pid=""
if [ -n "$HOG_CORE" ]; then
  taskset -c "$HOG_CORE" .venv/bin/python -c 'while True: pass' &
  hog_pid=$!
  trap 'kill "$hog_pid" 2>/dev/null || true' EXIT
fi

for k in $(seq 1 "$RUNS"); do
  dir="$OUT/run-$k"
  rm -rf "$dir" && mkdir -p "$dir/reports"
  start=$(date +%s)
  set +e
  NEWSREC_FAULT_REPORT_DIR="$dir/reports" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/faults --junitxml="$dir/junit.xml" >"$dir/pytest.log" 2>&1
  rc=$?
  set -e
  echo "$rc $(( $(date +%s) - start ))" >"$dir/rc"
  echo "run $k: exit $rc in $(( $(date +%s) - start )) s: $(tail -1 "$dir/pytest.log")"
done

.venv/bin/python - "$OUT" "$RUNS" "$HOG_CORE" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, runs, hog = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = []
for k in range(1, runs + 1):
    d = out / f"run-{k}"
    rc, secs = (int(x) for x in (d / "rc").read_text().split())
    suite = ET.parse(d / "junit.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    failed = [c.get("classname") + "::" + c.get("name") for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    xfailed = [c.get("classname") + "::" + c.get("name") for c in cases
               if (s := c.find("skipped")) is not None and s.get("type") == "pytest.xfail"]
    rows.append({"run": k, "exit": rc, "seconds": secs, "tests": len(cases),
                 "failed": failed, "xfailed": xfailed})
summary = {"runs": rows, "hog_core": hog or None,
           "failures": sum(len(r["failed"]) for r in rows)}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'run':>3} {'exit':>4} {'s':>5} {'tests':>5} {'failed':>6} {'xfailed':>7}")
for r in rows:
    print(f"{r['run']:>3} {r['exit']:>4} {r['seconds']:>5} {r['tests']:>5} "
          f"{len(r['failed']):>6} {len(r['xfailed']):>7}")
for r in rows:
    for name in r["failed"]:
        print(f"run {r['run']} failed: {name}")
PY
