#!/usr/bin/env bash
# Create one virtualenv per peer SAE library for the side-by-side training-step benchmark (benchmarks/peers/run.py).
#
#   bash benchmarks/peers/setup_venv.sh                   # all peers
#   PEERS="saelens sparsify" bash benchmarks/peers/setup_venv.sh
#
# Venvs live under ${FEATUREKIT_BENCH_PEERS_DIR:-${XDG_CACHE_HOME:-~/.cache}/featurekit/bench-peers}/<peer>.
# torch==2.13.0 is installed FIRST in each venv and every later install runs with a constraint file pinning it,
# so no other torch (or CUDA wheels) is ever pulled. Known pitfalls (see shared research notes, perf-baseline-cpu §2):
#   * PyPI `sparsify` is an unrelated Neural Magic package: EleutherAI's is `eai-sparsify`.
#   * dictionary-learning's deps pull a CUDA torchvision whose import fails against CPU torch
#     ("operator torchvision::nms does not exist") and breaks transformers' model imports: it is uninstalled.
#   * overcomplete requires torchvision/timm/opencv: installed --no-deps plus the deps it imports
#     (matplotlib<3.9: it calls plt.cm.get_cmap at import); its driver injects a torchvision stub module.
# A peer whose install fails is reported and skipped; the benchmark skips it too. Safe to re-run (stamp files).
set -u
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
BASE="${FEATUREKIT_BENCH_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/featurekit/bench-peers}"
PEERS="${PEERS:-saelens sparsify dictionary_learning overcomplete}"
mkdir -p "$BASE"
CONSTRAINTS="$BASE/constraints.txt"
echo "$TORCH" > "$CONSTRAINTS"

install_peer() {
    local peer="$1" venv="$BASE/$1"
    local pip="$venv/bin/python -m pip install -q -c $CONSTRAINTS"
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install -q "$TORCH" || return 1
    case "$peer" in
        saelens) $pip sae-lens psutil || return 1 ;;
        sparsify) $pip eai-sparsify psutil || return 1 ;;
        dictionary_learning)
            $pip dictionary-learning psutil || return 1
            "$venv/bin/python" -m pip uninstall -q -y torchvision || true ;;
        overcomplete)
            $pip --no-deps overcomplete || return 1
            $pip einops scipy scikit-learn "matplotlib<3.9" tqdm opencv-python-headless scikit-image psutil || return 1 ;;
        *) echo "unknown peer $peer" >&2; return 1 ;;
    esac
    "$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
}

status=0
for peer in $PEERS; do
    if [ -f "$BASE/$peer/.installed" ]; then echo "[setup] $peer: already installed ($BASE/$peer)"; continue; fi
    echo "[setup] $peer: installing into $BASE/$peer"
    if install_peer "$peer"; then
        touch "$BASE/$peer/.installed"; echo "[setup] $peer: ok"
    else
        echo "[setup] $peer: FAILED (the benchmark will skip it)" >&2; status=1
    fi
done
# A failed peer is not fatal for the benchmark (it is skipped), but the exit status says so.
exit $status
