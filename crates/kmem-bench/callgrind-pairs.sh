#!/usr/bin/env bash
# Instructions per order-0 alloc+free pair, for kmem and each peer, under callgrind.
#
# Runs target/release/kmem-pair with K and 2K pairs per allocator; (Ir(2K) - Ir(K)) / K is
# the cost of one pair with boot, warm-up and exit cancelled out. Usage, from the workspace:
#
#   cargo build --release -p kmem-bench
#   bash crates/kmem-bench/callgrind-pairs.sh [K] [allocator...]
#
# K defaults to 200000 (buddy-pow2, about 6 400 instructions a pair, uses K/10).
set -euo pipefail
K=${1:-200000}
shift || true
ALLOCS=("$@")
[ ${#ALLOCS[@]} -gt 0 ] || ALLOCS=(kmem buddy buddy-pow2 jemalloc mimalloc system guards)
BIN=${KMEM_PAIR:-target/release/kmem-pair}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
total() { callgrind_annotate "$1" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }
printf '%-12s %14s\n' allocator 'Ir per pair'
for a in "${ALLOCS[@]}"; do
    k=$K
    [ "$a" = buddy-pow2 ] && k=$((K / 10))
    if [ "$a" = guards ]; then args=(--guards); else args=(--peer "$a"); fi
    valgrind --tool=callgrind --callgrind-out-file="$OUT/$a.1" "$BIN" "$k" "${args[@]}" 2>/dev/null
    valgrind --tool=callgrind --callgrind-out-file="$OUT/$a.2" "$BIN" $((2 * k)) "${args[@]}" 2>/dev/null
    awk -v a="$a" -v x="$(total "$OUT/$a.1")" -v y="$(total "$OUT/$a.2")" -v k="$k" \
        'BEGIN { printf "%-12s %14.1f\n", a, (y - x) / k }'
done
