"""The latency model: what each Core workload would cost with a network between app and database.

A MODEL, not a measurement through a network: for every variant, the median time per call
measured on the local Unix socket (``t_local``, which holds the client's and the server's CPU time
and the local socket's own round trips) plus the round trips counted on the wire by
bench/wire.py, each costing the added latency ``rtt``:

    t(rtt) = t_local + round_trips × rtt

It assumes the added latency is pure wait (no bandwidth limit, no extra CPU) and that nothing
overlaps the wait: true for one caller on one connection, which is what the workloads time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RTTS_MS", "VARIANTS", "WORKLOADS", "model", "markdown"]

RTTS_MS = (0.0, 0.2, 0.5, 1.0)
# (results key, label): the scoped Core calls of issue 13's item 3.
WORKLOADS = (("point_read", "scoped_get"), ("tenant_list", "scoped_query, 100 rows"), ("writes", "scoped_insert"))
VARIANTS = (("baseline", "B0: hand-written psycopg"), ("sqlalchemy_core_once", "plain SQLAlchemy Core, statement built once"),
            ("core", "rtv-db Core (signed)"))


def model(workloads: dict[str, Any], rtts_ms: tuple[float, ...] = RTTS_MS) -> dict[str, Any]:
    """Per workload and variant: measured µs, counted round trips, modelled µs and ratio to B0 at each rtt."""
    out: dict[str, Any] = {"rtts_ms": list(rtts_ms), "formula": "t(rtt) = t_local + round_trips * rtt", "workloads": {}}
    for key, label in WORKLOADS:
        w = workloads.get(key)
        if not w:
            continue
        rows = {}
        for name, _ in VARIANTS:
            if name not in w["latency"] or name not in w["wire"]:
                continue
            local, trips = w["latency"][name]["median_us"], w["wire"][name]["round_trips_per_op"]
            rows[name] = {"local_us": local, "round_trips": trips,
                          "modelled_us": {str(r): round(local + trips * r * 1000, 1) for r in rtts_ms}}
        base = rows.get("baseline")
        for row in rows.values():
            row["ratio_to_b0"] = ({r: round(us / base["modelled_us"][r], 3) for r, us in row["modelled_us"].items()}
                                  if base else {})
        out["workloads"][key] = {"label": label, "variants": rows}
    return out


def markdown(m: dict[str, Any]) -> list[str]:
    rtts = [str(r) for r in m["rtts_ms"]]
    names = dict(VARIANTS)
    out = ["## Latency model: added network round-trip latency", "",
           "**A model, not a measurement through a network**: the median time per call measured on the local socket "
           "plus the round trips counted on the wire (bench/wire.py) times the added latency, "
           f"`{m['formula']}`. It assumes the added latency is pure wait, with nothing overlapping it (one caller, one "
           "connection). Ratio = variant / B0 at the same latency.", "",
           "| workload | variant | round trips | " + " | ".join(f"µs at +{r} ms" for r in rtts) + " | "
           + " | ".join(f"ratio at +{r} ms" for r in rtts) + " |",
           "|---|---|---:|" + "---:|" * (2 * len(rtts))]
    for w in m["workloads"].values():
        for name, row in w["variants"].items():
            out.append(f"| {w['label']} | {names.get(name, name)} | {row['round_trips']:g} | "
                       + " | ".join(f"{row['modelled_us'][r]:,.0f}" for r in rtts) + " | "
                       + " | ".join(f"{row['ratio_to_b0'].get(r, 0):.2f}×" for r in rtts) + " |")
    return out
