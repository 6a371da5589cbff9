"""The results: ratios to nginx and direct, the terminal table, the JSON file (pure)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .stats import ratio
from .workloads import Row

# Short names for the process groups in the CPU column.
_SHORT = {"gateway": "gw", "connector": "cp", "backend": "be", "proxy": "px", "sshd": "sshd",
          "ssh": "ssh", "wrk": "wrk", "curl": "curl", "mix": "mix"}


def _comparable(row: Row, reference: str) -> bool:
    """idle-6000's figure is memory per connection, not a rate; on ``direct`` the mix is
    the generator's ceiling (Range reads only), not the mix."""
    if row.workload == "idle-6000":
        return False
    return not (row.workload == "cmgmix" and "direct" in (reference, row.scenario))


def headline(row: Row) -> float | None:
    """The figure compared across scenarios: requests/s, or MB/s for a bulk transfer."""
    return row.mb_per_s if row.workload.endswith("-100m") else row.rps


def add_ratios(rows: Sequence[Row]) -> None:
    """Sets ``vs_nginx`` and ``vs_direct`` on every row from the same workload's rows."""
    index = {(r.scenario, r.workload, r.connections): r for r in rows}
    for r in rows:
        for ref, attr in (("nginx", "vs_nginx"), ("direct", "vs_direct")):
            other = index.get((ref, r.workload, r.connections)) if _comparable(r, ref) else None
            value = ratio(headline(r), headline(other)) if other else None
            setattr(r, attr, round(value, 3) if value is not None else None)


def to_json(rows: Iterable[Row], machine: Mapping[str, object] | None = None) -> list[dict[str, Any]]:
    """The rows as JSON objects; each carries ``machine`` (what it was measured on) when given."""
    out = []
    for r in rows:
        obj = r.as_json()
        for k, v in obj.items():
            if isinstance(v, float):
                obj[k] = None if math.isnan(v) else round(v, 4)
        if machine is not None:
            obj["machine"] = dict(machine)
        out.append(obj)
    return out


def write_json(rows: Sequence[Row], path: Path, machine: Mapping[str, object] | None = None) -> None:
    path.write_text(json.dumps(to_json(rows, machine), indent=2) + "\n")


def _num(v: float | None, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _cpu(r: Row) -> str:
    per = r.cpu_s_per_gib if r.workload.endswith("-100m") else r.cpu_s_per_1k_req
    return " ".join(f"{_SHORT.get(k, k)} {v:.3f}" for k, v in per.items())


def _rss(r: Row) -> str:
    return " ".join(f"{_SHORT.get(k, k)} {v / 1024:.0f}" for k, v in r.peak_rss_kb.items())


COLUMNS = ("scenario", "workload", "conns", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "MB/s", "KiB/conn",
           "x nginx", "x direct", "errors", "other cores", "CPU s per 1k req (bulk: per GiB)", "peak RSS MiB")


def table_rows(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    return [
        (r.scenario, r.workload, str(r.connections), _num(r.rps), _num(r.p50_ms, 2), _num(r.p99_ms, 2),
         _num(r.p999_ms, 2), _num(r.mb_per_s, 1), _num(r.rss_kb_per_conn, 1), _num(r.vs_nginx, 2), _num(r.vs_direct, 2),
         str(r.errors), _num(r.other_cores, 2), _cpu(r), _rss(r))
        for r in rows
    ]


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table (readable in a terminal, pasteable into docs)."""
    body = table_rows(rows)
    widths = [max(len(COLUMNS[i]), *(len(b[i]) for b in body)) if body else len(COLUMNS[i])
              for i in range(len(COLUMNS))]
    numeric = {3, 4, 5, 6, 7, 8, 9, 10, 11, 12}

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])
                                 for i, c in enumerate(cells)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(COLUMNS), sep, *(line(b) for b in body)])
