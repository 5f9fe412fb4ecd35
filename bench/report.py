"""Printing the figures: one rich table per scenario, baselines and ratios side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench import profile
from bench.harness import OTHER


def _row(table: Table, *cells: str, style: str | None = None) -> None:
    """Cells are plain text (no rich markup: "[one]" must print as it is)."""
    table.add_row(*(Text(c) for c in cells), style=style)


def _rate(value: float | None, unit: str = "/s") -> str:
    return "-" if value is None else f"{value:,.0f}{unit}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def _table(title: str) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False, expand=False)
    table.add_column("measure", style="bold")
    table.add_column("value", justify="right")
    table.add_column("how")
    return table


def machine(console: Console, info: dict[str, Any]) -> None:
    table = Table(title="machine", title_justify="left", show_header=False)
    table.add_column("k", style="bold")
    table.add_column("v")
    _row(table, "CPU", f"{info['cpu_model']} x {info['nproc']} (usable: {info['sched_cpus']})")
    _row(table, "memory", f"{info['memory_gib']} GiB")
    providers = ", ".join(info["onnxruntime_providers"])
    _row(table, "onnxruntime", f"{info['onnxruntime']} ({providers})")
    _row(table, "python", f"{info['python']} on {info['platform']}")
    _row(table, "load average at start", " ".join(str(x) for x in info["loadavg_at_start"]))
    _row(table, "git", str(info.get("git")))
    console.print(table)


def cpu_table(
    console: Console, title: str, cpu: dict[str, float], seconds: float, cores: int, jobs: int
) -> None:
    """CPU seconds per process over a window, per job, and the share of the machine."""
    table = Table(title=title, title_justify="left")
    table.add_column("process")
    table.add_column("CPU s", justify="right")
    table.add_column("CPU ms / job", justify="right")
    table.add_column("cores busy", justify="right")
    table.add_column("share of machine", justify="right")
    capacity = seconds * cores

    def add(name: str, used: float, style: str | None = None) -> None:
        share = f"{100 * used / capacity:.0f}%"
        per_job = f"{1000 * used / jobs:.2f}"
        _row(table, name, f"{used:.2f}", per_job, f"{used / seconds:.2f}", share, style=style)

    ours = {k: v for k, v in cpu.items() if k != OTHER}
    for name, used in sorted(ours.items(), key=lambda kv: -kv[1]):
        add(name, used)
    add("this benchmark, all", sum(ours.values()), style="bold")
    if OTHER in cpu:
        add(OTHER, cpu[OTHER], style="dim")
    console.print(table)


def _worker_row(table: Table, worker: dict[str, float]) -> None:
    if worker.get("batches"):
        _row(
            table,
            "  worker batches",
            f"{worker['batches']:.0f} x {worker['mean_batch']:.1f} jobs",
            f"mean inference {worker['mean_inference_ms']:.1f} ms/batch, batch wait "
            f"{worker['mean_batch_wait_ms']:.1f} ms; model busy "
            f"{100 * worker.get('inference_busy', 0):.0f}% of the window",
        )


def minilm(console: Console, r: dict[str, Any], cores: int) -> None:
    c = r["corpus"]
    e2e = r["e2e"]
    table = _table("1. MiniLM throughput (all-MiniLM-L6-v2, CPU)")
    _row(
        table,
        "corpus",
        f"{c['sentences']:,} sentences",
        f"{c['mean_tokens']:.1f} tokens mean ({c['min_tokens']}-{c['max_tokens']}, "
        "with [CLS]/[SEP])",
    )
    _row(
        table,
        "A: raw ONNX Runtime",
        _rate(r["raw_ort"]["per_s"], " sent/s"),
        f"session.run only, pre-tokenized, batch {r['batch_size']}, "
        f"{r['threads']} intra-op threads, {r['raw_ort']['provider']}"
        f"{_disturbed(r['raw_ort'].get('other_cores'))}",
    )
    _row(
        table,
        "B: adapter.run",
        _rate(r["adapter"]["per_s"], " sent/s"),
        f"workers.adapters (tokenize + pad + run + to lists), batch {r['batch_size']}"
        f"{_disturbed(r['adapter'].get('other_cores'))}",
    )
    if "idle_cores" in r:
        _row(table, "roles at rest", "", _idle_text(r["idle_cores"]))
    _row(
        table,
        "e2e inferq",
        _rate(e2e["jobs_per_s"], " jobs/s"),
        f"{e2e['jobs']:,} jobs POSTed (concurrency {r['concurrency']}, worker "
        f"{r.get('worker_threads', r['threads'])} intra-op threads); first POST -> "
        f"all terminal in {e2e['seconds']:.2f} s; POSTs done after "
        f"{e2e['submit_seconds']:.2f} s",
    )
    _worker_row(table, e2e["worker"])
    _row(table, "ratio e2e / A (raw)", _ratio(r["ratio_e2e_raw"]), "target >= 0.85", style="bold")
    _row(table, "ratio e2e / B (adapter)", _ratio(r["ratio_e2e_adapter"]), "")
    _row(table, "ratio B / A", _ratio(r["ratio_adapter_raw"]), "the adapter's own overhead")
    direct = r.get("direct")
    if direct:
        _row(
            table,
            "extra: e2e without the API",
            _rate(direct["jobs_per_s"], " jobs/s"),
            f"the same {direct['jobs']:,} jobs as binary CloudEvents straight onto the topic; "
            f"first publish -> all terminal in {direct['seconds']:.2f} s (publishes acked "
            f"after {direct['submit_seconds']:.2f} s)",
        )
        _worker_row(table, direct["worker"])
        _row(
            table,
            "ratio e2e without the API / A",
            _ratio(r.get("ratio_direct_raw")),
            "the worker's own share of the gap",
        )
    statuses = (direct or e2e)["statuses"]
    _row(table, "job statuses", _statuses(statuses), "whole store, warm-up included")
    console.print(table)
    cpu_table(
        console,
        "   CPU during the MiniLM e2e window (HTTP)",
        e2e["cpu_seconds"],
        e2e["seconds"],
        cores,
        e2e["jobs"],
    )
    if direct:
        cpu_table(
            console,
            "   CPU during the MiniLM e2e window without the API (direct publish)",
            direct["cpu_seconds"],
            direct["seconds"],
            cores,
            direct["jobs"],
        )


def identity(console: Console, r: dict[str, Any], cores: int) -> None:
    http, direct, celery = r["http"], r["direct"], r["celery"]
    table = _table("2. Identity overhead (the pipeline's own cost per job)")
    _row(
        table,
        "identity model alone",
        _rate(r["identity_model_alone_per_s"], " items/s"),
        "adapter.run, batch 256, in this process",
    )
    if "idle_cores" in r:
        _row(table, "roles at rest", "", _idle_text(r["idle_cores"]))
    _row(
        table,
        "inferq HTTP",
        _rate(http["jobs_per_s"], " jobs/s"),
        f"{http['jobs']:,} POSTs (concurrency {r['http_concurrency']}); first POST -> "
        f"all terminal {http['seconds']:.2f} s; POSTs done after "
        f"{http['submit_seconds']:.2f} s",
    )
    _worker_row(table, http["worker"])
    _row(
        table,
        "inferq direct (Kafka)",
        _rate(direct["jobs_per_s"], " jobs/s"),
        f"{direct['jobs']:,} binary CloudEvents, aiokafka acks=all; first publish -> "
        f"all terminal {direct['seconds']:.2f} s; publishes acked after "
        f"{direct['submit_seconds']:.2f} s",
    )
    _worker_row(table, direct["worker"])
    if "skipped" in celery:
        _row(table, "Celery baseline", "skipped", celery["skipped"])
    else:
        _row(
            table,
            "Celery baseline",
            _rate(celery["per_s"], " tasks/s"),
            f"Celery {celery.get('celery')} on {celery['broker']}, --pool threads "
            f"--concurrency {celery['concurrency']}, prefetch x"
            f"{celery['prefetch_multiplier']}, no result backend; {celery['jobs']:,} "
            f".delay() -> counter = N in {celery['seconds']:.2f} s (sent in "
            f"{celery['send_seconds']:.2f} s)",
        )
        _row(
            table,
            "ratio inferq direct / Celery",
            _ratio(r.get("ratio_direct_celery")),
            "",
            style="bold",
        )
        _row(
            table,
            "ratio inferq HTTP / Celery",
            _ratio(r.get("ratio_http_celery")),
            "",
            style="bold",
        )
    _row(table, "job statuses", _statuses(direct["statuses"]), "whole store, warm-up included")
    console.print(table)
    cpu_table(
        console,
        "   CPU during the identity HTTP window",
        http["cpu_seconds"],
        http["seconds"],
        cores,
        http["jobs"],
    )
    cpu_table(
        console,
        "   CPU during the identity direct window",
        direct["cpu_seconds"],
        direct["seconds"],
        cores,
        direct["jobs"],
    )
    if "cpu_seconds" in celery:
        cpu_table(
            console,
            "   CPU during the Celery window",
            celery["cpu_seconds"],
            celery["seconds"],
            cores,
            celery["jobs"],
        )


def latency(console: Console, r: dict[str, Any]) -> None:
    table = Table(
        title="3. Low-load latency (one MiniLM job at a time, short texts)", title_justify="left"
    )
    table.add_column("")
    for q in ("p50", "p90", "p99"):
        table.add_column(q, justify="right")
    table.add_column("how")
    m, e = r["model_batch1_s"], r["e2e_s"]
    _row(
        table,
        "model, batch 1",
        *(_ms(m[q]) for q in ("p50", "p90", "p99")),
        f"adapter.run([one]) in this process, {r['samples']} samples"
        f"{_disturbed(r.get('model_other_cores'))}",
    )
    _row(
        table,
        "inferq e2e",
        *(_ms(e[q]) for q in ("p50", "p90", "p99")),
        "start of POST -> GET ?wait=10 returns terminal",
    )
    _row(
        table,
        "difference",
        *(_ms(e[q] - m[q]) for q in ("p50", "p90", "p99")),
        "target: p50 within 20 ms",
        style="bold",
    )
    console.print(table)
    seg = r["segments_p50_ms"]
    parts = Table(
        title="   where a job's time goes (p50 of each segment, server timestamps)",
        title_justify="left",
    )
    parts.add_column("segment")
    parts.add_column("p50", justify="right")
    labels = {
        "post": "POST round trip (validate, insert row, publish acks=all)",
        "created_to_started": "created_at -> started_at (bus, fetch, claim)",
        "started_to_completed": "started_at -> completed_at (batch wait, inference, store)",
        "completed_to_client": "completed_at -> client has it (GET ?wait polling, response)",
    }
    for key, label in labels.items():
        if key in seg:
            _row(parts, label, f"{seg[key]:.1f} ms")
    console.print(parts)
    if "idle_cores" in r:
        console.print(f"   roles at rest: {_idle_text(r['idle_cores'])}")
    console.print(
        f"   statuses: {_statuses(r['statuses'])}; "
        f"p50 difference: [bold]{r['p50_difference_ms']:.1f} ms[/bold]"
    )


def _idle_text(idle: dict[str, float]) -> str:
    text = ", ".join(f"{k} {v:.2f}" for k, v in idle.items()) + " cores, with no jobs"
    if idle.get("worker", 0) > 0.2:
        text += (
            "; the worker's idle Kafka consumer is busy (the broker answers fetches at once "
            "instead of holding them for fetch_max_wait_ms), which the model then lacks"
        )
    return text


def _disturbed(other_cores: float | None) -> str:
    """A note when other processes kept the machine busy while a baseline ran."""
    if other_cores is None or other_cores < 0.1:
        return ""
    return f" [DISTURBED: other processes kept {other_cores:.1f} cores busy]"


def _statuses(statuses: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(statuses.items())) or "-"


def profiles(console: Console, directory: Path, label: str) -> None:
    """Top costs per role from the py-spy files of one window (see bench.profile)."""
    for role in ("api", "worker"):
        path = directory / f"{label}-{role}.txt"
        summary = profile.summarize(path)
        if summary is None:
            continue
        table = Table(
            title=f"   py-spy, {label}, {role}: {summary.samples} busy samples "
            f"(+{summary.idle} of waiting threads, left out; {path}). "
            "A leaf asyncio.runners.Runner.run is uvloop's native loop (I/O, HTTP parsing)",
            title_justify="left",
        )
        table.add_column("CPU spent in (leaf frame)")
        table.add_column("%", justify="right")
        table.add_column("inferq function (incl. callees)")
        table.add_column("%", justify="right")
        n = max(len(summary.self_top), len(summary.ours_top))
        for i in range(n):
            leaf = summary.self_top[i] if i < len(summary.self_top) else ("", 0)
            ours = summary.ours_top[i] if i < len(summary.ours_top) else ("", 0)
            _row(
                table,
                leaf[0],
                f"{100 * leaf[1] / summary.samples:.0f}" if leaf[0] else "",
                ours[0],
                f"{100 * ours[1] / summary.samples:.0f}" if ours[0] else "",
            )
        console.print(table)
