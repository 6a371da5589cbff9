"""ConfigMgr's client <-> management point message format. No networking code at all.

A message travels as the body of ``CCM_POST /ccm_system/request`` (and the reply has
the same shape)::

    Content-Type: multipart/mixed; boundary="aAbBcCdDv1234567890VxXyYzZ"

    --aAbBcCdDv1234567890VxXyYzZ
    content-type: text/plain; charset=UTF-16
    content-length: <n>

    <UTF-16 (with BOM) XML header: <Msg SchemaVersion="1.1" ReplyCompression="zlib">...>
    --aAbBcCdDv1234567890VxXyYzZ
    content-type: application/octet-stream
    content-length: <m>

    <zlib-compressed UTF-16 (with BOM) body>
    --aAbBcCdDv1234567890VxXyYzZ--

The header's ``<Body Type="ByteRange" Offset="0" Length="m"/>`` gives the size of the
second part as sent (after compression); ``<Hooks><Hook3 Name="zlib-compress"/></Hooks>``
says the body is compressed. ``ReplyCompression="zlib"`` asks the MP to compress its
reply. Decoding uses the ``email`` package's MIME parser, never string splitting.

Errors: everything malformed raises :class:`MessageFormatError` (a ``ValueError``)
whose text says what is wrong; :func:`parse_xml` raises :class:`XMLFormatError`
(its parent) for bad or unsafe XML (a DTD, an entity declaration).
"""

from __future__ import annotations

import datetime as _dt
import email.parser
import email.policy
import uuid
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from email.message import Message as _MIMEMessage
from typing import Any
from xml.parsers import expat

BOUNDARY = "aAbBcCdDv1234567890VxXyYzZ"
CONTENT_TYPE = f'multipart/mixed; boundary="{BOUNDARY}"'
SCHEMA_VERSION = "1.1"
REQ_VERSION = 5931
# A zlib bomb must not blow up the MP: bodies larger than this once inflated are refused.
DEFAULT_MAX_BODY = 32 * 1024 * 1024

__all__ = [
    "BOUNDARY", "CONTENT_TYPE", "Message", "MessageHeader", "MessageFormatError",
    "XMLFormatError", "encode_message", "decode_message", "parse_xml", "new_message_id",
    "now_sent_time",
]


class MessageFormatError(ValueError):
    """A message is malformed; the text says how (400-class: the sender's fault)."""


class XMLFormatError(MessageFormatError):
    """XML is not well-formed, or uses a DTD or entity declarations (refused for safety)."""


@dataclass(frozen=True)
class MessageHeader:
    """The ``<Msg>`` header of one message, in ConfigMgr's own field names.

    ``compression`` is how this message's body is encoded (``"zlib"`` or ``None``);
    ``reply_compression`` is what the sender asks for in the reply.
    """

    id: str
    source_id: str
    source_host: str
    target_endpoint: str
    reply_mode: str = "Sync"
    timeout: int = 600
    sent_time: str = ""
    compression: str | None = "zlib"
    reply_compression: str | None = "zlib"
    target_host: str = ""
    target_address: str = ""
    reply_to: str = ""
    priority: int = 3
    req_version: int = REQ_VERSION
    protocol: str = "http"
    correlation_id: str = ""

    def __post_init__(self) -> None:
        if self.compression not in (None, "zlib"):
            raise ValueError(f"unsupported body compression {self.compression!r} (only zlib)")
        if not self.target_endpoint:
            raise ValueError("a message needs a TargetEndpoint")


@dataclass(frozen=True)
class Message:
    """A ConfigMgr message: its header and its body (the XML text, decoded)."""

    header: MessageHeader
    body: str


def new_message_id() -> str:
    """A message id as ConfigMgr writes it: ``{GUID}`` in upper case."""
    return "{" + str(uuid.uuid4()).upper() + "}"


def now_sent_time() -> str:
    """The current UTC time in the header's ``SentTime`` form."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- encoding -------------------------------------------------------------------------


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, attrs)
    if text is not None:
        e.text = text
    return e


def _header_xml(h: MessageHeader, body_length: int) -> str:
    attrs = {"SchemaVersion": SCHEMA_VERSION}
    if h.reply_compression:
        attrs["ReplyCompression"] = h.reply_compression
    msg = ET.Element("Msg", attrs)
    _sub(msg, "ID", h.id)
    if h.correlation_id:
        _sub(msg, "CorrelationID", h.correlation_id)
    _sub(msg, "SourceID", h.source_id)
    _sub(msg, "SourceHost", h.source_host)
    _sub(msg, "TargetAddress", h.target_address or f"mp:[{h.protocol}]{h.target_endpoint}")
    _sub(msg, "ReplyTo", h.reply_to or f"direct:{h.source_host}:SccmMessaging")
    _sub(msg, "Priority", str(h.priority))
    _sub(msg, "Timeout", str(h.timeout))
    _sub(msg, "ReqVersion", str(h.req_version))
    _sub(msg, "TargetHost", h.target_host)
    _sub(msg, "TargetEndpoint", h.target_endpoint)
    _sub(msg, "ReplyMode", h.reply_mode)
    _sub(msg, "Protocol", h.protocol)
    _sub(msg, "SentTime", h.sent_time or now_sent_time())
    _sub(msg, "Body", Type="ByteRange", Offset="0", Length=str(body_length))
    hooks = _sub(msg, "Hooks")
    if h.compression == "zlib":
        _sub(hooks, "Hook3", Name="zlib-compress")
    _sub(msg, "Payload", Type="inline")
    return ET.tostring(msg, encoding="unicode", short_empty_elements=True)


def encode_message(msg: Message) -> tuple[str, bytes]:
    """Serialize a message; returns ``(content_type, body_bytes)`` for the HTTP request.

    The header part is UTF-16 with a BOM; the body part is the UTF-16 (with BOM) body,
    zlib-compressed when ``header.compression == "zlib"``.
    """
    body = msg.body.encode("utf-16")
    if msg.header.compression == "zlib":
        body = zlib.compress(body)
    header = _header_xml(msg.header, len(body)).encode("utf-16")
    crlf = b"\r\n"
    b = BOUNDARY.encode("ascii")
    data = b"".join([
        b"--", b, crlf,
        b"content-type: text/plain; charset=UTF-16", crlf,
        b"content-length: ", str(len(header)).encode("ascii"), crlf, crlf,
        header, crlf,
        b"--", b, crlf,
        b"content-type: application/octet-stream", crlf,
        b"content-length: ", str(len(body)).encode("ascii"), crlf, crlf,
        body, crlf,
        b"--", b, b"--", crlf,
    ])
    return CONTENT_TYPE, data


# --- decoding -------------------------------------------------------------------------


def parse_xml(data: str | bytes) -> ET.Element:
    """Parse XML into an ElementTree element, refusing DTDs and entity declarations.

    Namespaced names come out in ElementTree's ``{uri}local`` form. Raises
    :class:`XMLFormatError` for XML that is not well-formed or that declares a DTD,
    an entity or an external reference (no billion laughs, no external entities).
    """
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator=" ")

    def refuse(what: str) -> Any:
        def handler(*_args: Any) -> Any:
            raise XMLFormatError(f"XML with {what} is refused")
        return handler

    def name(raw: str) -> str:
        uri, sep, local = raw.rpartition(" ")
        return "{" + uri + "}" + local if sep else raw

    def start(tag: str, attrs: dict[str, str]) -> None:
        builder.start(name(tag), {name(k): v for k, v in attrs.items()})

    parser.StartDoctypeDeclHandler = refuse("a DTD")
    parser.EntityDeclHandler = refuse("an entity declaration")
    parser.UnparsedEntityDeclHandler = refuse("an unparsed entity declaration")
    parser.ExternalEntityRefHandler = refuse("an external entity reference")
    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: builder.end(name(tag))
    parser.CharacterDataHandler = builder.data
    parser.buffer_text = True
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise XMLFormatError(f"XML is not well-formed: {exc}") from None
    try:
        return builder.close()
    except AssertionError:  # TreeBuilder asserts when nothing was parsed
        raise XMLFormatError("XML has no root element") from None


def _utf16(data: bytes, what: str) -> str:
    if len(data) % 2:
        raise MessageFormatError(f"{what} is not UTF-16: odd length ({len(data)} bytes)")
    codec = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-16-le"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        raise MessageFormatError(f"{what} is not valid UTF-16: {exc.reason}") from None
    # ConfigMgr terminates its strings with a NUL character.
    return text.rstrip("\x00")


def _inflate(data: bytes, max_body: int) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, max_body + 1)
    except zlib.error as exc:
        raise MessageFormatError(f"message body is not valid zlib data: {exc}") from None
    if len(out) > max_body:
        raise MessageFormatError(f"message body inflates to more than {max_body} bytes")
    if not d.eof:
        raise MessageFormatError("message body is truncated zlib data")
    if d.unused_data:
        raise MessageFormatError("message body has trailing bytes after the zlib stream")
    return out


def _parts(content_type: str, data: bytes) -> list[_MIMEMessage]:
    ctype = content_type.strip()
    if not ctype.lower().startswith("multipart/mixed"):
        raise MessageFormatError(f"content type must be multipart/mixed, not {ctype!r}")
    # The email parser reads the top-level headers from the data itself.
    prefix = b"Content-Type: " + ctype.encode("latin-1", "replace") + b"\r\n\r\n"
    mime = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(prefix + data)
    boundary = mime.get_boundary()
    if not boundary:
        raise MessageFormatError("content type has no boundary parameter")
    for defect in mime.defects:
        name = type(defect).__name__
        if name == "StartBoundaryNotFoundDefect":
            raise MessageFormatError(f"boundary {boundary!r} does not occur in the message")
        if name == "CloseBoundaryNotFoundDefect":
            raise MessageFormatError(f"closing boundary --{boundary}-- is missing")
        raise MessageFormatError(f"malformed multipart message: {name}")
    parts = mime.get_payload()
    if not isinstance(parts, list):
        raise MessageFormatError("malformed multipart message: no parts")
    return parts


def _part_bytes(part: _MIMEMessage, what: str) -> bytes:
    if part.is_multipart():
        raise MessageFormatError(f"{what} must not be multipart")
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise MessageFormatError(f"{what} has no payload")
    declared = part.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise MessageFormatError(f"{what} has a bad content-length {declared!r}") from None
        if n != len(payload):
            raise MessageFormatError(f"{what} declares content-length {n} but holds {len(payload)} bytes")
    return payload


def _text(msg: ET.Element, tag: str, required: bool = True) -> str:
    e = msg.find(tag)
    if e is None:
        if required:
            raise MessageFormatError(f"message header has no <{tag}>")
        return ""
    return (e.text or "").strip()


def _int(msg: ET.Element, tag: str, default: int) -> int:
    value = _text(msg, tag, required=False)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise MessageFormatError(f"message header <{tag}> is not a number: {value!r}") from None


def decode_message(content_type: str, data: bytes, *, max_body: int = DEFAULT_MAX_BODY) -> Message:
    """Parse a ``multipart/mixed`` ConfigMgr message (request or reply).

    Raises :class:`MessageFormatError` naming the problem: wrong content type, missing
    or unknown boundary, a missing part, a part that is not UTF-16, bad zlib data,
    a ``<Body Length>`` that does not match the body part, XML that is malformed or
    unsafe, or a header without the fields every message has.
    """
    parts = _parts(content_type, data)
    if len(parts) < 2:
        raise MessageFormatError(f"message has {len(parts)} part(s); a header and a body are required")
    if len(parts) > 2:
        raise MessageFormatError(f"message has {len(parts)} parts; only a header and a body are allowed")
    head_part, body_part = parts
    if head_part.get_content_type() != "text/plain":
        raise MessageFormatError(f"first part must be text/plain, not {head_part.get_content_type()}")
    charset = (head_part.get_content_charset() or "").lower()
    if charset not in ("utf-16", "utf-16le", "utf-16-le"):
        raise MessageFormatError(f"header part charset must be UTF-16, not {charset or 'unset'!r}")
    if body_part.get_content_type() != "application/octet-stream":
        raise MessageFormatError(
            f"second part must be application/octet-stream, not {body_part.get_content_type()}"
        )
    header_text = _utf16(_part_bytes(head_part, "header part"), "header part")
    raw_body = _part_bytes(body_part, "body part")

    root = parse_xml(header_text)
    if root.tag != "Msg":
        raise MessageFormatError(f"message header root must be <Msg>, not <{root.tag}>")
    body_el = root.find("Body")
    if body_el is None:
        raise MessageFormatError("message header has no <Body>")
    if body_el.get("Type", "ByteRange") != "ByteRange":
        raise MessageFormatError(f"<Body Type={body_el.get('Type')!r}> is not supported (only ByteRange)")
    try:
        offset = int(body_el.get("Offset", "0"))
        length = int(body_el.get("Length", ""))
    except ValueError:
        raise MessageFormatError("<Body> Offset and Length must be numbers") from None
    if offset != 0:
        raise MessageFormatError(f"<Body Offset={offset}> is not supported (only 0)")
    if length != len(raw_body):
        raise MessageFormatError(f"<Body Length={length}> but the body part holds {len(raw_body)} bytes")

    hooks = root.find("Hooks")
    compression = None
    if hooks is not None:
        for hook in hooks:
            hook_name = hook.get("Name", "")
            if hook_name == "zlib-compress":
                compression = "zlib"
            elif hook_name:
                raise MessageFormatError(f"unsupported message hook {hook_name!r}")
    body_bytes = _inflate(raw_body, max_body) if compression else raw_body
    if len(body_bytes) > max_body:
        raise MessageFormatError(f"message body is larger than {max_body} bytes")
    body = _utf16(body_bytes, "message body")

    endpoint = _text(root, "TargetEndpoint", required=False)
    address = _text(root, "TargetAddress", required=False)
    if not endpoint and address.startswith("mp:"):
        endpoint = address[3:].rsplit("]", 1)[-1]
    if not endpoint:
        raise MessageFormatError("message header names no TargetEndpoint")
    header = MessageHeader(
        id=_text(root, "ID"),
        source_id=_text(root, "SourceID", required=False),
        source_host=_text(root, "SourceHost", required=False),
        target_endpoint=endpoint,
        reply_mode=_text(root, "ReplyMode", required=False) or "Sync",
        timeout=_int(root, "Timeout", 600),
        sent_time=_text(root, "SentTime", required=False),
        compression=compression,
        reply_compression=root.get("ReplyCompression") or None,
        target_host=_text(root, "TargetHost", required=False),
        target_address=address,
        reply_to=_text(root, "ReplyTo", required=False),
        priority=_int(root, "Priority", 3),
        req_version=_int(root, "ReqVersion", REQ_VERSION),
        protocol=_text(root, "Protocol", required=False) or "http",
        correlation_id=_text(root, "CorrelationID", required=False),
    )
    return Message(header=header, body=body)


def reply_header(request: MessageHeader, *, source_host: str, source_id: str = "") -> MessageHeader:
    """The header of the MP's reply to ``request``: correlated, addressed back, compressed
    the way the request asked (``ReplyCompression``)."""
    return MessageHeader(
        id=new_message_id(),
        source_id=source_id or request.source_id,
        source_host=source_host,
        target_endpoint=request.reply_to.rsplit(":", 1)[-1] if request.reply_to else "SccmMessaging",
        target_address=request.reply_to or f"direct:{request.source_host}:SccmMessaging",
        reply_to=f"direct:{source_host}:{request.target_endpoint}",
        reply_mode=request.reply_mode,
        timeout=request.timeout,
        compression="zlib" if request.reply_compression == "zlib" else None,
        reply_compression=None,
        target_host=request.source_host,
        protocol=request.protocol,
        correlation_id=request.id,
    )
