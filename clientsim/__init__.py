"""Internet ConfigMgr client simulator: clients that reach the site only through the CMG."""

from clientsim.client import CMGError, CycleResult, EntraSettings, HttpResult, InternetClient, Step, UploadResult
from clientsim.report import format_cycle

__all__ = ["CMGError", "CycleResult", "EntraSettings", "HttpResult", "InternetClient", "Step", "UploadResult", "format_cycle"]
