"""Configuration text for nginx (backend, proxies), sshd and ssh -R; the CMG overrides."""

from __future__ import annotations

from pathlib import Path

from bench import nginx_conf, profile, ssh_conf
from bench.scenarios import DP_ROLE_ID, cmg_overrides
from cmg import config as cfg
from cmg.launcher import free_port_run

TLS = nginx_conf.TLSFiles(Path("/w/certs/server.pem"), Path("/w/certs/server.key"), Path("/w/certs/cas.pem"))


def test_backend_serves_static_files_over_http_and_https_and_sinks_uploads() -> None:
    text = nginx_conf.backend_conf(Path("/w"), Path("/w/www"), 8080, 8443, TLS, workers=2)
    assert "listen 127.0.0.1:8080 backlog=4096;" in text
    assert "listen 127.0.0.1:8443 ssl backlog=4096;" in text
    assert "root /w/www;" in text
    assert "access_log off;" in text and "daemon off;" in text
    # the upload sink reads the whole body before it answers
    assert f"location {nginx_conf.CONTENT_PREFIX}/{nginx_conf.UPLOAD_DIR}/" in text
    assert "dav_methods PUT;" in text and "client_max_body_size 0;" in text
    # a client certificate is asked for and verified, like the gateway does
    assert "ssl_verify_client optional;" in text and "ssl_client_certificate /w/certs/cas.pem;" in text
    assert text.count("{") == text.count("}")


def test_proxy_streams_over_keepalive_upstream() -> None:
    text = nginx_conf.proxy_conf(Path("/w"), "proxy", 9443, 8080, TLS)
    assert "listen 127.0.0.1:9443 ssl" in text
    assert "server 127.0.0.1:8080;" in text and "keepalive 512;" in text
    assert "proxy_http_version 1.1;" in text and 'proxy_set_header Connection "";' in text
    assert "proxy_buffering off;" in text and "proxy_request_buffering off;" in text
    assert "pid /w/proxy.pid;" in text
    assert text.count("{") == text.count("}")


def test_sshd_is_loopback_only_with_keys_and_an_aead_cipher() -> None:
    text = ssh_conf.sshd_config(Path("/w/ssh"), 2222, Path("/w/ssh/host"), Path("/w/ssh/auth"), "bench")
    lines = set(text.splitlines())
    assert {"ListenAddress 127.0.0.1", "Port 2222", "HostKey /w/ssh/host", "PasswordAuthentication no",
            "AllowTcpForwarding remote", "Compression no", "Ciphers aes128-gcm@openssh.com",
            "AllowUsers bench", "UsePAM no"} <= lines


def test_ssh_reverse_tunnel_is_interactive_so_nagle_is_off() -> None:
    argv = ssh_conf.ssh_reverse_argv("/usr/bin/ssh", 2222, Path("/w/id"), Path("/w/kh"), "bench",
                                     40000, 8080, 3600)
    assert argv[:2] == ["/usr/bin/ssh", "-tt"]
    assert "-R" in argv and argv[argv.index("-R") + 1] == "127.0.0.1:40000:127.0.0.1:8080"
    assert "Ciphers=aes128-gcm@openssh.com" in argv and "BatchMode=yes" in argv
    assert argv[-2:] == ["bench@127.0.0.1", "sleep 3600"]
    assert "-N" not in argv  # -N opens no session: no pty, Nagle stays on


def test_cmg_overrides_point_the_dp_at_the_backend_and_validate(tmp_path: Path) -> None:
    o = cmg_overrides(tmp_path / "certs", "http://127.0.0.1:8080", instances=2)
    d = cfg.from_dict(o, tmp_path)
    kinds = {r.kind: r for r in d.roles}
    assert set(kinds) == {"MP", "SUP", "DP"}
    dp = kinds["DP"]
    assert dp.role_id == DP_ROLE_ID and dp.internal_url == "http://127.0.0.1:8080"
    assert dp.endpoints == ("SMS_DP_SMSPKG$",)
    assert kinds["MP"].internal_url == f"http://127.0.0.1:{o['site']['mp_port']}"


def test_cmg_overrides_choose_every_port_apart(tmp_path: Path) -> None:
    """Each port, and each port of a run, told from the others and from those taken
    already: nothing binds them until the stack starts, so a bind check alone cannot."""
    taken = {20000}
    for _ in range(50):
        o = cmg_overrides(tmp_path / "certs", "http://127.0.0.1:8080", instances=4, connectors=4, taken=taken)
        site, service, cp = o["site"], o["service"], o["connection_point"]
        ports = [site[k] for k in ("mp_port", "sup_port", "dp_port", "entra_port")]  # type: ignore[index]
        for base in (service["tunnel_base_port"], service["monitoring_base_port"], cp["monitoring_base_port"]):
            ports += range(base, base + 4)  # type: ignore[operator]
        assert len(set(ports)) == len(ports) == 16
        assert set(ports) <= taken and len(taken) == 1 + 16 * (_ + 1)


def test_free_port_run_avoids_ports_chosen_already() -> None:
    taken: set[int] = set()
    bases = [free_port_run(3, avoid=taken) for _ in range(100)]
    runs = [set(range(b, b + 3)) for b in bases]
    assert len(taken) == 300 and set().union(*runs) == taken


def test_profile_summary_of_collapsed_stacks() -> None:
    text = ("process 1;main (a/app.py:10);handle (gateway/proxy.py:80);write (asyncio/sslproto.py:5) 30\n"
            "process 1;main (a/app.py:10);handle (gateway/proxy.py:81) 10\n"
            "process 1;main (a/app.py:10);log (cmg/cmtrace.py:3) 60\n")
    p = profile.parse_collapsed(text, "gateway-0")
    assert p.samples == 100
    assert p.self_top[0] == ("log (cmg/cmtrace.py)", 60.0)
    inclusive = dict(p.inclusive_top)
    assert inclusive["main (a/app.py)"] == 100.0
    assert inclusive["handle (gateway/proxy.py)"] == 40.0  # two lines of one function, merged
