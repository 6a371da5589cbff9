from cmg.paths import Channel, parse_client_path

MP = 72057594037927939


def test_mutual_auth_role_path():
    cp = parse_client_path(f"/CCM_Proxy_MutualAuth/{MP}/SMS_MP/.sms_aut?MPLIST")
    assert cp.channel is Channel.MUTUAL_AUTH and cp.role_id == MP
    assert cp.resource == "SMS_MP" and cp.internal == "SMS_MP/.sms_aut?MPLIST" and not cp.malformed


def test_prefix_is_case_insensitive_like_iis():
    cp = parse_client_path(f"/ccm_proxy_serverauth/{MP}/ccm_system_tokenauth/request")
    assert cp.channel is Channel.SERVER_AUTH and cp.resource == "ccm_system_tokenauth"


def test_metadata_and_non_cmg_paths():
    assert parse_client_path("/CCM_Proxy_ServerAuth/ServiceMetadata").role_id is None
    assert parse_client_path("/SMS_MP/.sms_aut?MPLIST") is None
    assert parse_client_path("/") is None


def test_role_id_outside_2_56_range_is_not_a_role():
    assert parse_client_path("/CCM_Proxy_MutualAuth/12/SMS_MP/x").role_id is None


def test_dot_segments_and_backslashes_are_malformed():
    for tail in ("SMS_MP/../_mock/uploads", "SMS_MP/%2e%2e/_mock", "SMS_MP/.\\x", "SMS_MP/./x"):
        assert parse_client_path(f"/CCM_Proxy_MutualAuth/{MP}/{tail}").malformed, tail


def test_non_ascii_digits_are_not_a_role_id():
    # found by hypothesis: "²".isdigit() is True but int("²") raises
    for head in ("²", "٣", "１２"):
        cp = parse_client_path(f"/CCM_Proxy_MutualAuth/{head}/SMS_MP/x")
        assert cp is not None and cp.role_id is None
