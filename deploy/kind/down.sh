#!/usr/bin/env bash
# Removes the kind cluster made by up.sh, and the pins its agents left on the
# host's bpf filesystem (kind nodes share it).
set -euo pipefail
CLUSTER=${MESHCAP_KIND_CLUSTER:-meshcap}

if ! command -v kind >/dev/null 2>&1; then
  echo "down.sh: kind is not installed; nothing to remove" >&2
  exit 1
fi
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind delete cluster --name "$CLUSTER"
else
  echo "down.sh: no kind cluster named $CLUSTER"
fi
# Pins keep capture alive after their agent is gone; with the cluster gone
# they only hold kernel memory. Removing a pin detaches its link.
shopt -s nullglob
pins=(/sys/fs/bpf/meshcap-"$CLUSTER"-*)
if ((${#pins[@]})); then
  if [ "$(id -u)" -eq 0 ]; then
    rm -r -- "${pins[@]}"
  else
    echo "down.sh: run as root to remove ${pins[*]}" >&2
  fi
fi
