#!/usr/bin/env bash
# Run every bench at a size that fits a few minutes each, writing its table to
# bench/figures/NAME.txt and its figures to bench/figures/NAME*.png (bench/README.md
# shows them). As root for the benches that drop caches and set up zram.
#   bash bench/figures.sh [NAME...]      (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/figures
mkdir -p "$out"
declare -A ARGS=(
    [stores]="--mib 32 --budget-mib 8 --ops 2000"
    [anon]="--mib 256 --budget-mib 64 --ops 5000 --resync-mib 128 --resync-budget-mib 32"
    [mmap_bench]="--mib 64 --random-reads 5000"
    [coherence]="--commits 300 --locks 300"
    [server]="--seconds 1"
    [load]="--clients 16 --seconds 10"
    [loop_floor]="--requests 5000"
    [redis_clients]="--gets 5000"
    [redis_big_commit]="--mib 256"
    [sqlite_bench]="--rows 20000 --reads 5000"
)
names=("$@")
((${#names[@]})) || names=(stores anon mmap_bench coherence server load loop_floor redis_clients redis_big_commit sqlite_bench)
for name in "${names[@]}"; do
    echo "== bench/$name.py ${ARGS[$name]}" >&2
    # shellcheck disable=SC2086 # the arguments are words
    .venv/bin/python "bench/$name.py" ${ARGS[$name]} --png "$out/$name.png" | tee "$out/$name.txt"
done
