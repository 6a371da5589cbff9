# One image for every role of the CMG emulator: cert init, mock site, gateway
# instances, connection points and the internet client (docker-compose.yml picks the
# role with the command; see docker/entrypoint.py).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# mimalloc: the components run with it (cmg/allocator.py); glibc's malloc slows a
# gateway down for good after many connections.
RUN dpkg -s libmimalloc2.0 >/dev/null 2>&1 \
    || (apt-get update && apt-get install -y --no-install-recommends libmimalloc2.0 \
        && rm -rf /var/lib/apt/lists/*)

WORKDIR /src
COPY pyproject.toml ./
COPY cmg/ cmg/
COPY gateway/ gateway/
COPY connector/ connector/
COPY tunnel/ tunnel/
COPY mock_site/ mock_site/
COPY clientsim/ clientsim/
COPY bench/ bench/
RUN pip install . && python -c "import cmg, gateway, connector, mock_site, clientsim, tunnel"

COPY docker/entrypoint.py docker/healthcheck.py docker/deployment.toml /opt/cmg/
RUN mkdir -p /deployment /client-kit
WORKDIR /deployment
ENTRYPOINT ["python", "/opt/cmg/entrypoint.py"]
CMD ["client"]
HEALTHCHECK --interval=5s --timeout=5s --start-period=5s --retries=12 CMD ["python", "/opt/cmg/healthcheck.py"]
