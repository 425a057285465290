# Helpers shared by the benchmark scripts (sourced).

# A TCP port on 127.0.0.1 that is free right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

now() { echo "$EPOCHREALTIME"; }
# Lazily unmounts everything mounted under DIR, deepest first (for cleanups).
unmount_under() { for m in $(grep -o " $1[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done; }
since() { awk -v s="$1" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.4f", e - s }'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
wait_http() { for _ in $(seq 200); do curl -sf "$1" >/dev/null && return; sleep 0.05; done; echo "$1 never answered" >&2; exit 1; }
# A write token for a bench server that is only read: writes need one, and
# nothing else ever holds it. Prints the file's path (under $work).
write_token() { head -c 24 /dev/urandom | base64 >"$work/write-token" && chmod 600 "$work/write-token" && echo "$work/write-token"; }

# The emulated wide-area link. The far side is a network namespace behind a
# veth pair shaped to $rate by `tc tbf` both ways (netem is not in these
# kernels); bench's delay-proxy on this side adds $one_way_ms each way (and
# a round trip per connection). Over it: `skiff serve` of STORE and nginx
# serving the OCI layouts of $images_dir. Sets $wan (skiff) and $layers
# (nginx); uses $work, $ns, $rate, $one_way_ms, $SKIFF, $DELAY_PROXY and
# appends to $pids; ${images[0]} must be in $images_dir. `wan_down` removes it.
wan_up() { # store
  echo "building the emulated link: $rate, ${one_way_ms} ms each way..."
  ip netns add "$ns"
  ip link add skb0 type veth peer name skb1
  ip link set skb1 netns "$ns"
  ip addr add 10.78.0.1/24 dev skb0
  ip link set skb0 up
  ip netns exec "$ns" ip addr add 10.78.0.2/24 dev skb1
  ip netns exec "$ns" ip link set skb1 up
  ip netns exec "$ns" ip link set lo up
  tc qdisc add dev skb0 root tbf rate "$rate" burst 64kb latency 100ms
  ip netns exec "$ns" tc qdisc add dev skb1 root tbf rate "$rate" burst 64kb latency 100ms

  ip netns exec "$ns" "$SKIFF" --store "$1" serve --listen 10.78.0.2:7070 --token-file "$(write_token)" 2>"$work/serve-wan.log" &
  pids+=($!)
  cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  server {
    listen 10.78.0.2:8080;
    root $images_dir;
  }
}
CONF
  ip netns exec "$ns" nginx -c "$work/nginx.conf"
  local skiff_proxy nginx_proxy
  skiff_proxy=$(free_port); nginx_proxy=$(free_port)
  "$DELAY_PROXY" "127.0.0.1:$skiff_proxy" 10.78.0.2:7070 "$one_way_ms" 2>/dev/null &
  pids+=($!)
  "$DELAY_PROXY" "127.0.0.1:$nginx_proxy" 10.78.0.2:8080 "$one_way_ms" 2>/dev/null &
  pids+=($!)
  wan=http://127.0.0.1:$skiff_proxy
  layers=http://127.0.0.1:$nginx_proxy
  wait_http "$wan/healthz"
  wait_http "$layers/${images[0]}/index.json"
}

wan_down() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del skb0 2>/dev/null || true
}

# Bytes received over the link so far.
rx() { cat /sys/class/net/skb0/statistics/rx_bytes; }

layer_paths() { # image: blob paths of its layers (relative to $images_dir), in order
  local dir=$images_dir/$1
  local manifest
  manifest=$(jq -r '.manifests[0].digest' "$dir/index.json" | sed 's/sha256://')
  jq -r '.layers[].digest' "$dir/blobs/sha256/$manifest" | sed "s|sha256:|$1/blobs/sha256/|"
}

# Debian's docker-registry on the far side of the link (after wan_up):
# pushed to straight over the veth at 10.78.0.2:5000 (no delay proxy),
# read through one at $registry (127.0.0.1:PORT). Appends to $pids.
registry_up() {
  cat > "$work/registry.yml" <<YAML
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $work/registry }, delete: { enabled: true } }
http: { addr: 10.78.0.2:5000 }
YAML
  ip netns exec "$ns" docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
  pids+=($!)
  wait_http http://10.78.0.2:5000/v2/
  registry_proxy=$(free_port)
  "$DELAY_PROXY" "127.0.0.1:$registry_proxy" 10.78.0.2:5000 "$one_way_ms" 2>/dev/null &
  pids+=($!)
  registry=127.0.0.1:$registry_proxy
  wait_http "http://$registry/v2/"
}
