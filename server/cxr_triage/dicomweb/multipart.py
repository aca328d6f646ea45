"""multipart/related bodies (RFC 2387, as STOW-RS uses them) split into parts with python-multipart."""

from dataclasses import dataclass, field

from multipart.exceptions import MultipartParseError
from multipart.multipart import MultipartParser, parse_options_header

from cxr_triage.errors import BadRequest, UnsupportedMediaType


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def related_boundary(content_type: str, expected_type: str = "application/dicom") -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` body.

    Raises:
        UnsupportedMediaType: not multipart/related, or of another root type.
        BadRequest: no boundary.
    """
    media, params = parse_options_header(content_type)
    if media != b"multipart/related":
        raise UnsupportedMediaType(
            f'STOW-RS takes multipart/related; type="{expected_type}", not {media.decode() or "nothing"}'
        )
    kind = params.get(b"type", b"").decode().lower()
    if kind and kind != expected_type:
        raise UnsupportedMediaType(
            f"multipart/related of type {kind!r} is not accepted; send {expected_type}"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/related needs a boundary parameter")
    return boundary


def split(body: bytes, boundary: bytes) -> list[Part]:
    """Every part of the body, headers lower-cased. Raises BadRequest for a malformed body."""
    parts: list[Part] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin() -> None:
        parts.append(Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].chunks.append(data[start:end])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1].headers[header[0].decode("latin-1").lower()] = header[1].decode("latin-1")
        header[0], header[1] = b"", b""

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(
            f"malformed multipart/related body ({type(exc).__name__}); check the boundary"
        ) from exc
    if not parts:
        raise BadRequest("the multipart/related body holds no part")
    return parts
