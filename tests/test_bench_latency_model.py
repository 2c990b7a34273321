"""bench/latency.py's model is the formula it states, and its table renders (no timing measured here)."""

from __future__ import annotations

from bench.latency import markdown, model


def _workload(base_us: float, core_us: float) -> dict:
    return {"latency": {"baseline": {"median_us": base_us}, "sqlalchemy_core_once": {"median_us": base_us * 2},
                        "core": {"median_us": core_us}},
            "wire": {"baseline": {"round_trips_per_op": 3}, "sqlalchemy_core_once": {"round_trips_per_op": 3},
                     "core": {"round_trips_per_op": 1}}}


def test_model_adds_counted_round_trips_times_rtt() -> None:
    m = model({"point_read": _workload(100.0, 700.0)}, rtts_ms=(0.0, 0.5))
    rows = m["workloads"]["point_read"]["variants"]
    assert rows["baseline"]["modelled_us"] == {"0.0": 100.0, "0.5": 1600.0}
    assert rows["core"]["modelled_us"] == {"0.0": 700.0, "0.5": 1200.0}
    assert rows["core"]["ratio_to_b0"] == {"0.0": 7.0, "0.5": 0.75}
    assert rows["baseline"]["ratio_to_b0"] == {"0.0": 1.0, "0.5": 1.0}
    # Workloads the run did not measure are left out, not invented.
    assert set(m["workloads"]) == {"point_read"}


def test_markdown_says_it_is_a_model() -> None:
    text = "\n".join(markdown(model({"writes": _workload(200.0, 400.0)})))
    assert "A model, not a measurement" in text and "scoped_insert" in text and "+1.0 ms" in text
