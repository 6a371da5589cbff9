"""The deployment file: defaults, every part typed, bad input named."""

from pathlib import Path

import pytest

from cmg import config
from cmg.config import ConfigError, load


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "deployment.toml"
    p.write_text(text)
    return p


def test_no_file_gives_a_working_loopback_deployment(tmp_path):
    d = load(None, base_dir=tmp_path)
    g = d.gateway(0)
    assert g.service_name == "GraniteFalls.WestUS.CloudApp.Azure.Com"
    assert g.client_port == 443 and g.tunnel_port == 10124 and g.enforce_tls12
    assert g.tls.server_certificate == tmp_path / "certs" / "cmg-server.pfx"
    cp = d.connection_point("CMGCP01")
    assert cp.tunnel_ports == (10124,)
    assert [r.role_id for r in cp.roles] == [72057594037927939, 72057594037927940, 72057594037927942]
    assert d.site.site_code == "PS1"


def test_full_file_is_read_into_frozen_parts(tmp_path):
    p = write(tmp_path, """
[service]
name = "Contoso.WestUS.CloudApp.Azure.Com"
instances = 3
client_port = 8443
tunnel_base_port = 20000
enforce_tls12 = false

[certificates]
dir = "pki"
server_certificate = "server.pem"
server_key = "server.key"
trusted_client_roots = ["root1.pem", "root2.pem"]

[site]
code = "ABC"

[[site.roles]]
role_id = 72057594037927939
kind = "MP"
name = "MP01.contoso.com"
internal_url = "https://mp01.contoso.com/"

[connection_point]
names = ["CP1", "CP2"]
""")
    d = load(p)
    g = d.gateway(2)
    assert g.tunnel_port == 20002 and g.instances == 3 and not g.enforce_tls12
    assert g.tls.server_key == tmp_path / "pki" / "server.key"
    assert g.tls.server_pfx_password_file is None
    assert len(g.tls.trusted_client_roots) == 2
    cp = d.connection_point("CP2")
    assert cp.tunnel_ports == (20000, 20001, 20002)
    assert cp.roles[0].internal_url == "https://mp01.contoso.com"
    assert cp.roles[0].endpoints == config.DEFAULT_MP_ENDPOINTS
    with pytest.raises(Exception):
        g.client_port = 1  # frozen


@pytest.mark.parametrize("text, names", [
    ("[service]\nnmae = 'x'\n", "service.nmae"),
    ("[servce]\n", "[servce]"),
    ("[service]\ninstances = 17\n", "service.instances"),
    ("[service]\ninstances = '2'\n", "service.instances"),
    ("[service]\nenforce_tls12 = 1\n", "service.enforce_tls12"),
    ("[service]\nclient_port = true\n", "service.client_port"),
    ("[service]\nclient_port = 70000\n", "service.client_port"),
    ("[service]\nname = 'not a name'\n", "service.name"),
    ("[site]\ncode = 'TOOLONG'\n", "site.code"),
    ("[[site.roles]]\nrole_id = 5\nkind = 'MP'\ninternal_url = 'http://x'\n", "site.roles[0].role_id"),
    ("[[site.roles]]\nrole_id = 72057594037927939\nkind = 'XX'\ninternal_url = 'http://x'\n", "site.roles[0].kind"),
    ("[[site.roles]]\nrole_id = 72057594037927939\nkind = 'MP'\ninternal_url = 'ftp://x'\n", "site.roles[0].internal_url"),
    ("[[site.roles]]\nrole_id = 72057594037927939\nkind = 'MP'\ninternal_url = 'http://x'\ncolour = 1\n", "site.roles[0].colour"),
    ("[tunnel]\nstream_window = -1\n", "tunnel.stream_window"),
    ("[logging]\nformat = 'xml'\n", "logging.format"),
    ("[connection_point]\nnames = []\n", "connection_point.names"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_input_stops_start_up_naming_it(tmp_path, text, names):
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text))
    assert names in str(err.value)


def test_unknown_instance_and_connection_point_are_named(tmp_path):
    d = load(None, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="instance 1"):
        d.gateway(1)
    with pytest.raises(ConfigError, match="CP9"):
        d.connection_point("CP9")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")


def test_gateway_hosts_one_per_instance_or_one_for_all(tmp_path):
    two = {"service": {"instances": 2}}
    d = load(None, base_dir=tmp_path, overrides={**two, "connection_point": {"gateway_hosts": ["gateway-0", "gateway-1"]}})
    assert d.connection_point("CMGCP01").gateway_hosts == ("gateway-0", "gateway-1")
    d = load(None, base_dir=tmp_path, overrides={**two, "connection_point": {"gateway_hosts": ["cmg.local"]}})
    assert d.connection_point("CMGCP01").gateway_hosts == ("cmg.local", "cmg.local")
    assert load(None, base_dir=tmp_path, overrides=two).connection_point("CMGCP01").gateway_hosts == ("127.0.0.1",) * 2
    with pytest.raises(ConfigError, match="gateway_hosts"):
        load(None, base_dir=tmp_path, overrides={**two, "connection_point": {"gateway_hosts": ["a", "b", "c"]}})
