"""Writing the results: results.json, results.md, results.png and plans.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import async_variants, latency, peers, server_time
from .plans import Plan, plans_markdown

__all__ = ["write_all", "TARGETS"]

# The targets, as (workload, variant, limit) on the ratio of medians.
TARGETS = {
    "point_read.core": 1.15,
    "tenant_list.rls_psycopg": 1.05,
    "scale": 1.2,
}

_LABELS = {
    "baseline": "baseline: psycopg, system role (BYPASSRLS), literal predicate",
    "rls_query_only": "psycopg, runtime role, unsigned context already in the session (set untimed): RLS + literal predicate, no context statement (a measuring device: a signed token only counts in the transaction that set it)",
    "rls_psycopg": "psycopg, runtime role, as rtv-db's begin hook: BEGIN + signed context (a token for the transaction) pipelined in one round trip, without rtv.clean_session() (bench/clean_session.py measures that step), RLS + literal predicate",
    "rls_psycopg_unsigned": "as rls_psycopg, unsigned context (rtv.set_tenant_context, the debugging mode)",
    "set_config_unsigned": "as rls_psycopg_unsigned, but the plain settings set with set_config(..., true) instead of the PL/pgSQL setter",
    "sqlalchemy_core": "plain SQLAlchemy Core, no rtv-db: engine.begin() + select built per call, system role, same pool settings (no ping per checkout)",
    "sqlalchemy_core_once": "plain SQLAlchemy Core, no rtv-db, the statement built once (bind parameters), system role, same pool settings",
    "core": "rtv-db Core, signed (as shipped): with_tenant_scope(db, t).scoped_get / scoped_query / scoped_insert (pooled, pre-ping after 10 s idle: the default)",
    "core_unsigned": "rtv-db Core, unsigned context (RTV_DB_CONTEXT_MODE=unsigned)",
    "core_no_ping": "rtv-db Core, signed, pool_pre_ping=False",
    "orm": "rtv-db ORM, signed: tenant_session(db, ctx) + session.get",
    "orm_unsigned": "rtv-db ORM, unsigned context",
}


def _fmt(x: Any, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _latency_table(latency: dict[str, Any], wire: dict[str, Any] | None = None, labels: bool = True) -> list[str]:
    head = "| variant | median µs | p95 µs | ratio (median) | ratio (p95) | n |"
    sep = "|---|---:|---:|---:|---:|---:|"
    if wire:
        head += " round trips/op | statements/op |"
        sep += "---:|---:|"
    lines = [head, sep]
    for name, s in latency.items():
        label = f"`{name}`" + (f": {_LABELS[name]}" if labels and name in _LABELS else "")
        row = f"| {label} | {_fmt(s['median_us'])} | {_fmt(s['p95_us'])} | {_fmt(s['ratio'], 3)} | {_fmt(s['ratio_p95'], 3)} | {s['n']} |"
        if wire:
            w = wire.get(name, {})
            row += f" {_fmt(w.get('round_trips_per_op'), 2)} | {_fmt(w.get('statements_per_op'), 2)} |"
        lines.append(row)
    return lines


def _transcripts(wire: dict[str, Any]) -> list[str]:
    out = ["", "One operation on the wire (each line one round trip; statements sent in it):", ""]
    for name, w in wire.items():
        out.append(f"- `{name}`:")
        for n, trip in enumerate(w["one_op"], 1):
            shown = " ; ".join(trip) if trip else "(no statement: e.g. Sync only)"
            out.append(f"  {n}. {shown}")
    return out


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} (target ≤ {limit}: **{'met' if value <= limit else 'not met'}**)"


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["workloads"]
    out = [
        "# rtv-db benchmark results",
        "",
        f"Run `{r['sizes']['name']}` started {r['started_at']}, took {r['seconds']} s. "
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB RAM, {m['os']}; "
        f"Python {m['python']}, SQLAlchemy {m['sqlalchemy']}, psycopg {m['psycopg']}. "
        f"Server: {r['server']['version'].split(' on ')[0]} ({'embedded, same machine, Unix socket' if r['server']['embedded'] else 'external'}), "
        + ", ".join(f"{k}={v}" for k, v in sorted(r["server"]["settings"].items())) + ".",
        "",
        "Medians of individually timed operations; variants interleaved round by round in one process "
        "after a warm-up. Ratio = variant / baseline. The tenant context is signed (the default) unless a variant says "
        "`unsigned`; workloads 1-3 run with the database in unsigned mode so that both setters work on the same data "
        "(a signed token is verified the same way in either mode).  The machine is shared with other jobs: expect noise "
        "of several percent between runs.",
        "",
        f"Load: {r['load']['tenants']} tenants × {r['load']['rows_per_tenant']} rows = {r['load']['total_rows']:,} rows "
        f"in {r['load']['seconds']} s ({r['load']['rows_per_second']:,} rows/s; audit triggers present: {r['load']['audit_triggers']}"
        + (", disabled during the load" if r["load"]["audit_triggers"] else "") + ").",
        "",
        "## Targets",
        "",
        "| target | measured |",
        "|---|---|",
    ]
    pr, tl = w["point_read"]["latency"], w["tenant_list"]["latency"]
    growth = w["scale"]["growth_smallest_to_largest"]
    rel = relative_growth(w["scale"]["points"])
    pw, bw = w["point_read"]["wire"], w["point_read"]["wire"]["baseline"]["round_trips_per_op"]

    def _ratio(lat: dict[str, Any], name: str) -> str:
        return _fmt(lat[name]["ratio"], 3) if name in lat else "-"

    def _per(lat: dict[str, Any], a: str, b: str) -> str:
        return f"{lat[a]['median_us'] / lat[b]['median_us']:.3f}" if a in lat and b in lat else "-"

    out += [
        f"| 1. point read, Core path ≤ 1.15× (signed, as shipped) | {_verdict(pr['core']['ratio'], 1.15)}; "
        f"pool_pre_ping=False: {_verdict(pr.get('core_no_ping', {}).get('ratio'), 1.15)}; "
        f"plain SQLAlchemy Core without rtv-db: {_ratio(pr, 'sqlalchemy_core')}; rtv-db Core / plain SQLAlchemy Core: {_per(pr, 'core', 'sqlalchemy_core')} |",
        f"| 1. point read, signing on / off (issue 8) | Core signed {_ratio(pr, 'core')}, unsigned {_ratio(pr, 'core_unsigned')} "
        f"(signed / unsigned {_per(pr, 'core', 'core_unsigned')}); ORM signed {_ratio(pr, 'orm')}, unsigned {_ratio(pr, 'orm_unsigned')} "
        f"(signed / unsigned {_per(pr, 'orm', 'orm_unsigned')}); psycopg signed {_ratio(pr, 'rls_psycopg')}, unsigned {_ratio(pr, 'rls_psycopg_unsigned')} |",
        f"| 1. the context costs no extra round trip | **{'met' if pw['rls_psycopg']['round_trips_per_op'] <= bw else 'not met'}**: "
        f"BEGIN + signed context pipelined (`rls_psycopg`) {pw['rls_psycopg']['round_trips_per_op']:.0f} round trips/op vs {bw:.0f} for the baseline; "
        f"rtv-db Core {pw['core']['round_trips_per_op']:.0f} as shipped (pre-ping only after idle), "
        f"{pw['core_no_ping']['round_trips_per_op']:.0f} with pool_pre_ping=False |" if "core_no_ping" in pw else "| 1. round trips | - |",
        f"| 1. point read, RLS + predicate vs predicate alone (`rls_query_only`, no context statement) | {_ratio(pr, 'rls_query_only')} |",
        f"| 2. tenant list, RLS + predicate vs predicate ≤ 1.05×, query alone (`rls_query_only`, unsigned) | {_verdict(tl.get('rls_query_only', {}).get('ratio'), 1.05)} |",
        f"| 2. the same per transaction, context included | signed (`rls_psycopg`): {_verdict(tl['rls_psycopg']['ratio'], 1.05)}; "
        f"unsigned: {_verdict(tl.get('rls_psycopg_unsigned', {}).get('ratio'), 1.05)}; Core path signed {_ratio(tl, 'core')}, unsigned {_ratio(tl, 'core_unsigned')} |",
    ]
    for key, value in growth.items():
        if key.endswith(("core", "rls_query_only", "rls_psycopg")):
            out.append(f"| 3. scale {r['sizes']['scale_tenants'][0]} → {r['sizes']['scale_tenants'][-1]} tenants, `{key}` ≤ 1.2× | "
                       f"{_verdict(value, 1.2)}; relative to the interleaved baseline: {_verdict(rel.get(key), 1.2)} |")
    cc = w["concurrency"]["throughput"]
    out.append("| 5. concurrency, rtv-db Core / baseline throughput | " + "; ".join(
        f"{mode}: " + ", ".join(f"{row['workers']} workers {_fmt(row['ratio'], 3)}" for row in rows) for mode, rows in cc.items()) + " |")
    wr = w["writes"]
    if "audit_cost" in wr:
        ac = wr["audit_cost"]
        out.append(f"| 6. scoped insert, with / without the audit trail | Core with audit {_ratio(ac, 'core_audit')}, without {_ratio(ac, 'core_no_audit')} "
                   f"(vs the baseline insert without audit); the audit trigger adds {_per(ac, 'core_audit', 'core_no_audit')}× to the Core insert |")
    else:
        out.append(f"| 6. scoped insert | Core {_ratio(wr['latency'], 'core')} (no audit trail in this database) |")
    out += ["", "## 1. Point read by id in a transaction", "",
            f"{w['point_read']['sizes']['tenants']} tenants × {w['point_read']['sizes']['rows_per_tenant']} brand kits; random tenant and row per operation.", ""]
    out += _latency_table(pr, w["point_read"]["wire"]) + _transcripts(w["point_read"]["wire"])
    out += ["", "## 2. Tenant-scoped list", "",
            f"`ORDER BY id LIMIT {w['tenant_list']['sizes']['limit']}` of one tenant's brand kits, out of "
            f"{w['tenant_list']['sizes']['tenants']} tenants × {w['tenant_list']['sizes']['rows_per_tenant']} rows.", ""]
    out += _latency_table(tl, w["tenant_list"]["wire"])
    out += ["", "## 3. Scale in tenants", "",
            "Same rows per tenant, more tenants (one database, loaded incrementally). Median µs:", ""]
    pts = w["scale"]["points"]
    cols = [(wl, v) for wl in ("point_read", "tenant_list") for v in pts[0][wl]]
    out.append("| tenants | brand kits | " + " | ".join(f"{'point' if wl == 'point_read' else 'list'}: {v}" for wl, v in cols) + " |")
    out.append("|---:|---:|" + "---:|" * len(cols))
    for p in pts:
        out.append(f"| {p['tenants']:,} | {p['total_brand_kits']:,} | " + " | ".join(_fmt(p[wl][v]["median_us"]) for wl, v in cols) + " |")
    out += ["", "Growth, largest / smallest tenant count (median): " + ", ".join(f"`{k}` {v:.3f}" for k, v in growth.items()) + ".",
            "", "The sizes run one after another, minutes apart, so the machine's load drifts between them (the baseline moves too, "
            "though nothing in it depends on the tenant count). Growth of each variant's ratio to the baseline timed interleaved "
            "with it, which cancels that drift: " + ", ".join(f"`{k}` {v:.3f}" for k, v in rel.items()) + "."]
    cs = w["context_switch"]
    out += ["", "## 4. Context switching", "",
            "Scoped point reads (rtv-db Core, signed) on a pool of exactly one connection; the tenant follows the pattern. Ratio vs `same_tenant`.", ""]
    out += _latency_table(cs["latency"], labels=False) + _transcripts(cs["wire"])
    cc = w["concurrency"]
    out += ["", "## 5. Concurrency", "",
            f"Each worker reads its own tenant; pool of {cc['sizes']['pool']} connections (baseline: a hand-written queue of "
            f"{cc['sizes']['pool']} psycopg connections, system role). {cc['sizes']['seconds_per_run']} s per run, "
            f"{cc['sizes']['reps']} interleaved runs each, median throughput.", "",
            "| mode | workers | baseline ops/s | rtv-db Core ops/s | ratio |", "|---|---:|---:|---:|---:|"]
    for mode, rows in cc["throughput"].items():
        for row in rows:
            out.append(f"| {mode} | {row['workers']} | {row['baseline_ops_s']:,.0f} | {row['core_ops_s']:,.0f} | {_fmt(row['ratio'], 3)} |")
    wr = w["writes"]
    out += ["", "## 6. Writes", "",
            "One-row insert into brand_kits with RETURNING, in its own transaction. "
            f"Audit trail (`audit_events`) present: **{wr['audit_trail_present']}**.", ""]
    out += _latency_table(wr["latency"], wr["wire"])
    if "audit_cost" in wr:
        out += ["", "The audit's cost: the same inserts with brand_kits' audit trigger (`audit_row_change`) disabled, interleaved round by round (ratio vs `baseline_no_audit`):", ""]
        out += _latency_table(wr["audit_cost"], labels=False)
    else:
        out += ["", "No audit trail in this database: the audit's cost is not measured in this run."]
    for key, render in (("peers", peers.markdown), ("latency_model", latency.markdown), ("async_sync", async_variants.markdown),
                        ("server_time", server_time.markdown)):
        if r.get(key):
            out += [""] + render(r[key])
    out += ["", "## EXPLAIN", "", "See [plans.md](plans.md). Checks: " + "; ".join(
        f"{p['title']}: index {'yes' if p['index_used'] else 'NO'}"
        + ("" if p["initplan_once"] is None else f", InitPlan once {'yes' if p['initplan_once'] else 'NO'}")
        for p in r["plans"]) + "."]
    if r.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(out) + "\n"


def relative_growth(points: list[dict[str, Any]]) -> dict[str, float]:
    """Per variant: (ratio to baseline at the largest size) / (ratio to baseline at the smallest)."""
    first, last = points[0], points[-1]
    out = {}
    for workload in ("point_read", "tenant_list"):
        for variant in last[workload]:
            if variant == "baseline":
                continue
            r0 = first[workload][variant]["median_us"] / first[workload]["baseline"]["median_us"]
            r1 = last[workload][variant]["median_us"] / last[workload]["baseline"]["median_us"]
            out[f"{workload}.{variant}"] = round(r1 / r0, 3)
    return out


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = r["workloads"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    # (a) workloads 1 and 2: medians by variant
    ax = axes[0][0]
    groups = [("point read", w["point_read"]["latency"]), ("list 100", w["tenant_list"]["latency"])]
    names = ["baseline", "rls_query_only", "rls_psycopg", "rls_psycopg_unsigned", "set_config_unsigned", "sqlalchemy_core",
             "core", "core_unsigned", "core_no_ping", "orm", "orm_unsigned"]
    width = 0.075
    for k, name in enumerate(names):
        xs, ys = [], []
        for g, (_, lat) in enumerate(groups):
            if name in lat:
                xs.append(g + (k - 5) * width)
                ys.append(lat[name]["median_us"])
        ax.bar(xs, ys, width, label=name)
        for x, y, (_, lat) in zip(xs, ys, [gr for gr in groups if name in gr[1]]):
            ax.text(x, y, f"{lat[name]['ratio']:.2f}×", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set_ylabel("median latency per transaction (µs)")
    ax.set_title("1-2. Point read and tenant list (ratio vs baseline; signed unless _unsigned)")
    ax.legend(fontsize=6, ncol=2)
    # (b) scale
    ax = axes[0][1]
    pts = w["scale"]["points"]
    xs = [p["tenants"] for p in pts]
    for workload, style in (("point_read", "-"), ("tenant_list", "--")):
        for variant in ("baseline", "rls_query_only", "rls_psycopg", "core"):
            ax.plot(xs, [p[workload][variant]["median_us"] for p in pts], style, marker="o", label=f"{workload} {variant}")
    ax.set_xscale("log")
    ax.set_xlabel(f"tenants ({pts[0]['rows_per_tenant']} rows each)")
    ax.set_ylabel("median µs")
    ax.set_title("3. Scale in tenants")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # room for the legend above the lines
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    # (c) concurrency
    ax = axes[1][0]
    for mode, marker in (("threads", "o"), ("asyncio", "s")):
        rows = w["concurrency"]["throughput"][mode]
        ws = [row["workers"] for row in rows]
        ax.plot(ws, [row["baseline_ops_s"] for row in rows], "--", marker=marker, label=f"{mode} baseline")
        ax.plot(ws, [row["core_ops_s"] for row in rows], "-", marker=marker, label=f"{mode} rtv-db Core")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers (each its own tenant)")
    ax.set_ylabel("transactions / s")
    ax.set_title(f"5. Concurrency, pool of {w['concurrency']['sizes']['pool']}")
    ax.legend(fontsize=7)
    # (d) context switching and writes
    ax = axes[1][1]
    items = [(f"ctx {k}", v["median_us"]) for k, v in w["context_switch"]["latency"].items()]
    items += [(f"write {k}", v["median_us"]) for k, v in w["writes"]["latency"].items()]
    if "audit_cost" in w["writes"]:
        items += [(f"write {k}", v["median_us"]) for k, v in w["writes"]["audit_cost"].items()]
    ax.barh([i[0] for i in items], [i[1] for i in items], color="tab:gray")
    ax.set_xlabel("median µs")
    ax.set_title("4. Context switching (pool of 1) and 6. writes")
    fig.suptitle(f"rtv-db benchmarks ({r['sizes']['name']} run, {r['machine']['nproc']} CPUs, {r['started_at']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: Any, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(results)
    plans: list[Plan] = results.plans
    data["plans"] = [p.as_dict() for p in plans]
    paths = {
        "json": out_dir / "results.json",
        "md": out_dir / "results.md",
        "png": out_dir / "results.png",
        "plans": out_dir / "plans.md",
    }
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(data))
    paths["plans"].write_text(plans_markdown(plans, f"Captured {data['started_at']} on {data['server']['version'].split(' on ')[0]}, "
                                             f"{data['load']['tenants']} tenants × {data['load']['rows_per_tenant']} brand kits, "
                                             "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF)."))
    plot(data, paths["png"])
    return paths


if __name__ == "__main__":  # re-render results.md and results.png from results.json
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks")
    data = json.loads((folder / "results.json").read_text())
    (folder / "results.md").write_text(markdown(data))
    plot(data, folder / "results.png")
