"""``cmg bench``: the CMG path side by side with direct access, nginx and an SSH tunnel.

Every scenario is measured against the same backend (nginx serving static files over
plain HTTP on loopback) with the same load generators, in one run on one machine:

- ``direct``      HTTPS straight to the backend's own TLS listener (the upper bound);
- ``cmg-1i1c``    client -> gateway (TLS) -> tunnel -> connection point -> backend,
                  one gateway instance and one connection point;
- ``cmg-2i2c``    the same with two instances and two connection points;
- ``nginx``       an nginx TLS reverse proxy, one hop;
- ``ssh-tunnel``  nginx TLS -> an OpenSSH ``ssh -R`` reverse tunnel dialled from the
                  "on-prem" side -> backend.

Modules: ``stats`` (percentiles, medians: pure), ``nginx_conf`` and ``ssh_conf``
(configuration text: pure), ``sysdeps`` (system packages), ``servers`` (processes:
backend, proxies, sshd, the CMG stack), ``procstat`` (CPU and RSS of process groups),
``load`` (wrk, curl, the probe), ``mix`` (the ConfigMgr mix's asyncio generator,
``cmgmix``), ``idle`` (idle TLS connections, ``idle-6000``), ``scenarios``, ``workloads``,
``report``, ``plot``; ``minimal_hop`` (a reference, not a scenario: what one bare Python
TLS-to-HTTP hop costs, side by side with nginx).

Workloads: ``get-1k`` (keep-alive GETs), ``handshake-full``/``handshake-resumed`` (a new
TLS connection per request, client certificate), ``handshake-full-nocert``/
``handshake-resumed-nocert`` (the same without one: the CMG's ``CCM_Proxy_ServerAuth``
with a site-issued CCM token), ``cmgmix`` (CCM_POST messaging, policy GETs, 256 KiB
BITS uploads, Range reads: through the CMG to the mock site; nginx and ssh-tunnel proxy
the same requests to the same mock site code; on ``direct`` the generator's ceiling,
Range reads only), ``download-100m``/``upload-100m``,
``idle-6000`` (RSS per idle client TLS connection, and all of them still served).
"""
