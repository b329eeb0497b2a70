"""The emoji benchmark's assets and tower (not part of the installed package).

:mod:`emoji.data` reads the real system assets (Noto colour emoji, Unicode emoji-test.txt, CLDR
annotations, the MiniLM wheel) into a collection; :mod:`emoji.clip` trains the LiT-style emoji CLIP
(MiniLM text tower locked) and registers its pretrained tag. ``bench/emoji_bench.py`` and
``tests/test_emoji.py`` put ``bench/`` on ``sys.path`` and import them as ``emoji.data`` /
``emoji.clip``; ``bash bench/emoji/setup.sh`` installs the assets.
"""
