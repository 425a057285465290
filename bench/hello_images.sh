# HelloBench's images (sourced by bench/hello.sh and bench/registry.sh): what
# each runs, the line that says it is ready, how tables show it, and the
# plain way to start it (gzip layers from nginx, tar, crun) to compare with.

# What each image runs, and the line that says it is ready.
declare -A command=(
  [base]="echo ready"
  [perl]="perl -e 'print qq(ready\\n)'"
  [ruby]="ruby -e 'puts :ready'"
  [golang]="/usr/lib/go-1.19/bin/go version"
  [git]="git --version"
  # As PID 1 it must handle SIGTERM itself to stop when told.
  [python]="exec python3 -u -c 'import runpy, signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); sys.argv = [\"http.server\", \"18765\", \"--bind\", \"127.0.0.1\"]; runpy.run_module(\"http.server\", run_name=\"__main__\")'"
)
declare -A ready=(
  [base]="^ready"
  [perl]="^ready"
  [ruby]="^ready"
  [golang]="^go version"
  [git]="^git version"
  [python]="^Serving HTTP"
)
# How the table shows a command, where the command itself is too long.
declare -A shown=(
  [python]="python3 -m http.server 18765 (with a SIGTERM handler: it is PID 1)"
)
declare -A kind=(
  [base]="shell echo"
  [perl]="perl"
  [ruby]="ruby"
  [golang]="compiled (Go)"
  [git]="compiled (C)"
  [python]="server (python http.server)"
)

# The plain way: a crun bundle per image (config from `crun spec`, with the
# image's environment and working directory), its rootfs unpacked each run.
plain_start() { # image
  local image=$1 bundle=$work/plain-$1
  rm -rf "$bundle/rootfs" "$bundle/blobs"
  mkdir -p "$bundle/rootfs" "$bundle/blobs"
  layer_paths "$image" | xargs -P3 -I{} sh -c 'curl -sf -o "$1/$(basename "$2")" "$3/$2"' _ "$bundle/blobs" {} "$layers"
  for layer in $(layer_paths "$image"); do
    tar -xzf "$bundle/blobs/$(basename "$layer")" -C "$bundle/rootfs"
  done
  # As skiff does on a host with hybrid cgroups (see skiff-runtime).
  exec unshare --mount --propagation private -- sh -c 'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec "$@"' crun \
    crun --root "$work/crun" run --bundle "$bundle" "plain-$image"
}
# One per image in $images; call after wan_up (plain_start reads $layers).
plain_bundles() {
export -f plain_start layer_paths
export work layers images_dir
for image in "${images[@]}"; do
  bundle=$work/plain-$image
  mkdir -p "$bundle"
  config=$(jq -r '.manifests[0].digest' "$images_dir/$image/index.json" | sed 's/sha256://')
  config=$(jq -r '.config.digest' "$images_dir/$image/blobs/sha256/$config" | sed 's/sha256://')
  env=$(jq -c '.config.Env // ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]' "$images_dir/$image/blobs/sha256/$config")
  (cd "$bundle" && crun spec)
  jq --arg cmd "${command[$image]}" --argjson env "$env" --arg root "$bundle/rootfs" '
    .root = {path: $root, readonly: false} | .process.terminal = false |
    .process.args = ["sh", "-c", $cmd] | .process.env = $env |
    .linux.namespaces |= map(select(.type != "network"))' "$bundle/config.json" > "$bundle/c.json"
  mv "$bundle/c.json" "$bundle/config.json"
done
}

# An empty cache, once the mount daemons of earlier runs (which may still be
# landing a prefetch batch) have exited.
fresh_cache() {
  while pgrep -f -- "--run-dir $work/run" >/dev/null; do sleep 0.05; done
  rm -rf "$work/cache"
}
