"""The workloads added last: cmgmix (its generator), handshakes without a client
certificate (the token path), idle-6000 (RSS per connection, all served).

The integration tests run one small cmg-1i1c stack (and the nginx backend) for the module;
they check behaviour, never timing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from bench import nginx_conf, report, scenarios, ssh_conf, sysdeps, workloads
from bench.__main__ import main
from bench.idle import IdleConnections, raise_nofile
from bench.load import Generators, Target, _read_response, build_shim
from bench.mix import OPS, MixConfig, run_mix
from bench.servers import Backend
from bench.workloads import Row

MiB = 1024 * 1024
LARGE = 2 * MiB


# --- pure ---------------------------------------------------------------------------


def test_new_workloads_are_selectable_and_in_the_default_run() -> None:
    for w in ("cmgmix", "handshake-full-nocert", "handshake-resumed-nocert", "idle-6000"):
        assert w in workloads.WORKLOADS
    assert workloads.select("idle-6000,cmgmix") == ("cmgmix", "idle-6000")


def test_no_ratios_for_idle_rows_or_the_mix_ceiling_on_direct() -> None:
    rows = [Row("direct", "cmgmix", 16, 1, rps=2000.0), Row("cmg-1i1c", "cmgmix", 16, 1, rps=300.0),
            Row("nginx", "idle-6000", 6000, 1, rss_kb_per_conn=25.0),
            Row("cmg-1i1c", "idle-6000", 6000, 1, rss_kb_per_conn=70.0),
            Row("nginx", "handshake-full-nocert", 16, 1, rps=200.0),
            Row("cmg-1i1c", "handshake-full-nocert", 16, 1, rps=100.0)]
    report.add_ratios(rows)
    by = {(r.scenario, r.workload): r for r in rows}
    assert by[("cmg-1i1c", "cmgmix")].vs_direct is None
    assert by[("cmg-1i1c", "idle-6000")].vs_nginx is None
    assert by[("cmg-1i1c", "handshake-full-nocert")].vs_nginx == 0.5
    text = report.format_table(rows)
    assert "KiB/conn" in text.splitlines()[0] and "70.0" in text
    assert len({len(line) for line in text.splitlines()}) == 1


def test_wrk_environment_without_a_client_certificate(tmp_path: Path) -> None:
    gen = Generators("wrk", "curl", tmp_path, None, None, tmp_path / "shim.so")
    with_cert = Target("https://127.0.0.1:1", "h", "", tmp_path / "ca", tmp_path / "c", tmp_path / "k")
    env = gen._ssl_env(with_cert)
    assert env["BENCH_NO_CLIENT_CERT"] == "0" and env["BENCH_CLIENT_CERT"] == str(tmp_path / "c")
    env = gen._ssl_env(scenarios.without_cert(with_cert))
    assert env["BENCH_NO_CLIENT_CERT"] == "1" and "BENCH_CLIENT_CERT" not in env


def test_raise_nofile_never_lowers_the_limit() -> None:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert raise_nofile(16) == soft
    assert raise_nofile(soft + 1) >= soft


def test_cmg_overrides_raise_the_connection_cap(tmp_path: Path) -> None:
    from cmg import config as cfg

    o = scenarios.cmg_overrides(tmp_path / "certs", "http://127.0.0.1:8080", 1, max_connections=30000)
    d = cfg.from_dict(o, tmp_path)
    assert d.max_connections == 30000
    assert o["site"]["entra_port"] not in (o["site"]["mp_port"], o["site"]["dp_port"])


def test_proxy_sends_the_management_points_paths_to_the_mock_site() -> None:
    tls = nginx_conf.TLSFiles(Path("/w/s.pem"), Path("/w/s.key"), Path("/w/cas.pem"))
    plain = nginx_conf.proxy_conf(Path("/w"), "proxy", 9443, 8080, tls)
    assert "upstream_proxy_mp" not in plain and plain.count("location ") == 1
    text = nginx_conf.proxy_conf(Path("/w"), "proxy", 9443, 8080, tls, mp_port=8003)
    assert "server 127.0.0.1:8003;" in text and "server 127.0.0.1:8080;" in text
    assert "location ~* ^/(ccm_system|ccm_system_tokenauth|SMS_MP|CCM_Incoming|CCM_STS)(/|$) {" in text
    assert "proxy_pass http://upstream_proxy_mp;" in text and "proxy_request_buffering off;" in text
    assert text.count("{") == text.count("}")


def test_ssh_tunnel_can_forward_the_mock_sites_mp_too() -> None:
    argv = ssh_conf.ssh_reverse_argv("ssh", 22, Path("/k"), Path("/kh"), "u", 9000, 8080, 60, ((9001, 8003),))
    forwards = [argv[i + 1] for i, a in enumerate(argv) if a == "-R"]
    assert forwards == ["127.0.0.1:9000:127.0.0.1:8080", "127.0.0.1:9001:127.0.0.1:8003"]


# --- against a running cmg-1i1c ---------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    try:
        return sysdeps.ensure(["nginx", "wrk", "gcc"], log=lambda _: None)
    except sysdeps.MissingTool as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def shared(tools: dict[str, str]) -> Iterator[scenarios.Shared]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-test-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    workdir.chmod(0o755)
    certs = workdir / "certs"
    scenarios.init_pki(certs)
    backend = Backend(tools["nginx"], workdir, scenarios.server_tls(certs), LARGE).start()
    try:
        yield scenarios.Shared(tools, workdir, certs, backend, mix_site=True)
    finally:
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def cmg(shared: scenarios.Shared) -> Iterator[scenarios.Running]:
    with scenarios.open_scenario("cmg-1i1c", shared) as run:
        yield run


@pytest.fixture(scope="module")
def nginx(shared: scenarios.Shared) -> Iterator[scenarios.Running]:
    with scenarios.open_scenario("nginx", shared) as run:
        yield run


@pytest.fixture(scope="module")
def direct(shared: scenarios.Shared) -> Iterator[scenarios.Running]:
    with scenarios.open_scenario("direct", shared) as run:
        yield run


def _mix_cfg(run: scenarios.Running, **kw: object) -> MixConfig:
    t = run.target
    host, port = t.address
    base = dict(host=host, port=port, server_name=t.host, ca=str(t.ca), cert=str(t.client_cert),
                key=str(t.client_key), content_path=t.path(workloads.LARGE), content_size=LARGE,
                mp_prefix=run.mp_prefix, connections=4, seconds=1.0)
    base.update(kw)
    return MixConfig(**base)  # type: ignore[arg-type]


@pytest.mark.integration
def test_mix_runs_every_operation_through_the_cmg(cmg: scenarios.Running) -> None:
    res = run_mix(_mix_cfg(cmg))
    assert res.errors == 0, res.error_samples
    assert res.setup.startswith("registered GUID:")
    assert all(res.ops[op] > 0 for op in OPS), res.ops
    # a BITS upload is three requests (Create-Session, Fragment, Close-Session)
    assert res.ok == res.ops["ccm_post"] + res.ops["policy_get"] + res.ops["range_read"] + 3 * res.ops["bits_upload"]
    assert res.requests == res.ok
    assert res.unmeasured >= 3  # registration's three messages, then the warm-up, before the clock
    assert 0 < res.p50_ms <= res.p99_ms <= res.p999_ms
    assert res.bytes_out > res.ops["bits_upload"] * 256 * 1024
    assert res.bytes_in > res.ops["range_read"] * 64 * 1024


@pytest.mark.integration
def test_mix_runs_the_same_requests_through_nginx_to_a_mock_site(nginx: scenarios.Running) -> None:
    assert nginx.mp_prefix == "" and set(nginx.mix_groups) == {"site"}
    res = run_mix(_mix_cfg(nginx, connections=2))
    assert res.errors == 0, res.error_samples
    assert res.setup.startswith("registered GUID:")
    assert all(res.ops[op] > 0 for op in OPS), res.ops


@pytest.mark.integration
def test_mix_counts_refused_requests_as_errors(cmg: scenarios.Running) -> None:
    # a content path the DP does not have: every range read is answered 404
    res = run_mix(_mix_cfg(cmg, mp_prefix=None, content_path=cmg.target.path("/SMS_DP_SMSPKG$/bench/none.bin"),
                           seconds=0.5, connections=2))
    assert res.ok == 0 and res.errors > 0
    assert "HTTP 404" in res.error_samples[0]


@pytest.mark.integration
def test_mix_without_a_management_point_reads_content_only(direct: scenarios.Running) -> None:
    res = run_mix(_mix_cfg(direct, connections=2, seconds=0.5))
    assert res.errors == 0, res.error_samples
    assert res.ops["range_read"] > 0 and res.ops["ccm_post"] == res.ops["bits_upload"] == 0
    assert "content reads only" in res.setup


@pytest.mark.integration
def test_server_auth_target_carries_a_token_the_gateway_accepts(cmg: scenarios.Running) -> None:
    assert cmg.nocert is not None and cmg.nocert.client_cert is None
    assert cmg.nocert.prefix.startswith("/CCM_Proxy_ServerAuth/")

    def get(target: Target) -> int:
        ctx = ssl.create_default_context(cafile=str(target.ca))
        with ctx.wrap_socket(socket.create_connection(target.address, timeout=10),
                             server_hostname=target.host) as s:
            extra = "".join(f"{h}\r\n" for h in target.headers)
            s.sendall(f"GET {target.path(workloads.SMALL)} HTTP/1.1\r\nHost: {target.host}\r\n{extra}\r\n".encode())
            try:
                return _read_response(s)
            except ValueError as exc:
                return int(str(exc).split()[-1])

    assert get(cmg.nocert) == 200
    assert get(dataclasses.replace(cmg.nocert, headers=())) == 401  # the token is what lets it in


@pytest.mark.integration
def test_wrk_shim_can_leave_the_client_certificate_out(cmg: scenarios.Running, shared: scenarios.Shared) -> None:
    shim = build_shim(shared.tools["gcc"], shared.workdir / "shim-test.so")
    gen = Generators(shared.tools["wrk"], "curl", shared.workdir, None, None, shim)
    ok = gen.wrk_get(cmg.nocert, workloads.SMALL, 2, 1, new_connection="resumed")
    assert ok.ok > 0 and ok.non_2xx == 0 and ok.errors == 0
    # MutualAuth without a certificate: the gateway refuses every request
    refused = gen.wrk_get(scenarios.without_cert(cmg.target), workloads.SMALL, 2, 1)
    assert refused.ok == 0 and (refused.non_2xx + refused.errors) > 0


@pytest.mark.integration
def test_idle_connections_are_all_served(cmg: scenarios.Running) -> None:
    with IdleConnections(cmg.target, workloads.SMALL, 24, threads=4, deadline=60) as idle:
        opened = idle.open()
        assert opened.opened == 24 and opened.errors == 0
        assert opened.resumed >= 24 - 4  # each thread's first handshake is a full one
        check = idle.check()
        assert check.served == 24 and check.errors == 0 and len(check.latencies_ms) == 24
    assert idle.socks == []


@pytest.mark.integration
def test_idle_row_measures_the_gateway(cmg: scenarios.Running) -> None:
    s = workloads.Settings(seconds=1, reps=1, bulk_reps=1, idle_connections=40, idle_settle=0.2)
    row = workloads.run_idle(cmg, s, lambda _: None)
    assert row.workload == "idle-6000" and row.connections == 40
    assert row.errors == 0 and row.requests == 40
    assert row.rss_kb_per_conn is not None
    assert row.note.startswith("all served") and "RSS delta of gateway" in row.note
    assert set(row.peak_rss_kb) == {"gateway", "connector", "backend"}


@pytest.mark.integration
def test_main_runs_the_new_workloads(tmp_path: Path, tools: dict[str, str]) -> None:
    try:
        sysdeps.ensure(["curl", "taskset"], log=lambda _: None)
    except sysdeps.MissingTool as exc:
        pytest.skip(str(exc))
    out = tmp_path / "bench.json"
    code = main(["--only", "cmg-1i1c", "--workloads", "handshake-full-nocert,cmgmix,idle-6000",
                 "--seconds", "1", "--reps", "1", "--large-mib", "2", "--idle-connections", "30",
                 "--json", str(out)])
    assert code == 0
    rows = {r["workload"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"handshake-full-nocert", "cmgmix", "idle-6000"}
    hs = rows["handshake-full-nocert"]
    assert hs["rps"] > 0 and hs["errors"] == 0 and "CCM_Proxy_ServerAuth" in hs["note"]
    mix = rows["cmgmix"]
    assert mix["rps"] > 0 and mix["errors"] == 0 and mix["latency_source"] == "mix"
    assert all(mix["op_counts"][op] > 0 for op in OPS) and "mix" in mix["cpu_s_per_1k_req"]
    idle = rows["idle-6000"]
    assert idle["connections"] == 30 and idle["errors"] == 0 and idle["rss_kb_per_conn"] is not None
    assert idle["rps"] is None and idle["vs_nginx"] is None
