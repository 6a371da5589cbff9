"""The mock on-premises ConfigMgr site: management point, software update point and
distribution point, each an aiohttp server on loopback (see ``python -m mock_site``)."""

from mock_site.runner import SiteRunner, start_site

__all__ = ["SiteRunner", "start_site"]
