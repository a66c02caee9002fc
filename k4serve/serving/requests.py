"""Request values as they arrive over the wire -> checked Python values; every refusal names what is allowed."""

from __future__ import annotations

from dataclasses import dataclass

from k4serve.pipelines.t2v import SUPPORTED_SIZES, RequestError, resolve_seed, validate_request

# validate_request checks a whole request; a stage that sees only part of it fills the rest with a value
# known to pass, so each check lives in one place (the pipeline).
_VALID_PROMPT = "-"
_VALID_SIZE = SUPPORTED_SIZES[0]


def decode_prompt(raw: bytes | str) -> str:
    """A BYTES element -> the prompt text; it must be UTF-8 and pass the pipeline's prompt rules."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(
                f"PROMPT must be UTF-8 text: byte {raw[error.start]:#04x} at position {error.start} is not valid "
                "UTF-8 (send the prompt encoded as UTF-8)"
            ) from None
    validate_request(raw, *_VALID_SIZE, 0)
    return raw


@dataclass(frozen=True)
class VideoShape:
    """What a sampler request asks for besides the prompt."""

    height: int
    width: int
    seconds: int
    seed: int

    @classmethod
    def checked(cls, height: int, width: int, seconds: int, seed: int | None) -> VideoShape:
        """Validate size, duration and seed (drawing a seed if absent)."""
        shape = cls(height, width, seconds, resolve_seed(seed))
        validate_request(_VALID_PROMPT, height, width, seconds, shape.seed)
        return shape
