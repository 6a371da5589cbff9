import pytest

from cmg.config import RoleConfig
from connector.url_map import UnmappedURL, UrlMap

MP = RoleConfig(72057594037927939, "MP", "MP01", "http://127.0.0.1:8003", ("SMS_MP", "CCM_System"))
SERVICE = "GraniteFalls.WestUS.CloudApp.Azure.Com"


def test_external_url_maps_to_internal():
    m = UrlMap(SERVICE, (MP,)).map("/CCM_Proxy_MutualAuth/72057594037927939/SMS_MP/.sms_aut?MPLIST")
    assert m.url == "http://127.0.0.1:8003/SMS_MP/.sms_aut?MPLIST"
    assert m.external_prefix == f"https://{SERVICE}/CCM_Proxy_MutualAuth/72057594037927939"
    assert m.internal_prefix == "http://127.0.0.1:8003" and m.endpoint == "SMS_MP"


@pytest.mark.parametrize("target", [
    "/CCM_Proxy_MutualAuth/72057594037927940/SMS_MP/x",   # role not published here
    "/CCM_Proxy_MutualAuth/72057594037927939/_mock/uploads",  # endpoint not published
    "/CCM_Proxy_MutualAuth/72057594037927939/SMS_MP/../_mock",  # traversal
    "/SMS_MP/.sms_aut?MPLIST",  # not a CMG path
])
def test_anything_else_is_refused(target):
    with pytest.raises(UnmappedURL):
        UrlMap(SERVICE, (MP,)).map(target)
