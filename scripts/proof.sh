#!/usr/bin/env bash
# `make proof`: the full version of every proof suite, one after another, each one's output
# kept in proof/<suite>.log, then one summary: per suite its verdict and its own summary line
# (determinism streams matched, hostile inputs and crashes, kill points and invariant
# violations). Exit status 1 when any suite failed. docs/proof.md explains each suite.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p proof
status=0
declare -A verdict
for suite in determinism hostile faults; do
  echo "== proof-$suite (log: proof/$suite.log)"
  start=$(date +%s)
  if make --no-print-directory "proof-$suite" >"proof/$suite.log" 2>&1; then
    verdict[$suite]="passed"
  else
    verdict[$suite]="FAILED"
    status=1
  fi
  verdict[$suite]+=" in $(( $(date +%s) - start )) s"
  echo "   ${verdict[$suite]}"
done
echo
echo "== proof summary"
for suite in determinism hostile faults; do
  echo "$suite: ${verdict[$suite]}"
  grep -hE '^(PASS|FAIL): same replica|^hostile-input suite:|^fault suite:|^fault machine:|passed|failed' \
    "proof/$suite.log" | sed 's/^/  /' | cut -c1-400
done
exit $status
