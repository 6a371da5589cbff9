"""The gateway's message ids: ConfigMgr-style GUIDs, random, version 4."""

import re
import uuid

from gateway.proxy import new_message_id


def test_message_ids_are_upper_case_version_4_guids_in_braces() -> None:
    ids = {new_message_id() for _ in range(2000)}
    assert len(ids) == 2000
    for mid in ids:
        assert re.fullmatch(r"\{[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}\}", mid)
        parsed = uuid.UUID(mid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
