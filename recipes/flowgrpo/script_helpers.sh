# shellcheck shell=bash
# Helpers of the GPU run scripts (sourced, not run): ROOT, die, hydra_str, abspath.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() {
  echo "error: $*" >&2
  exit 2
}

# Hydra parses override values: quote them so paths with spaces, commas or '=' survive.
hydra_str() {
  printf "'%s'" "${1//\'/\\\'}"
}

# The scripts change to the repo root, so relative paths are made absolute first.
abspath() {
  if [[ -d "$1" ]]; then (cd "$1" && pwd); else echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; fi
}
