"""Review images as reviewers receive them: the same pixels as the stored image, different bytes.

A reviewer's browser loads ``/review-images/{token}`` without a protomed key, so nothing in the
response may let them find the image elsewhere: the stored PNG's SHA-256 is listed by
``GET /batches/{id}`` and its bytes served by ``GET /images/{id}``, and a sampler may have left
text chunks (model, seed) in it. So every review image is decoded and written anew: only the
chunks needed to draw it (IHDR, PLTE, tRNS, IDAT, IEND) survive, and the compressed stream is
cut into IDAT chunks of pseudo-random sizes derived from the task's token. The bytes therefore
differ from the stored object and between review projects (each project gives an image its own
token), yet are stable for one token (browser caches, repeated loads).
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib

from PIL import Image as PILImage

# Chunks a decoder needs to draw the pixels; everything else (tEXt, zTXt, iTXt, tIME, eXIf,
# pHYs, gAMA, iCCP, private chunks...) could carry provenance and is dropped.
KEPT = (b"IHDR", b"PLTE", b"tRNS")
SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pixel layouts written back as they are; anything else (palette, CMYK...) becomes RGB(A),
# which draws the same.
LOSSLESS_MODES = ("1", "L", "LA", "I", "I;16", "RGB", "RGBA")


class NotAnImage(ValueError):
    """The stored object could not be decoded as an image."""


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG, in order."""
    if not png.startswith(SIGNATURE):
        raise NotAnImage("not a PNG")
    out, pos = [], len(SIGNATURE)
    while pos + 8 <= len(png):
        (length,), kind = struct.unpack(">I", png[pos : pos + 4]), png[pos + 4 : pos + 8]
        out.append((kind, png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _decoded(data: bytes) -> PILImage.Image:
    """The stored image's pixels in a fresh image object (no info, no metadata)."""
    try:
        with PILImage.open(io.BytesIO(data)) as opened:
            opened.load()
            im: PILImage.Image = opened
            if im.mode not in LOSSLESS_MODES:
                im = im.convert("RGBA" if "transparency" in im.info or "A" in im.mode else "RGB")
            return PILImage.frombytes(im.mode, im.size, im.tobytes())
    except (OSError, ValueError, SyntaxError) as exc:
        raise NotAnImage(str(exc)) from exc


def blind_png(data: bytes, token: str) -> bytes:
    """``data`` (any image Pillow reads) as a metadata-free PNG whose bytes depend on ``token``:
    the compression level and the IDAT chunk boundaries are drawn from a generator seeded by it.
    """
    rng = random.Random(hashlib.sha256(b"protomed review image\0" + token.encode()).digest())
    buf = io.BytesIO()
    _decoded(data).save(buf, format="PNG", compress_level=rng.randint(1, 9))
    parts = chunks(buf.getvalue())
    stream = b"".join(d for k, d in parts if k == b"IDAT")
    out = [SIGNATURE, *(_chunk(k, d) for k, d in parts if k in KEPT)]
    pieces, pos = [], 0
    while pos < len(stream):
        size = rng.randint(max(1, len(stream) // 8), max(2, len(stream) // 2))
        pieces.append(stream[pos : pos + size])
        pos += size
    blinded = _assemble(out, pieces)
    if len(blinded) == len(data) and len(pieces[-1]) > 1:  # not even the size may match
        half = len(pieces[-1]) // 2
        blinded = _assemble(out, [*pieces[:-1], pieces[-1][:half], pieces[-1][half:]])
    return blinded


def _assemble(head: list[bytes], idat: list[bytes]) -> bytes:
    return b"".join([*head, *(_chunk(b"IDAT", p) for p in idat), _chunk(b"IEND", b"")])
