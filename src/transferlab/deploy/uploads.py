"""Image uploads for the service: the request body read into memory under a size limit, its
multipart/form-data `file` fields parsed in memory, and each upload decoded from bytes.

Nothing here touches the filesystem: a client's file name is only a label to echo back, and uploads
never go to a temporary file (Starlette's own form parser spools parts over 1 MB to disk).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import AsyncIterator, BinaryIO, Callable

import anyio
import torch
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from ..data.decode import TooManyPixels, UnreadableImage

FIELD = "file"  # the form field of an image; repeat it for several images (README, serving)
# Parts a form may hold besides its `file` fields; more are refused before they are parsed (a 10 MB
# body of 200,000 tiny parts took 2.8 s to parse).
OTHER_PARTS = 16
RATE_GRACE_S = 5.0  # how long a body may take before its average rate is checked


class UploadError(Exception):
    """Bad input from a client: becomes a 4xx JSON answer with `code`, the message and the file."""

    def __init__(self, status: int, code: str, message: str, file: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.file = status, code, message, file


@dataclass(frozen=True)
class Upload:
    name: str  # the client's file name, a label only
    data: bytes


async def read_body(chunks: AsyncIterator[bytes], limit: int, declared: str | None = None,
                    timeout: float = math.inf, min_rate: float = 0.0,
                    grace: float = RATE_GRACE_S) -> bytearray:
    """The whole body, refused with 413 as soon as it passes `limit` bytes, and with 408 if it has
    not all arrived after `timeout` seconds, or if after `grace` seconds it arrives slower than
    `min_rate` bytes/s on average (a trickling client must not hold its turn for the whole
    timeout). A Content-Length above the limit is refused before reading; a smaller one is not
    trusted, the bytes are counted."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, int(declared))
    # Returned as the bytearray it was read into: a large one grows in place (glibc remaps it), and
    # copying it into bytes held two copies of the body at once.
    body = bytearray()
    started = anyio.current_time()

    def due() -> float:  # the next byte: by the overall deadline or the rate floor, the first
        return started + min(timeout, grace + (len(body) + 1) / min_rate if min_rate else math.inf)

    # One cancel scope whose deadline moves on with each chunk: entering a scope per chunk took
    # longer than the rest of reading a one-image body
    with anyio.CancelScope(deadline=due()) as scope:
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
            scope.deadline = due()
    if scope.cancelled_caught:
        raise _too_slow(body, anyio.current_time() - started, timeout, min_rate)
    return body


def _too_slow(body: bytearray, seconds: float, timeout: float, min_rate: float) -> UploadError:
    if seconds >= timeout:
        return UploadError(408, "body_timeout", f"the body had not all arrived after {timeout:g} s "
                           f"({len(body):,} bytes came): send it faster, or smaller")
    return UploadError(408, "body_timeout", f"the body is arriving at {len(body) / seconds:,.0f} "
                       f"bytes/s, below the {min_rate:,.0f} bytes/s this service needs: send it "
                       "faster, or smaller")


def _too_large(limit: int, size: int | None = None) -> UploadError:
    what = f"{size:,} bytes, larger" if size else "larger"
    return UploadError(413, "too_large", f"the request body is {what} than the limit of {limit:,} "
                       f"bytes ({limit / 2**20:g} MB): send smaller or fewer images per request")


def parse_uploads(body: bytes | bytearray, content_type: str | None, max_files: int) -> list[Upload]:
    """The `file` fields of a multipart/form-data body, in order; other fields are ignored."""
    if not body:
        raise UploadError(400, "empty_body", f"the request body is empty: send the image as a "
                          f"multipart/form-data field named {FIELD!r}")
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1") or "none"
        raise UploadError(415, "not_multipart", f"Content-Type {shown!r}: send multipart/form-data "
                          f"with the image in a field named {FIELD!r} (curl -F {FIELD}=@photo.jpg)")
    if b"boundary" not in options:
        raise UploadError(400, "malformed_multipart", "multipart/form-data without a boundary")
    parts = _FileParts(max_files, max_files + OTHER_PARTS)
    try:
        parser = MultipartParser(options[b"boundary"], parts.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError as error:
        raise UploadError(400, "malformed_multipart", f"the multipart body cannot be parsed ({error})"
                          ) from None
    # python-multipart's finalize() does not check that the body reached its closing boundary: a body
    # cut inside its second file gave the first file alone, answered 200 as if it were all.
    if parser.state != MultipartState.END:
        raise UploadError(400, "malformed_multipart", "the multipart body ends before its closing "
                          "boundary: it was cut short")
    if not parts.uploads:
        raise UploadError(400, "no_file", f"no field named {FIELD!r} in the form: send each image "
                          f"as a field named {FIELD!r}")
    return parts.uploads


class _FileParts:
    """python-multipart callbacks that keep the complete `file` parts in memory."""

    def __init__(self, max_files: int, max_parts: int):
        self.max_files, self.max_parts = max_files, max_parts
        self.uploads: list[Upload] = []
        self.parts = 0
        self._begin()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_part_data": self._part_data, "on_part_end": self._end}

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise UploadError(400, "too_many_parts", f"more than {self.max_parts} parts in one form: "
                              f"send the images as at most {self.max_files} fields named {FIELD!r}")
        self._begin()

    def _begin(self) -> None:
        self._field, self._filename, self._data = "", "", []
        self._header, self._header_value = bytearray(), bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            _, options = parse_options_header(bytes(self._header_value))
            self._field = options.get(b"name", b"").decode("utf-8", "replace")
            self._filename = options.get(b"filename", b"").decode("utf-8", "replace")
            if self._field == FIELD and len(self.uploads) >= self.max_files:
                raise UploadError(400, "too_many_files", f"more than {self.max_files} files in one "
                                  "request: send them in several requests")
        self._header, self._header_value = bytearray(), bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field == FIELD:  # other fields are skipped, not kept
            self._data.append(bytes(memoryview(data)[start:end]))  # one copy; usually the whole file

    def _end(self) -> None:
        if self._field == FIELD:
            name = self._filename or f"upload {len(self.uploads) + 1}"
            self.uploads.append(Upload(name, b"".join(self._data)))


def decode_upload(upload: Upload, decode: Callable[[BinaryIO], torch.Tensor]) -> torch.Tensor:
    """The upload as the model's uint8 CHW input, through `decode` (Predictor.decode: the decoding
    of files on disk, with content sniffing, any mode to RGB, EXIF orientation, pixel limit)."""
    if not upload.data:
        raise UploadError(400, "empty_file", "the file is empty", upload.name)
    try:
        image = decode(io.BytesIO(upload.data))
    except TooManyPixels as error:
        raise UploadError(422, "too_many_pixels", f"refused before decoding: {error}", upload.name
                          ) from None
    except UnreadableImage as error:
        raise UploadError(415, "not_an_image", f"not an image this service reads ({error}); send "
                          "JPEG, PNG, WebP, BMP, GIF or TIFF", upload.name) from None
    return image
