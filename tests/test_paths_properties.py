"""Property tests of the client-facing path handling: whatever a client sends, the
gateway's parser and the connection point's URL map either refuse it or produce an
internal URL inside a published endpoint of a published role."""

from urllib.parse import unquote, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from cmg.config import RoleConfig
from cmg.paths import parse_client_path
from connector.url_map import UnmappedURL, UrlMap

MP = RoleConfig(72057594037927939, "MP", "MP01", "http://127.0.0.1:8003", ("SMS_MP", "CCM_System"))
URL_MAP = UrlMap("GraniteFalls.WestUS.CloudApp.Azure.Com", (MP,))

segment = st.one_of(
    st.sampled_from(["SMS_MP", "sms_mp", "CCM_System", "_mock", "..", ".", "%2e%2e", "%252e", "%2f", "%5c",
                     "72057594037927939", "CCM_Proxy_MutualAuth", "CCM_Proxy_ServerAuth", ""]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
)
paths = st.builds(lambda prefix, segs, q: prefix + "/".join(segs) + q,
                  st.sampled_from(["/CCM_Proxy_MutualAuth/", "/ccm_proxy_mutualauth/", "/CCM_Proxy_ServerAuth/", "/", ""]),
                  st.lists(segment, max_size=6), st.sampled_from(["", "?MPLIST", "?a=../b", "?%2e%2e"]))


@settings(max_examples=500, deadline=None)
@given(paths)
def test_the_parser_never_fails_and_flags_dot_segments(path):
    cp = parse_client_path(path)
    if cp is None or cp.role_id is None:
        return
    decoded = unquote(cp.internal.partition("?")[0])
    if any(s in (".", "..") for s in decoded.split("/")) or "\\" in decoded:
        assert cp.malformed


@settings(max_examples=500, deadline=None)
@given(paths)
def test_the_url_map_only_ever_reaches_published_endpoints(path):
    try:
        mapped = URL_MAP.map(path)
    except UnmappedURL:
        return
    assert mapped.url.startswith(MP.internal_url + "/")
    rest = mapped.url[len(MP.internal_url) + 1:]
    first = unquote(rest.partition("?")[0].partition("/")[0])
    assert first.lower() in ("sms_mp", "ccm_system")
    parts = urlsplit(mapped.url)
    assert parts.netloc == "127.0.0.1:8003"
    assert not any(s in (".", "..") for s in unquote(parts.path).split("/"))
