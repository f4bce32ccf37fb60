#!/usr/bin/env bash
# A newcomer's two commands, each installing what it needs when it is missing:
#   bash run.sh pretrain   # the default run: PART on Fashion-MNIST, 2 CPU cores, about 10 minutes
#   bash run.sh test       # the test suite, as CI runs it (.ci/run)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python3}

if ! $PY -c "import torch, torchvision, timm, safetensors, click, pycocotools, wfdb, pyedflib" 2>/dev/null; then
  echo "installing requirements.txt"
  $PY -m pip install -q -r requirements.txt
fi

fashion_mnist() {  # the default data, Debian's real Fashion-MNIST
  [ -d /usr/share/datasets/fashion-mnist ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 ||
      echo "note: apt-get could not install dataset-fashion-mnist"
  else
    echo "the default data are Debian's: sudo apt-get install dataset-fashion-mnist (or pass --data-dir with the 4 idx.gz files)"
  fi
}

case "${1:-}" in
  pretrain) fashion_mnist; shift; exec $PY train.py pretrain "$@" ;;
  test) fashion_mnist; shift; exec $PY -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh pretrain [flags] | bash run.sh test [pytest flags]" >&2; exit 2 ;;
esac
