"""The errors the CMG answers clients with, in its own words.

The status line's reason phrase and the body carry only the error's name (as the real
CMG's do); why it happened goes to CMGService.log, never to the client.
Names marked (emulator) are undocumented cases named in the same style; see
docs/errors.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .http1 import WholeResponse

_TEXT = [(b"Content-Type", b"text/plain; charset=utf-8")]


@dataclass(frozen=True, slots=True)
class CMGError:
    status: int
    name: str

    def response(self) -> WholeResponse:
        from .http1 import WholeResponse  # http1 answers with these errors too

        return WholeResponse(self.status, self.name, list(_TEXT), self.name.encode())


CLIENT_CERTIFICATE_REQUIRED = CMGError(403, "CMGConnector_Clientcertificaterequired")
FORBIDDEN = CMGError(403, "CMGConnector_Forbidden")
UNAUTHORIZED = CMGError(401, "CMGConnector_Unauthorized")
INTERNAL_SERVER_ERROR = CMGError(500, "CMGConnector_InternalServerError")
INVALID_TOKEN = CMGError(401, "CMGService_Invalid_Token")
# (emulator) no connected connection point publishes the role
SERVICE_UNAVAILABLE = CMGError(503, "CMGConnector_ServiceUnavailable")
# (emulator) the role id or path is not among the published endpoints
ENDPOINT_NOT_FOUND = CMGError(404, "CMGService_EndpointNotFound")
# (emulator) the connection point or the site role failed after the request was sent
BAD_GATEWAY = CMGError(502, "CMGConnector_BadGateway")
# (emulator) the site role did not answer in time
GATEWAY_TIMEOUT = CMGError(504, "CMGConnector_GatewayTimeout")
# (emulator) body larger than the endpoint accepts
REQUEST_TOO_LARGE = CMGError(413, "CMGService_RequestEntityTooLarge")
# (emulator) a request the CMG cannot parse or forward
BAD_REQUEST = CMGError(400, "CMGService_BadRequest")
