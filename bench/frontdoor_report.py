"""Printing ``bench.frontdoor``'s figures: one table, baselines and ratios side by side,
with the API's and the worker's CPU per job beside every row that ran jobs."""

from __future__ import annotations

import itertools
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(r: dict[str, Any]) -> dict[str, float | None]:
    celery_rt = _get(r, "refs", "celery", "round_trip", "per_s")
    celery_drain = _get(r, "refs", "celery", "drain", "per_s")
    dramatiq_drain = _get(r, "refs", "dramatiq", "drain", "per_s")
    raw = _get(r, "minilm", "raw_ort", "per_s")
    out = {
        "prefer_wait_vs_celery_round_trip": _div(
            _get(r, "wait", "prefer_wait", "per_s"), celery_rt
        ),
        "post_get_wait_vs_celery_round_trip": _div(
            _get(r, "wait", "post_then_get_wait", "per_s"), celery_rt
        ),
        "direct_vs_celery_drain": _div(_get(r, "direct", "per_s"), celery_drain),
        "direct_vs_dramatiq_drain": _div(_get(r, "direct", "per_s"), dramatiq_drain),
        "minilm_direct_vs_raw_ort": _div(_get(r, "minilm", "direct", "per_s"), raw),
        "minilm_http_prefer_vs_raw_ort": _div(_get(r, "minilm", "http_prefer_wait", "per_s"), raw),
        "held_wait_post_p50_vs_none": _get(r, "idle", "wait", "post_p50_ratio_to_none"),
        "held_sse_post_p50_vs_none": _get(r, "idle", "sse", "post_p50_ratio_to_none"),
    }
    levels = _get(r, "submit", "levels") or []
    for before, after in itertools.pairwise(levels):
        key = f"submit_{after['clients']}_vs_{before['clients']}_clients"
        out[key] = _div(after["per_s"], before["per_s"])
    return out


def _n(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


class _Rows:
    def __init__(self, title: str) -> None:
        self.table = Table(title=title, title_justify="left")
        for name, justify in (
            ("measure", "left"),
            ("value", "right"),
            ("api CPU/job", "right"),
            ("worker CPU/job", "right"),
            ("client CPU/job", "right"),
            ("note", "left"),
        ):
            self.table.add_column(name, justify=justify)  # type: ignore[arg-type]

    def add(
        self, measure: str, value: str, fig: dict[str, Any] | None = None, note: str = ""
    ) -> None:
        per_job = (fig or {}).get("cpu_ms_per_job") or {}
        self.table.add_row(
            Text(measure),
            Text(value),
            *(Text(_n(per_job.get(k), ".2f", " ms")) for k in ("api", "worker", "bench")),
            Text(note),
        )


def print_all(console: Console, figures: dict[str, Any]) -> None:
    r, q = figures["phases"], figures["ratios"]
    info = figures["machine"]
    console.print(
        f"machine: {info['cpu_model']} x {info['nproc']}, load at start "
        f"{' '.join(str(x) for x in info['loadavg_at_start'])}, git {info.get('git')}, "
        f"store {figures['config']['store']}{' (quick)' if figures['config']['quick'] else ''}"
    )
    rows = _Rows("inferq's front door, side by side (one run)")
    for level in _get(r, "submit", "levels") or []:
        note = f"p50 {_n(level['p50_ms'], '.1f')} ms, {level['jobs']} jobs"
        if level.get("insert_transactions") is not None:
            note += f", {level['insert_transactions']:.0f} insert txns"
        rows.add(
            f"submit only, {level['clients']} clients", _n(level["per_s"], unit="/s"), level, note
        )
    for mode, label in (("prefer_wait", "Prefer: wait=30"), ("post_then_get_wait", "POST + ?wait")):
        fig = _get(r, "wait", mode)
        if fig:
            note = f"p50 {_n(fig['p50_ms'], '.1f')} ms"
            if mode == "prefer_wait" and not fig.get("prefer_supported"):
                note += "; Prefer not supported (fell back to ?wait)"
            legs = fig.get("stages_p50_ms")
            if legs:  # sent -> created -> started -> completed -> answered, p50 of each
                note += " (legs " + "/".join(_n(v, ".0f") for v in legs.values()) + ")"
            rows.add(f"64 clients submit+wait, {label}", _n(fig["per_s"], unit="/s"), fig, note)
    for name in ("celery", "dramatiq"):
        ref = _get(r, "refs", name) or {}
        if "skipped" in ref:
            rows.add(f"{name}", "-", None, ref["skipped"])
        elif ref:
            rt, dr = ref["round_trip"], ref["drain"]
            rows.add(f"{name} round trip, 64 threads", _n(rt["per_s"], unit="/s"), None,
                     f"p50 {_n(rt['p50_ms'], '.1f')} ms; {ref['version']}")  # fmt: skip
            rows.add(f"{name} drain, results stored", _n(dr["per_s"], unit="/s"))
    if "direct" in r:
        rows.add(
            "identity straight onto the topic", _n(r["direct"]["per_s"], unit="/s"), r["direct"]
        )
    m = r.get("minilm") or {}
    if m:
        rows.add("raw ONNX Runtime, MiniLM", _n(m["raw_ort"]["per_s"], unit="/s"), None,
                 f"batch {m['raw_ort']['batch']}, {m['raw_ort']['threads']} threads, other load "
                 f"{m['raw_ort'].get('other_cores', 0):.2f} cores")  # fmt: skip
        rows.add("MiniLM straight onto the topic", _n(m["direct"]["per_s"], unit="/s"), m["direct"])
        h = m["http_prefer_wait"]
        note = "" if h.get("prefer_supported") else "Prefer not supported (fell back to ?wait)"
        rows.add("MiniLM HTTP Prefer: wait, 64 clients", _n(h["per_s"], unit="/s"), h, note)
    idle = r.get("idle") or {}
    if idle:
        none = idle["none"]
        rows.add("nothing held: API cores idle", _n(none["api_cores_idle"], ".3f"), None,
                 f"POST p50 {_n(none['post_p50_ms'], '.1f')} ms")  # fmt: skip
        for kind, label in (("wait", "?wait=60"), ("sse", "SSE streams")):
            fig = idle.get(kind) or {}
            if "skipped" in fig:
                rows.add(f"held {label}", "-", None, fig["skipped"])
            elif fig:
                rows.add(
                    f"{fig['held']} held {label}: API cores idle",
                    _n(fig["api_cores_idle"], ".3f"),
                    None,
                    f"POST p50 {_n(fig['post_p50_ms'], '.1f')} ms "
                    f"({_n(fig.get('post_p50_ratio_to_none'), '.2f')}x), "
                    f"answers {fig.get('final_answers')}",
                )
    lat = r.get("latency")
    if lat:
        note = f"e2e p50 {lat['e2e_p50_ms']:.1f} ms - model p50 {lat['model_p50_ms']:.1f} ms"
        if lat.get("stages_p50_ms"):
            note += " (legs " + "/".join(_n(v, ".1f") for v in lat["stages_p50_ms"].values()) + ")"
        if lat["fell_back_to_get_wait"]:
            note += "; Prefer not supported (fell back to ?wait)"
        rows.add(
            "one at a time: overhead p50", _n(lat["overhead_p50_ms"], ".1f", " ms"), None, note
        )
    console.print(rows.table)

    table = Table(title="ratios", title_justify="left")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    for key, value in q.items():
        if value is None:
            continue  # its phase did not run
        table.add_row(Text(key), Text(_n(value, ".3f")))
    console.print(table)
    console.print(
        "CPU/job: ms of CPU per job over the phase's window, per process group (client: this "
        "benchmark's own clients)"
    )
    console.print(f"[dim]total {figures['wall_seconds']:.0f} s[/dim]")
