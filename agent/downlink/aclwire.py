"""The compact wire form of a big snapshot: a signed header and a compressed image.

A million-card snapshot is about 75 MB of JSON and takes the gate seconds and a
gigabyte to parse. The compact form (docs/contract.md, "Compact snapshots")
carries the same list as the binary image of agent/core/aclstore.py,
zlib-compressed, after one line of JSON::

    GATEACL-Z1\\n
    {"v":1,"site":...,"counter":...,"key_id":...,"sig":...,"list":{header}}\\n
    <zlib-compressed image>

The envelope is today's signed envelope (agent/downlink/signing.py): its
signature covers the header, and the header names the body by its length,
uncompressed size and SHA-256, so the body is as authentic as the header.
The header is agent/schemas/acl-image.schema.json. The gate reads the
body only after the signature and the digest hold, decompresses at most the
size the header declares (and at most its cap), and checks every person as
it checks a JSON snapshot (``AccessList.from_image``). The JSON snapshot and
delta stay accepted exactly as before; a delta has no compact form.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import zlib
from collections.abc import Callable
from typing import Any

from agent.core import schemas
from agent.core.acl import AccessList, AclError, AclRejected

__all__ = ["MAX_IMAGE_BYTES", "WIRE_MAGIC", "header_errors", "open_body", "pack", "split"]

WIRE_MAGIC = b"GATEACL-Z1\n"
MAX_HEADER_BYTES = 64 * 1024  # the JSON line; a header is a few hundred bytes
# The largest image a gate decompresses: a million cards make about 60 MB (docs/access-list.md).
MAX_IMAGE_BYTES = 256 * 1024 * 1024


def _reject(path: str, message: str) -> AclRejected:
    return AclRejected([AclError(path, message)])


def header_errors(header: Any) -> list[AclError]:
    """What is wrong with a compact list's header ([] when nothing), in the words of
    agent/core/schemas.py, each at its JSON pointer under /list."""
    return [
        AclError("/list" + schemas.json_pointer(p.parts), p.message)
        for p in (schemas.problem(e, "acl-image", doc=header)
                  for e in schemas.validator("acl-image").iter_errors(header))
    ]


def pack(acl: AccessList, sign: Callable[[dict], dict] | None, *, level: int = 6) -> bytes:
    """The compact message of a validated list. `sign` wraps the header in its
    signed envelope (e.g. ``lambda h: sign_acl(key, h, key_id=..., site=..., counter=...)``);
    None sends the header bare (lab gates that take unsigned lists)."""
    image = b"".join(bytes(c) if isinstance(c, memoryview) else c for c in acl.to_image(wire=True))
    body = zlib.compress(image, level)
    header = {
        "kind": "image",
        "version": acl.version,
        "encoding": "zlib",
        "bytes": len(body),
        "size": len(image),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    env = sign(header) if sign is not None else header
    line = json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return WIRE_MAGIC + line + b"\n" + body


def split(payload: bytes) -> tuple[bytes, memoryview]:
    """(JSON line, body) of a compact message; AclRejected when it has no JSON line."""
    end = payload.find(b"\n", len(WIRE_MAGIC), len(WIRE_MAGIC) + MAX_HEADER_BYTES + 1)
    if end < 0:
        raise _reject("/", f"a compact list starts with {WIRE_MAGIC!r} and one JSON line of at "
                      f"most {MAX_HEADER_BYTES} bytes; none was found")
    return payload[len(WIRE_MAGIC):end], memoryview(payload)[end + 1:]


_PIECE = 1 << 20  # a memcpy into fresh pages of this size holds the lock about a millisecond
_FEED = 256 << 10  # compressed bytes given to zlib at a time


def open_body(header: dict, body: memoryview, max_bytes: int = MAX_IMAGE_BYTES) -> mmap.mmap:
    """The image a checked header names; AclRejected when the body is not the one
    signed for or is bigger than it says (or than `max_bytes`)."""
    if len(body) != header["bytes"]:
        raise _reject("/list/bytes", f"the body has {len(body)} bytes, the header says "
                      f"{header['bytes']}: cut short or padded in transit; send it again")
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise _reject("/list/sha256", "the body does not match the signed SHA-256: altered in "
                      "transit; send it again")
    size = header["size"]
    if size > max_bytes:
        raise _reject("/list/size", f"the image is {size} bytes, over this gate's cap of "
                      f"{max_bytes}; send fewer cards or raise the cap")
    # Inflated into a buffer of the declared size, never more than declared. The body is
    # fed a slice at a time (a view, no copy) and each call makes at most _PIECE bytes: zlib
    # copies the input it has not used into unconsumed_tail at every call, so feeding all
    # 15 MB at once would copy the rest of the body again and again, each copy a long hold
    # of the lock while the gate thread waits.
    d = zlib.decompressobj()
    image = mmap.mmap(-1, size)  # zero pages from the kernel, not a 60 MB memset
    filled = 0
    fed = 0
    data: Any = b""
    try:
        while not d.eof:
            if not data and fed < len(body):
                data = body[fed:fed + _FEED]
                fed += len(data)
            piece = d.decompress(data, _PIECE)
            if not piece and not data and fed >= len(body):
                break  # all fed, nothing more comes out: the stream is cut short
            if filled + len(piece) > size:
                filled += len(piece)
                break
            image[filled:filled + len(piece)] = piece
            filled += len(piece)
            data = d.unconsumed_tail
    except zlib.error as exc:
        raise _reject("/list", f"the body is not zlib data ({exc})") from None
    if fed < len(body) or data or d.unused_data:
        filled = -1  # bytes after the end of the zlib stream
    if filled != size or not d.eof:
        raise _reject("/list/size", f"the body does not inflate to the {size} bytes the header "
                      "says; build it again")
    return image
