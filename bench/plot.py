"""The PNG: requests/s per scenario and connection count, handshakes, bulk MB/s, probe p99."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .workloads import Row


def plot(rows: Sequence[Row], path: Path) -> None:
    """Writes the plot; raises ``ImportError`` when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    width = 0.8 / max(1, len(scenarios))

    def bars(ax, keys: list[tuple[str, int]], labels: list[str], value, title: str, ylabel: str,
             log: bool = False) -> None:
        for i, sc in enumerate(scenarios):
            vals = []
            for wl, c in keys:
                match = [r for r in rows if r.scenario == sc and r.workload == wl and r.connections == c]
                v = value(match[0]) if match else None
                vals.append(v if v is not None else 0.0)
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=sc)
        ax.set_xticks([x + width * (len(scenarios) - 1) / 2 for x in range(len(keys))])
        ax.set_xticklabels(labels)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)

    gets = sorted({r.connections for r in rows if r.workload == "get-1k"})
    bars(axes[0][0], [("get-1k", c) for c in gets], [f"{c} conn" for c in gets], lambda r: r.rps,
         "1 KiB GETs, keep-alive (median req/s)", "requests/s", log=True)
    bars(axes[0][1], [("get-1k", c) for c in gets], [f"{c} conn" for c in gets], lambda r: r.p99_ms,
         "1 KiB GETs: p99 latency", "ms", log=True)
    hs = [w for w in ("handshake-full", "handshake-resumed", "handshake-full-nocert", "handshake-resumed-nocert")
          if any(r.workload == w for r in rows)]
    bulk = [w for w in ("download-100m", "upload-100m") if any(r.workload == w for r in rows)]
    bars(axes[1][0], [(w, 16) for w in hs], [w.replace("handshake-", "").replace("-nocert", "\nno cert") for w in hs],
         lambda r: r.rps,
         "new TLS connection per request (req/s)", "requests/s")
    bars(axes[1][1], [(w, 1) for w in bulk], bulk, lambda r: r.mb_per_s,
         "100 MiB transfer (median MB/s)", "MB/s")
    # direct's cmgmix row is the generator's ceiling (Range reads only), not the mix
    mix = [r for r in rows if r.workload == "cmgmix" and r.rps is not None and r.scenario != "direct"]
    bars(axes[0][2], [("cmgmix", r.connections) for r in mix[:1]], [f"{r.connections} conn" for r in mix[:1]],
         lambda r: r.rps if r.scenario != "direct" else None,
         "ConfigMgr mix (req/s)", "requests/s")
    idle = sorted({r.connections for r in rows if r.workload == "idle-6000"})
    bars(axes[1][2], [("idle-6000", c) for c in idle], [f"{c:,} idle conn" for c in idle],
         lambda r: r.rss_kb_per_conn, "RSS per idle TLS connection (KiB)", "KiB")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("cmg bench: same backend (nginx static), same generators, loopback, 2 cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
