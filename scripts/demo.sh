#!/usr/bin/env bash
# The blobstore demo on the embedded default (a file:// store, no servers):
# node 1 pushes a model directory and pulls it back through its cache; then
# nodes 2 and 3 pull the same ref from node 1's peer daemon instead of the
# object store. Prints bytes per tier for every pull.
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
  PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  HTTP=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  echo "== node1: start its peer daemon on 127.0.0.1:$PORT"
  $B daemon --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HTTP" --cache "$WORK/node1/cache" \
     --peers none >"$WORK/node1/daemon.log" 2>&1 &
  DAEMON=$!
  trap 'kill $DAEMON 2>/dev/null || true' EXIT
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$HTTP/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  for node in node2 node3; do
    echo "== $node: runner pulls (cold local cache: from node1's daemon)"
    $B pull apps/llama-chat/data "$WORK/$node/runner1" --cache "$WORK/$node/cache" \
       --peers "127.0.0.1:$PORT" --json | tiers
  done
  kill -TERM $DAEMON; wait $DAEMON || true
  trap - EXIT
fi
echo "== refs in the store"
$B ls
echo "demo done: $WORK"
