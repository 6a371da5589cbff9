"""Plain-text report of one client cycle, one line per step, then SMS_ActiveMPCandidate."""

from __future__ import annotations

from clientsim.client import CycleResult, Step


_AUTH_NAMES = {"entra": "Microsoft Entra ID, CCM token", "token": "site-issued client token"}


def _tag(step: Step) -> str:
    if step.ok:
        return "[ OK ]"
    return "[SKIP]" if step.detail.startswith("skipped:") else "[FAIL]"


def format_step(step: Step, width: int = 12) -> str:
    status = str(step.status) if step.status else "---"
    return f"{_tag(step)} {step.name:<{width}} {status:>3} {step.elapsed_ms:9.1f} ms  {step.detail}"


def format_cycle(result: CycleResult) -> str:
    """Each step with its status and time, then the SMS_ActiveMPCandidate line, e.g.::

        [ OK ] MPLIST       200      12.3 ms  internet MP https://.../CCM_Proxy_MutualAuth/72057594037927939
        SMS_ActiveMPCandidate: MP="https://.../CCM_Proxy_MutualAuth/72057594037927939" Type="Internet"
    """
    width = max([12] + [len(s.name) for s in result.steps])
    lines = [format_step(s, width) for s in result.steps]
    candidate = result.sms_active_mp_candidate
    lines.append(f"SMS_ActiveMPCandidate: {candidate}" if candidate else "SMS_ActiveMPCandidate: (none)")
    passed = sum(1 for s in result.steps if s.ok)
    lines.append(f"{passed}/{len(result.steps)} steps OK" + (f", SMSID {result.smsid}" if result.smsid else "")
                 + (f" (authentication: {_AUTH_NAMES.get(result.auth, result.auth)})" if result.auth != "pki" else ""))
    return "\n".join(lines)
