#!/usr/bin/env bash
# Instructions per alloc+free pair, for kmem and each peer, under callgrind.
#
# Runs target/release/kmem-pair (order-0 pages) or target/release/kmem-kmalloc-pair (kmalloc
# and cache pairs) with K and 2K pairs per allocator; (Ir(2K) - Ir(K)) / K is the cost of one
# pair with boot, warm-up and exit cancelled out. Usage, from the workspace:
#
#   cargo build --release -p kmem-bench
#   bash crates/kmem-bench/callgrind-pairs.sh [K] [allocator...]                # order-0 pages
#   bash crates/kmem-bench/callgrind-pairs.sh --kmalloc 64 [K] [allocator...]   # kmalloc(64)+kfree
#   bash crates/kmem-bench/callgrind-pairs.sh --cache 256 [K] [allocator...]    # kmem_cache pair
#
# Order-0 pages: allocators default to kmem buddy buddy-pow2 jemalloc mimalloc system guards
# (K defaults to 200000; buddy-pow2, about 6 400 instructions a pair, uses K/10).
# --kmalloc SIZE: kmem's kmalloc(SIZE, GFP_KERNEL)+kfree against jemalloc, mimalloc and system
# through GlobalAlloc (Layout::from_size_align(SIZE, 8)); target: kmem's kmalloc(64)+kfree at
# most 40 instructions.
# --cache SIZE: kmem_cache_alloc+free of a SIZE-byte cache against slabmalloc's SCAllocator
# and the GlobalAlloc peers.
# --kmalloc-const SIZE / --cache-const SIZE: the same with SIZE (16, 64, 256 or 1024) a
# compile-time constant in the pair loop, as in a kernel's kmalloc(sizeof(*p)).
set -euo pipefail
MODE=()
WHAT=order-0
KMALLOC_TARGET=40
case "${1:-}" in
    --kmalloc | --cache)
        [ $# -ge 2 ] || { echo "usage: $0 $1 SIZE [K] [allocator...]" >&2; exit 2; }
        MODE=("$1" "$2")
        WHAT="${1#--}($2)"
        shift 2
        ;;
    --kmalloc-const | --cache-const)
        [ $# -ge 2 ] || { echo "usage: $0 $1 SIZE [K] [allocator...]" >&2; exit 2; }
        MODE=("${1%-const}" "$2" --const-size)
        WHAT="${1#--}($2)"
        shift 2
        ;;
esac
K=${1:-200000}
shift || true
ALLOCS=("$@")
if [ ${#ALLOCS[@]} -eq 0 ]; then
    case "${MODE[0]:-}" in
        --kmalloc) ALLOCS=(kmem jemalloc mimalloc system) ;;
        --cache) ALLOCS=(kmem slabmalloc jemalloc mimalloc system) ;;
        *) ALLOCS=(kmem buddy buddy-pow2 jemalloc mimalloc system guards) ;;
    esac
fi
if [ ${#MODE[@]} -gt 0 ]; then
    BIN=${KMEM_KMALLOC_PAIR:-target/release/kmem-kmalloc-pair}
else
    BIN=${KMEM_PAIR:-target/release/kmem-pair}
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
total() { callgrind_annotate "$1" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }
printf '%-12s %14s   (%s pairs)\n' allocator 'Ir per pair' "$WHAT"
for a in "${ALLOCS[@]}"; do
    k=$K
    [ "$a" = buddy-pow2 ] && k=$((K / 10))
    if [ "$a" = guards ]; then args=(--guards); else args=(--peer "$a" "${MODE[@]}"); fi
    valgrind --tool=callgrind --callgrind-out-file="$OUT/$a.1" "$BIN" "$k" "${args[@]}" 2>/dev/null
    valgrind --tool=callgrind --callgrind-out-file="$OUT/$a.2" "$BIN" $((2 * k)) "${args[@]}" 2>/dev/null
    per=$(awk -v x="$(total "$OUT/$a.1")" -v y="$(total "$OUT/$a.2")" -v k="$k" \
        'BEGIN { printf "%.1f", (y - x) / k }')
    printf '%-12s %14s\n' "$a" "$per"
    if [ "$a" = kmem ] && { [ "$WHAT" = "kmalloc(64)" ] || [ "$WHAT" = "kmalloc-const(64)" ]; }; then
        verdict=$(awk -v p="$per" -v t="$KMALLOC_TARGET" 'BEGIN { print (p <= t) ? "met" : "NOT MET" }')
        TARGET_LINE="target: kmem $WHAT+kfree at most $KMALLOC_TARGET instructions (measured $per): $verdict"
    fi
done
[ -z "${TARGET_LINE:-}" ] || echo "$TARGET_LINE"
