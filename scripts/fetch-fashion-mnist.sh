#!/usr/bin/env bash
# Make sure the four Fashion-MNIST IDX files are in $1 (default: where Debian puts them).
set -euo pipefail
dir=${1:-/usr/share/datasets/fashion-mnist}
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
have() { for f in "${files[@]}"; do [ -s "$dir/$f" ] || return 1; done; }
have && exit 0
if [ "$dir" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "Fashion-MNIST not found: installing Debian package dataset-fashion-mnist"
  $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
  have && exit 0
fi
echo "Fashion-MNIST files missing in $dir: put ${files[*]} there" \
  "(e.g. from the Debian package dataset-fashion-mnist) or run: make demo DEMO_DATA=/your/folder" >&2
exit 1
