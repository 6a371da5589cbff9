"""cmg.messaging: round trips, the byte-exact reference shape, and every malformed case."""

from __future__ import annotations

import re
import zlib

import pytest

from cmg.messaging import (BOUNDARY, CONTENT_TYPE, Message, MessageFormatError, MessageHeader, XMLFormatError,
                           decode_message, encode_message, parse_xml, reply_header)

HEADER = MessageHeader(id="{2C1C8D4A-1111-2222-3333-444455556666}", source_id="GUID:ABC", source_host="CLIENT01",
                       target_endpoint="MP_LocationManager", sent_time="2024-05-01T10:00:00Z")
BODY = '<LocationRequest SchemaVersion="1.00"><SiteInformationRequest/></LocationRequest>'


def encoded(body: str = BODY, header: MessageHeader = HEADER) -> bytes:
    return encode_message(Message(header, body))[1]


def test_round_trip():
    ctype, data = encode_message(Message(HEADER, BODY))
    assert ctype == CONTENT_TYPE == 'multipart/mixed; boundary="aAbBcCdDv1234567890VxXyYzZ"'
    msg = decode_message(ctype, data)
    assert msg == Message(msg.header, BODY)
    h = msg.header
    assert (h.id, h.source_id, h.source_host, h.target_endpoint, h.reply_mode, h.timeout, h.sent_time,
            h.compression) == (HEADER.id, "GUID:ABC", "CLIENT01", "MP_LocationManager", "Sync", 600,
                               "2024-05-01T10:00:00Z", "zlib")
    assert h.target_address == "mp:[http]MP_LocationManager"
    assert h.reply_to == "direct:CLIENT01:SccmMessaging"


@pytest.mark.parametrize("body", ["", "é ü 中文 \U0001F600", "\r\n\r\n--" + BOUNDARY + "\r\n", "x" * 200_000])
def test_round_trip_bodies(body):
    for compression in ("zlib", None):
        header = MessageHeader(id="{X}", source_id="", source_host="C", target_endpoint="MP_X", compression=compression)
        msg = decode_message(CONTENT_TYPE, encoded(body, header))
        assert msg.body == body and msg.header.compression == compression


def test_reference_shape_byte_exact():
    data = encoded()
    parts = data.split(b"--" + BOUNDARY.encode())
    assert parts[0] == b"" and parts[-1] == b"--\r\n" and len(parts) == 4
    head_part, body_part = parts[1], parts[2]
    head_headers, head_bytes = head_part.split(b"\r\n\r\n", 1)
    assert head_headers == b"\r\ncontent-type: text/plain; charset=UTF-16\r\ncontent-length: %d" % (len(head_bytes) - 2)
    head_bytes = head_bytes[:-2]
    assert head_bytes[:2] == b"\xff\xfe"  # UTF-16 with BOM (little endian)
    header_xml = head_bytes.decode("utf-16")
    assert header_xml.startswith('<Msg SchemaVersion="1.1" ReplyCompression="zlib"><ID>{2C1C8D4A-')
    body_headers, body_bytes = body_part.split(b"\r\n\r\n", 1)
    body_bytes = body_bytes[:-2]
    assert body_headers == b"\r\ncontent-type: application/octet-stream\r\ncontent-length: %d" % len(body_bytes)
    assert zlib.decompress(body_bytes) == BODY.encode("utf-16")
    assert f'<Body Type="ByteRange" Offset="0" Length="{len(body_bytes)}" />' in header_xml
    assert '<Hooks><Hook3 Name="zlib-compress" /></Hooks>' in header_xml
    order = re.findall(r"<(\w+)", header_xml)
    assert order == ["Msg", "ID", "SourceID", "SourceHost", "TargetAddress", "ReplyTo", "Priority", "Timeout",
                     "ReqVersion", "TargetHost", "TargetEndpoint", "ReplyMode", "Protocol", "SentTime", "Body",
                     "Hooks", "Hook3", "Payload"]


def test_reply_header_correlates_and_compresses():
    h = reply_header(HEADER, source_host="MP01")
    assert h.correlation_id == HEADER.id and h.target_host == "CLIENT01" and h.compression == "zlib"
    msg = decode_message(CONTENT_TYPE, encoded("<r/>", h))
    assert msg.header.correlation_id == HEADER.id


def _swap_body(data: bytes, new_body: bytes) -> bytes:
    """Replace the body part's bytes and its content-length (Body Length left as is)."""
    head, rest = data.split(b"application/octet-stream\r\n", 1)
    tail = b"\r\n--" + BOUNDARY.encode() + b"--\r\n"
    return head + b"application/octet-stream\r\ncontent-length: %d\r\n\r\n" % len(new_body) + new_body + tail


def _with_header(xml: str, body: bytes = b"") -> bytes:
    b = BOUNDARY.encode()
    h = xml.encode("utf-16")
    return (b"--" + b + b"\r\ncontent-type: text/plain; charset=UTF-16\r\n\r\n" + h + b"\r\n--" + b +
            b"\r\ncontent-type: application/octet-stream\r\n\r\n" + body + b"\r\n--" + b + b"--\r\n")


MALFORMED = {
    "not multipart": ("text/xml", encoded(), "content type must be multipart/mixed"),
    "no boundary param": ("multipart/mixed", encoded(), "no boundary"),
    "bad boundary": ('multipart/mixed; boundary="other"', encoded(), "does not occur"),
    "no closing boundary": (CONTENT_TYPE, encoded().rsplit(b"--" + BOUNDARY.encode() + b"--", 1)[0], "closing boundary"),
    "missing part": (CONTENT_TYPE, encoded().split(b"--" + BOUNDARY.encode() + b"\r\ncontent-type: application")[0]
                     + b"--" + BOUNDARY.encode() + b"--\r\n", "1 part(s)"),
    "bad utf-16 header": (CONTENT_TYPE, encoded().replace(b"\xff\xfe<\x00M\x00", b"\xff\xfe\x00\xd8M\x00", 1),
                          "not valid UTF-16"),
    "odd utf-16 header": (CONTENT_TYPE, _with_header("<Msg/>").replace(b"\xff\xfe<\x00", b"\xff\xfe<\x00!", 1),
                          "odd length"),
    "bad zlib": (CONTENT_TYPE, _with_header(
        '<Msg><ID>x</ID><TargetEndpoint>E</TargetEndpoint><Body Type="ByteRange" Offset="0" Length="15"/>'
        '<Hooks><Hook3 Name="zlib-compress"/></Hooks></Msg>', b"not zlib at all"), "not valid zlib data"),
    "truncated zlib": (CONTENT_TYPE, _with_header(
        '<Msg><ID>x</ID><TargetEndpoint>E</TargetEndpoint><Body Type="ByteRange" Offset="0" Length="6"/>'
        '<Hooks><Hook3 Name="zlib-compress"/></Hooks></Msg>', zlib.compress(b"\xff\xfex\x00" * 50)[:6]),
                       "truncated zlib"),
    "bad utf-16 body": (CONTENT_TYPE, _with_header(
        '<Msg><ID>x</ID><TargetEndpoint>E</TargetEndpoint><Body Type="ByteRange" Offset="0" Length="4"/></Msg>',
        b"\x00\xd8x\x00"), "message body is not valid UTF-16"),
    "length mismatch": (CONTENT_TYPE, _swap_body(encoded(), zlib.compress(b"\xff\xfex\x00")), "Body Length="),
    "xml error": (CONTENT_TYPE, _with_header("<Msg><ID>x</Msg>"), "not well-formed"),
    "dtd": (CONTENT_TYPE, _with_header('<!DOCTYPE Msg [<!ENTITY x "y">]><Msg/>'), "DTD"),
    "wrong root": (CONTENT_TYPE, _with_header("<Other/>"), "root must be <Msg>"),
    "no body element": (CONTENT_TYPE, _with_header("<Msg><ID>x</ID><TargetEndpoint>E</TargetEndpoint></Msg>"),
                        "no <Body>"),
    "no endpoint": (CONTENT_TYPE, _with_header('<Msg><ID>x</ID><Body Type="ByteRange" Offset="0" Length="0"/></Msg>'),
                    "TargetEndpoint"),
    "bad part length": (CONTENT_TYPE, encoded().replace(b"content-length: ", b"content-length: 1", 1),
                        "declares content-length"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed(case):
    ctype, data, reason = MALFORMED[case]
    with pytest.raises(MessageFormatError, match=re.escape(reason)):
        decode_message(ctype, data)


def test_zlib_bomb_is_refused():
    header = MessageHeader(id="{X}", source_id="", source_host="C", target_endpoint="MP_X")
    data = encoded("a" * 600_000, header)
    with pytest.raises(MessageFormatError, match="inflates to more than"):
        decode_message(CONTENT_TYPE, data, max_body=100_000)


def test_parse_xml_refuses_entities_and_keeps_namespaces():
    with pytest.raises(XMLFormatError):
        parse_xml('<!DOCTYPE lol [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;">]><x>&b;</x>')
    with pytest.raises(XMLFormatError):
        parse_xml('<!DOCTYPE x SYSTEM "file:///etc/passwd"><x/>')
    with pytest.raises(XMLFormatError, match="not well-formed"):
        parse_xml("<x>&undefined;</x>")
    root = parse_xml('<a xmlns="urn:x" xmlns:p="urn:p" p:k="v"><b>t</b></a>')
    assert root.tag == "{urn:x}a" and root.get("{urn:p}k") == "v" and root.findtext("{urn:x}b") == "t"
