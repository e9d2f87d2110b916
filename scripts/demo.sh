#!/usr/bin/env bash
# The blobstore demo on the embedded default (a file:// store, no servers):
# node 1 pushes a model directory and pulls it back through its cache; then
# nodes 2 and 3 pull the same ref from node 1's peer daemon instead of the
# object store. Prints bytes per tier for every pull. The workspace (~2.3 GiB
# at the default 256 MiB) is removed at the end unless DEMO_KEEP=1 or DEMO_DIR is set.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
B=.venv/bin/blobstore
WORK=${DEMO_DIR:-$(mktemp -d /tmp/blobstore-demo.XXXXXX)}
SIZE_MIB=${DEMO_MIB:-256}
export BLOBSTORE_STORE="file://$WORK/store" BLOBSTORE_PEERS=none
tiers() { .venv/bin/python scripts/demo.py describe; }

echo "== workspace: $WORK (store: $BLOBSTORE_STORE)"
.venv/bin/python scripts/demo.py "$WORK/src" "$SIZE_MIB"

echo "== node1: push the app's /data"
$B push "$WORK/src/llama-chat" apps/llama-chat/data --cache "$WORK/node1/cache"
echo "== node1: push again (nothing new to upload)"
$B push "$WORK/src/llama-chat" apps/llama-chat/data --cache "$WORK/node1/cache" --json | tiers

echo "== node1: first runner pulls (cold cache: object store)"
$B pull apps/llama-chat/data "$WORK/node1/runner1" --cache "$WORK/node1/cache" --json | tiers
echo "== node1: second runner pulls (warm cache: local)"
$B pull apps/llama-chat/data "$WORK/node1/runner2" --cache "$WORK/node1/cache" --json | tiers
diff -r "$WORK/src/llama-chat" "$WORK/node1/runner2" && echo "  byte-identical"

if $B daemon --help >/dev/null 2>&1; then
  free_port() { .venv/bin/python -c 'import random, socket
while True:
    p = random.randrange(20000, 32000)  # below the ephemeral range
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass'; }
  DAEMONS=()
  trap 'kill "${DAEMONS[@]}" 2>/dev/null || true' EXIT
  start_daemon() {  # NODE -> prints its peer address
    local port http; port=$(free_port); http=$(free_port)
    $B daemon --listen "127.0.0.1:$port" --http "127.0.0.1:$http" --cache "$WORK/$1/cache" \
       --peers none >"$WORK/$1/daemon.log" 2>&1 &
    DAEMONS+=($!)
    for _ in $(seq 50); do curl -fs "http://127.0.0.1:$http/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    PEER="127.0.0.1:$port"
  }
  start_daemon node1; P1=$PEER
  echo "== node1: peer daemon on $P1"
  echo "== node2: runner pulls (cold local cache: from node1's daemon)"
  $B pull apps/llama-chat/data "$WORK/node2/runner1" --cache "$WORK/node2/cache" \
     --peers "$P1" --json | tiers
  start_daemon node2; P2=$PEER
  echo "== node2: peer daemon on $P2"
  echo "== node3: runner pulls (cold local cache: from node1 and node2 in parallel)"
  $B pull apps/llama-chat/data "$WORK/node3/runner1" --cache "$WORK/node3/cache" \
     --peers "$P1,$P2" --json | tiers
  diff -r "$WORK/src/llama-chat" "$WORK/node3/runner1" && echo "  byte-identical"
  kill -TERM "${DAEMONS[@]}"; wait "${DAEMONS[@]}" || true
  trap - EXIT
fi
echo "== refs in the store"
$B ls
if [ -z "${DEMO_DIR:-}${DEMO_KEEP:-}" ]; then
  rm -rf "$WORK"
  echo "demo done (workspace removed; DEMO_KEEP=1 keeps it)"
else
  echo "demo done: $WORK"
fi
