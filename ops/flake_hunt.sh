#!/usr/bin/env bash
# Flake hunt (issue 11): the whole suite three times in a row in a fresh clone of the committed
# HEAD, while a CPU hog keeps one core busy. Prints each run's exit code and wall time.
# Usage: ops/flake_hunt.sh [runs, default 3]
set -u
runs=${1:-3}
top=$(git rev-parse --show-toplevel)
dir=$(mktemp -d -t flake-hunt.XXXXXX)
git clone -q "$top" "$dir/repo"
cd "$dir/repo"
echo "flake hunt: $(git rev-parse --short HEAD) in $dir/repo, $runs runs, one core busy"
nice -n -5 python3 -c 'while True: pass' &
hog=$!
trap 'kill $hog 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$runs"); do
    start=$(date +%s)
    make test > "$dir/run$i.log" 2>&1
    rc=$?
    echo "run $i: exit $rc after $(( $(date +%s) - start )) s; $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$dir/run$i.log" | tail -1)"
    [ $rc -eq 0 ] || failed=1
done
exit $failed
