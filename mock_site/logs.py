"""The site's log files: the MP's own log names, in CMTrace format, plus mock_site.log."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from cmg.cmtrace import open_log

# file name -> CMTrace component, as a real MP / WSUS server writes them.
LOG_FILES = {
    "location": ("MP_Location.log", "MP_LocationManager"),
    "registration": ("MP_RegistrationManager.log", "MP_RegistrationManager"),
    "policy": ("MP_Policy.log", "MP_PolicyManager"),
    "getpolicy": ("MP_GetPolicy.log", "MP_GetPolicy_ISAPI"),
    "getauth": ("MP_GetAuth.log", "MP_GetAuth_ISAPI"),
    "isapi": ("CcmIsapi.log", "CcmIsapi"),
    "relay": ("MP_Relay.log", "MP_RelayEndpoint"),
    "bgb": ("BgbServer.log", "BgbServer"),
    "wsus": ("SoftwareDistribution.log", "WSUS"),
    "dp": ("smsdpprov.log", "SMS_DISTRIBUTION_POINT"),
    "sts": ("CCM_STS.log", "CCM_STS"),
    "entra": ("MockEntraID.log", "MockEntraID"),
    "site": ("mock_site.log", "mock_site"),
}

_instances = itertools.count(1)


class SiteLogs:
    """One logger per log file. Logger names carry an instance number so two sites in
    one process (tests) never write into each other's files."""

    def __init__(self, logs_dir: Path, fmt: str = "cmtrace", echo: bool = False,
                 max_bytes: int = 2 * 1024 * 1024) -> None:
        self._prefix = f"mock_site.{next(_instances)}"
        self._loggers: dict[str, logging.Logger] = {}
        for key, (file_name, component) in LOG_FILES.items():
            self._loggers[key] = open_log(
                f"{self._prefix}.{key}", logs_dir / file_name, component, fmt,
                echo=echo and key == "site", max_bytes=max_bytes,
            )

    def __getattr__(self, key: str) -> logging.Logger:
        try:
            return self.__dict__["_loggers"][key]
        except KeyError:
            raise AttributeError(key) from None

    def close(self) -> None:
        for logger in self._loggers.values():
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()
