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
``load`` (wrk, curl, the probe), ``scenarios``, ``workloads``, ``report``, ``plot``.
"""
