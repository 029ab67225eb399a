#!/usr/bin/env bash
# Creates (up) or removes (down) the two local pods named in pods.example.yaml:
# a network namespace and a cgroup v2 directory each, joined by a veth pair.
# Run as root. `run POD CMD...` runs a command inside a pod (netns + cgroup).
set -euo pipefail
# mountinfo: optional fields vary in number; the filesystem type follows " - ".
CG=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") { print $5; exit } } }' /proc/self/mountinfo)
[ -n "$CG" ] || { echo "no cgroup2 mount" >&2; exit 1; }
case "${1:-}" in
up)
  ip netns add meshcap-sample-client
  ip netns add meshcap-sample-myapi
  ip link add mcs-client type veth peer name mcs-myapi
  ip link set mcs-client netns meshcap-sample-client
  ip link set mcs-myapi netns meshcap-sample-myapi
  ip -n meshcap-sample-client addr add 10.250.0.2/24 dev mcs-client
  ip -n meshcap-sample-myapi addr add 10.250.0.3/24 dev mcs-myapi
  for p in client myapi; do
    ip -n meshcap-sample-$p link set lo up
    ip -n meshcap-sample-$p link set mcs-$p up
    mkdir -p "$CG/meshcap-sample-$p"
  done
  ;;
run)
  pod=$2; shift 2
  exec nsenter --net=/run/netns/meshcap-sample-$pod sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG/meshcap-sample-$pod" "$@"
  ;;
down)
  for p in client myapi; do
    for pid in $(cat "$CG/meshcap-sample-$p/cgroup.procs" 2>/dev/null); do kill -9 "$pid" || true; done
    for _ in $(seq 50); do
      [ -n "$(cat "$CG/meshcap-sample-$p/cgroup.procs" 2>/dev/null)" ] || break
      sleep 0.1
    done
    rmdir "$CG/meshcap-sample-$p" 2>/dev/null || true
    ip netns del meshcap-sample-$p 2>/dev/null || true
  done
  ;;
*) echo "usage: $0 up|down|run POD CMD..." >&2; exit 2 ;;
esac
