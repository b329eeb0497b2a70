"""Image uploads (multipart ``file`` plus form fields): read within the limits, opened from the header
alone, decoded within a pixel budget shared by every upload of an app.

The header's width x height is checked before anything is decoded (413 beyond ``max_image_pixels``);
a JPEG decodes at a reduced scale (``draft``) when it is larger than the encoder needs; all uploads
decoding at once share a budget of ``max_pixels_in_flight`` pixels (:class:`PixelBudget`: a request
waits for its share), so a burst of tiny files that decode to huge images cannot take the server's
memory.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from asymvlm.errors import InputError
from asymvlm.serve.config import ServeConfig
from asymvlm.serve.handlers import ApiError

__all__ = [
    "PixelBudget",
    "UPLOAD_SIDE",
    "read_upload",
    "open_image",
    "decode_image",
    "form_int",
    "form_float",
    "no_unknown",
    "upload_schema",
]

# Uploads larger than this on their shorter side are decoded (JPEG's draft) or reduced (an integer
# box filter) towards it before the encoder sees them: encoders resize to 224-512 pixels a side.
UPLOAD_SIDE = 512
ASCII_INT = re.compile(r"[0-9]{1,9}")  # a form integer: ASCII digits only (int() also takes "3_0", "٣")


class PixelBudget:
    """At most ``capacity`` pixels decoded at once, shared by every upload handler of an app.

    ``async with budget.hold(n):`` waits until ``n`` pixels fit beside those held (first come, first
    served among those that fit), holds them for the block, then gives them back. ``in_use`` is
    what is held now, ``peak`` the most ever held.

    Example:
        >>> async def two():
        ...     budget = PixelBudget(10)
        ...     async with budget.hold(6):
        ...         inside = budget.in_use
        ...     return inside, budget.in_use, budget.peak
        >>> asyncio.run(two())
        (6, 0, 6)
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.in_use = 0
        self.peak = 0
        self._cond: asyncio.Condition | None = None
        self._loop: Any = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._cond is None or self._loop is not loop:  # an app may run in several loops (tests)
            self._cond, self._loop = asyncio.Condition(), loop
        return self._cond

    @asynccontextmanager
    async def hold(self, pixels: int):
        if pixels > self.capacity:
            raise InputError(f"{pixels} pixels are over the budget of {self.capacity}")
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.in_use + pixels <= self.capacity)
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            async with cond:
                self.in_use -= pixels
                cond.notify_all()


async def read_upload(request: Request, config: ServeConfig, budget: PixelBudget) -> tuple[Any, dict[str, str]]:
    """The uploaded image (multipart field ``file``), decoded within the pixel budget, and the other
    form fields."""
    if request.app.state.service.model.encoder is None:
        raise ApiError(422, "file", "file: this model has no image encoder; send embeddings")
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(415, "file", "send the image as multipart/form-data with a field named file")
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=config.max_upload_bytes)
    except StarletteHTTPException as err:
        raise ApiError(err.status_code if err.status_code < 500 else 400, "file", str(err.detail)) from err
    except Exception as err:  # noqa: BLE001 - a malformed multipart body is the client's error
        raise ApiError(400, "file", f"malformed multipart body: {type(err).__name__}") from err
    upload = form.get("file")
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "file", "file: missing (a multipart file field named file)")
    data = await upload.read()
    await form.close()
    if not data:
        raise ApiError(422, "file", "file: empty upload")
    from starlette.concurrency import run_in_threadpool

    image, pixels = await run_in_threadpool(open_image, data, config.max_image_pixels)  # the header only
    async with budget.hold(pixels):  # decoded pixels in flight, over all uploads
        return await run_in_threadpool(decode_image, image), fields


def form_int(fields: dict[str, str], name: str, default: int) -> int:
    raw = fields.get(name)
    if raw is None:
        return default
    if not ASCII_INT.fullmatch(raw.strip(" \t")):
        raise ApiError(422, name, f"{name}: not an integer (ASCII digits, at most 9): {raw[:40]!r}")
    return int(raw.strip(" \t"))


def form_float(fields: dict[str, str], name: str) -> float | None:
    raw = fields.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError as err:
        raise ApiError(422, name, f"{name}: not a number: {raw[:40]!r}") from err
    if not math.isfinite(value):
        raise ApiError(422, name, f"{name}: must be finite")
    return value


def no_unknown(fields: dict[str, str], known: set[str]) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ApiError(422, unknown[0], f"{unknown[0]}: unknown form field (known: file, {', '.join(sorted(known))})")


def upload_schema(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}, **fields},
                    }
                }
            },
        }
    }


def open_image(data: bytes, max_pixels: int) -> tuple[Any, int]:
    """``(the opened image, the pixels it will decode to)`` from its header alone — nothing is decoded
    yet; a 413/415 naming the field ``file``. A JPEG larger than the encoder needs is set to decode
    at a reduced scale (``draft``: 1/2, 1/4 or 1/8, its shorter side kept >= :data:`UPLOAD_SIDE`)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if im.format == "JPEG" and min(w, h) > UPLOAD_SIDE:
                scale = UPLOAD_SIDE / min(w, h)
                im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            dw, dh = im.size  # what will be decoded
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ApiError(413, "file", f"file: too many pixels for this server ({err})") from err
    except UnidentifiedImageError as err:
        raise ApiError(415, "file", f"file: not an image this server can read ({type(err).__name__})") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # a corrupt header
        raise ApiError(415, "file", f"file: corrupt or truncated image ({type(err).__name__})") from err
    if dw * dh > max_pixels:
        raise ApiError(
            413, "file", f"file: {w} x {h} pixels decode to {dw * dh}, over the limit of {max_pixels} pixels "
            "(max_image_pixels); send a smaller image",
        )  # fmt: skip
    return im, max(1, dw * dh)


def decode_image(im: Any) -> Any:
    """Decode an image opened by :func:`open_image`: RGB, reduced by an integer factor (a box filter)
    when its shorter side is over twice :data:`UPLOAD_SIDE`; a 415 naming ``file`` if corrupt."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            factor = min(im.size) // UPLOAD_SIDE
            if factor >= 2:
                if im.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
                    im = im.convert("L" if im.mode == "1" else "RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
                im = im.reduce(factor)
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning) as err:
        raise ApiError(415, "file", f"file: corrupt or truncated image ({type(err).__name__})") from err
