"""The limits and behaviour of one served app (``asymvlm-serve --help`` lists them as flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from asymvlm.errors import ConfigError

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """Limits and behaviour of the service (``asymvlm-serve --help`` lists them as flags)."""

    max_k: int = field(default=100, metadata={"help": "Largest k a request may ask for (also capped by the gallery)."})
    max_queries: int = field(default=32, metadata={"help": "Most texts or images in one request."})
    max_query_chars: int = field(default=1000, metadata={"help": "Longest text query, in characters."})
    max_classes: int = field(default=256, metadata={"help": "Most classes in one zero-shot request."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest JSON request body, in bytes."})
    max_upload_bytes: int = field(
        default=8 << 20, metadata={"help": "Largest image upload (multipart body), in bytes."}
    )
    max_image_pixels: int = field(
        default=16_000_000,
        metadata={"help": "Largest upload as decoded (width x height; a large JPEG decodes at a reduced scale)."},
    )
    max_pixels_in_flight: int = field(
        default=64_000_000,
        metadata={"help": "Most pixels decoded at once over all uploads (a request waits for its share)."},
    )
    read_timeout_s: float = field(
        default=30.0, metadata={"help": "Seconds a client may take to send its request body (then 408)."}
    )
    max_batch: int = field(default=64, metadata={"help": "Most queries per model call (1: one request per forward)."})
    max_wait_ms: float = field(
        default=2.0, metadata={"help": "How long a request may wait for others to batch with (only under concurrency)."}
    )
    max_queue: int = field(default=4096, metadata={"help": "Most queued queries; beyond it 503 (back-pressure)."})
    api_key: str | None = field(default=None, metadata={"help": "Require this key on every endpoint but health."})
    cors_origins: tuple[str, ...] = field(default=(), metadata={"help": "Origins allowed by CORS (none: closed)."})

    def __post_init__(self) -> None:
        for name in ("max_k", "max_queries", "max_query_chars", "max_classes", "max_body_bytes", "max_upload_bytes",
                     "max_image_pixels", "max_pixels_in_flight", "max_batch", "max_queue"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms <= 1000):
            raise ConfigError(f"max_wait_ms must be in [0, 1000], got {self.max_wait_ms!r}")
        if self.max_pixels_in_flight < self.max_image_pixels:
            raise ConfigError(
                f"max_pixels_in_flight ({self.max_pixels_in_flight}) must be >= max_image_pixels "
                f"({self.max_image_pixels}): one upload must fit"
            )
        t = self.read_timeout_s
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 3600):
            raise ConfigError(f"read_timeout_s must be in (0, 3600] seconds, got {t!r}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ConfigError("the API key must have at least 16 characters (a shorter one is guessable)")
