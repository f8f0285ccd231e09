"""The report: the table of figures and the detail lines, from a Bench's results."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.harness import Bench


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} jobs/s"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "n/a"
    return f"{100 * numerator / denominator:.0f}%"


# -- report ---------------------------------------------------------------------------------


def table(b: Bench) -> str:
    r = b.results
    rows: list[tuple[str, str, str, str, str]] = []
    error = b.errors

    single = r.get("single_enqueue")
    if single:
        rows.append(
            (
                "single enqueue (1 job/tx, 1 client)",
                rate(single["pgqueue_jobs_per_s"]),
                f"{rate(single['ceiling_pgbench_jobs_per_s'])} (pgbench -c1, insert_job)",
                ratio(single["pgqueue_jobs_per_s"], single["ceiling_pgbench_jobs_per_s"]),
                "",
            )
        )
    elif "single_enqueue" in error:
        rows.append(("single enqueue", "ERROR", "", "", ""))

    bulk = r.get("bulk_enqueue")
    if bulk:
        ok = "ok" if bulk["pgqueue_jobs_per_s"] >= 60_000 else "MISSED"
        rows.append(
            (
                f"bulk enqueue_many ({bulk['jobs']:,} jobs, COPY)",
                rate(bulk["pgqueue_jobs_per_s"]),
                f"{rate(bulk['raw_copy_jobs_per_s'])} (raw psycopg COPY)",
                ratio(bulk["pgqueue_jobs_per_s"], bulk["raw_copy_jobs_per_s"]),
                f">= 60,000 jobs/s: {ok}",
            )
        )
    elif "bulk_enqueue" in error:
        rows.append(("bulk enqueue", "ERROR", "", "", ""))

    ceilings = r.get("drain_ceilings", {})
    drain = r.get("drain", {})
    for processes, data in drain.items():
        best = data["best"]
        same = ceilings.get(f"batch100-c{processes}")
        name = f"drain {best['jobs']:,} no-op, {processes} proc (best c={best['concurrency']})"
        target = ""
        if processes == "2" and same:
            ok = "ok" if best["window_jobs_per_s"] >= 0.25 * same["jobs_per_s"] else "MISSED"
            target = f">= 25% of batch ceiling: {ok}"
        rows.append(
            (
                name,
                f"{rate(best['window_jobs_per_s'])} ({rate(best['wall_jobs_per_s'])} wall)",
                f"{rate(same['jobs_per_s'])} (pgbench -c{processes}, {same['label']})" if same else "n/a",
                ratio(best["window_jobs_per_s"], same["jobs_per_s"] if same else None),
                target,
            )
        )
        if processes == "2":
            for key in ("claim1-c2", "batch100_1tx-c2"):
                other = ceilings.get(key)
                if other:
                    rows.append(
                        (
                            "  same, vs another ceiling",
                            "",
                            f"{rate(other['jobs_per_s'])} (pgbench -c2, {other['label']})",
                            ratio(best["window_jobs_per_s"], other["jobs_per_s"]),
                            "",
                        )
                    )
    if "drain" in error:
        rows.append(("drain", "ERROR", "", "", ""))

    latency = r.get("latency")
    if latency:
        label = f"latency commit->handler start @ {latency['achieved_rate']:.0f}/s"
        for key, name, goal in (("p50_ms", "p50", 2.0), ("p95_ms", "p95", None), ("p99_ms", "p99", 5.0)):
            value = latency[key]
            target = "" if goal is None else f"<= {goal:g} ms: {'ok' if value <= goal else 'MISSED'}"
            rows.append((f"{label} {name}", f"{value:.2f} ms", "", "", target))
    elif "latency" in error:
        rows.append(("latency", "ERROR", "", "", ""))

    metrics = r.get("metrics_overhead")
    if metrics:
        share = metrics["on_jobs_per_s"] / metrics["off_jobs_per_s"]
        rows.append(
            (
                "drain 1 proc c=200, metrics on (vs off)",
                rate(metrics["on_jobs_per_s"]),
                f"{rate(metrics['off_jobs_per_s'])} (metrics off)",
                f"{share:.0%}",
                f">= 95%: {'ok' if share >= 0.95 else 'MISSED'}",
            )
        )
    elif "metrics_overhead" in error:
        rows.append(("metrics overhead", "ERROR", "", "", ""))
    limits = r.get("limits")
    if limits:
        plain = limits["none"]["median"]
        for name, text in (
            ("max_running", "a global limit of 1,000 running (cannot bind)"),
            ("max_running_400", "a global limit of 400 running (= the slots)"),
            ("rate", "a rate limit"),
        ):
            if name not in limits:
                continue  # a run of an earlier version
            share = limits[name]["median"] / plain
            rows.append(
                (
                    f"drain 2 proc c=200, {text} (never reached)",
                    rate(limits[name]["median"]),
                    f"{rate(plain)} (no controls)",
                    f"{share:.0%}",
                    f">= 80%: {'ok' if share >= 0.8 else 'MISSED'}",
                )
            )
        if "max_running_6x20" in limits:
            share = limits["max_running_6x20"]["median"] / limits["none_6x20"]["median"]
            rows.append(
                (
                    "drain 6 proc c=20, a global limit of 1,000 running (cannot bind)",
                    rate(limits["max_running_6x20"]["median"]),
                    f"{rate(limits['none_6x20']['median'])} (no controls)",
                    f"{share:.0%}",
                    f">= 80%: {'ok' if share >= 0.8 else 'MISSED'}",
                )
            )
    elif "limits" in error:
        rows.append(("queue limits", "ERROR", "", "", ""))
    events = r.get("events")
    if events:
        share = events["on"]["median"] / events["off"]["median"]
        rows.append(
            (
                "drain 2 proc c=200, event stream on (nobody listening)",
                rate(events["on"]["median"]),
                f"{rate(events['off']['median'])} (off)",
                f"{share:.0%}",
                "shown (off by default)",
            )
        )
    elif "events" in error:
        rows.append(("event stream", "ERROR", "", "", ""))
    scrape = r.get("exporter_scrape")
    if scrape:
        rows.append(
            (
                f"exporter scrape, {scrape['history_jobs']:,} finished jobs",
                f"{scrape['median_ms']:.1f} ms (max {scrape['max_ms']:.1f})",
                "",
                "",
                f"< 100 ms: {'ok' if scrape['max_ms'] < 100 else 'MISSED'}",
            )
        )
    elif "exporter_scrape" in error:
        rows.append(("exporter scrape", "ERROR", "", "", ""))

    history = r.get("history")
    if history:
        empty, full = history["empty"], history["history"]
        label = f"{history['finished']:,} finished + {history['scheduled']:,} scheduled"
        for key, name, better, goal in (
            ("drain_2p_jobs_per_s", "drain 2 proc", "higher", 1 / 1.2),
            ("enqueue_jobs_per_s", "single enqueue", "higher", 1 / 1.1),
            ("latency_p50_ms", "claim latency p50 (ms)", "lower", 1.2),
            ("latency_p99_ms", "claim latency p99 (ms)", "lower", None),
            ("status_ms", "pgqueue status (ms)", "lower", None),
            ("exporter_ms", "exporter scrape (ms)", "lower", None),
            ("dead_letter_ms", "dead-letter listing (ms)", "lower", None),
            ("heartbeat_hot_ratio", "heartbeats that are HOT", "higher", None),
        ):
            share = full[key] / empty[key] if empty[key] else None
            target = ""
            if goal is not None and share is not None:
                ok = share >= goal if better == "higher" else share <= goal
                target = (
                    f"{'>=' if better == 'higher' else '<='} {goal:.2f}x of empty: {'ok' if ok else 'MISSED'}"
                )
            elif key.endswith("_ms"):
                target = f"< 100 ms: {'ok' if full[key] < 100 else 'MISSED'}"
            rows.append(
                (
                    f"{name}, {label}",
                    f"{full[key]:,.2f}",
                    f"{empty[key]:,.2f} (empty table)",
                    f"{share:.2f}x" if share is not None else "",
                    target,
                )
            )
    elif "history" in error:
        rows.append(("history", "ERROR", "", "", ""))
    backlog = r.get("backlog")
    if backlog:
        small, large = backlog["small"], backlog["large"]
        share = large["window_jobs_per_s"] / small["window_jobs_per_s"]
        rows.append(
            (
                f"drain 2 proc, backlog of {large['jobs']:,} ready jobs",
                f"{rate(large['window_jobs_per_s'])} (first job {large['startup_seconds']:.2f}s after start)",
                f"{rate(small['window_jobs_per_s'])} (backlog of {small['jobs']:,})",
                f"{share:.2f}x",
                f">= 0.90x: {'ok' if share >= 0.9 else 'MISSED'}",
            )
        )
        vacuumed = backlog.get("vacuumed")
        if vacuumed:
            share = vacuumed["window_jobs_per_s"] / small["window_jobs_per_s"]
            rows.append(
                (
                    "  same, autovacuum stand-in (the server runs without)",
                    rate(vacuumed["window_jobs_per_s"]),
                    f"{rate(small['window_jobs_per_s'])} (backlog of {small['jobs']:,})",
                    f"{share:.2f}x",
                    f"{len(backlog['vacuums'])} vacuums",
                )
            )
    elif "backlog" in error:
        rows.append(("backlog", "ERROR", "", "", ""))
    pruning = r.get("prune_under_load")
    if pruning:
        kept, pruned = pruning["kept"]["drain"], pruning["pruned"]["drain"]
        share = pruned["window_jobs_per_s"] / kept["window_jobs_per_s"]
        rows.append(
            (
                f"drain 2 proc, pruning {pruning['pruned']['removed']:,} of {pruning['history']:,} old",
                rate(pruned["window_jobs_per_s"]),
                f"{rate(kept['window_jobs_per_s'])} (history kept)",
                f"{share:.2f}x",
                f">= 0.90x: {'ok' if share >= 0.9 else 'MISSED'}",
            )
        )
    elif "prune_under_load" in error:
        rows.append(("prune under load", "ERROR", "", "", ""))
    soak = r.get("soak")
    if soak:
        half, end = soak["half_way"], soak["end"]
        rows.append(
            (
                f"soak {soak['jobs']:,} jobs, retention 20 s: table + indexes",
                f"{(end[1] + end[2]) / 1e6:,.0f} MB at the end",
                f"{(half[1] + half[2]) / 1e6:,.0f} MB half-way",
                "",
                f"{soak['jobs'] / soak['seconds']:,.0f} jobs/s through",
            )
        )
    elif "soak" in error:
        rows.append(("soak", "ERROR", "", "", ""))

    header = ("measure", "pgqueue", "raw-SQL ceiling", "pgqueue / ceiling", "target")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def details(b: Bench) -> str:
    r = b.results
    out: list[str] = []
    single = r.get("single_enqueue")
    if single:
        rounds = " / ".join(
            f"{p:,.0f}-{q:,.0f}-{g:,.0f}"
            for p, q, g in zip(
                single["pgqueue_rounds"], single["psycopg_rounds"], single["pgbench_rounds"], strict=False
            )
        )
        out.append(
            f"single enqueue: medians of {single['rounds']} rounds of {single['seconds_per_round']:g}s; "
            f"the same insert_job through plain psycopg: {rate(single['raw_psycopg_jobs_per_s'])}; "
            f"rounds pgqueue-psycopg-pgbench: {rounds}"
        )
    bulk = r.get("bulk_enqueue")
    if bulk:
        out.append(
            f"bulk enqueue: enqueue_many {bulk['pgqueue_seconds']:.2f}s, of which about "
            f"{bulk['python_prepare_seconds']:.2f}s validating/serialising in Python and "
            f"{bulk['reserve_ids_seconds']:.2f}s in the reserve_ids query; "
            f"raw COPY {bulk['raw_copy_seconds']:.2f}s"
        )
    for processes, data in r.get("drain", {}).items():
        for run in data["runs"]:
            out.append(
                f"drain {processes} proc x c={run['concurrency']:>3}: "
                f"{run['window_jobs_per_s']:>8,.0f} jobs/s first-start->last-finish "
                f"({run['window_seconds']:.2f}s), "
                f"{run['wall_jobs_per_s']:>8,.0f} jobs/s wall ({run['wall_seconds']:.2f}s, "
                f"startup {run['startup_seconds']:.2f}s, last finish at {run['last_finish_seconds']:.2f}s), "
                f"peak {run['peak_running']:,} jobs 'running' in SQL"
            )
    for key, ceiling in r.get("drain_ceilings", {}).items():
        out.append(
            f"ceiling {key:<16} {ceiling['jobs_per_s']:>8,.0f} jobs/s, {ceiling['tps']:>8,.0f} tps "
            f"({ceiling['label']}, {ceiling['seconds']}s, {ceiling['prefilled']:,} pre-filled)"
        )
    latency = r.get("latency")
    if latency:
        out.append(
            f"latency: {latency['jobs']} jobs, min {latency['min_ms']:.2f} ms, "
            f"max {latency['max_ms']:.2f} ms; "
            f"measured from before the enqueue call: p50 {latency['from_enqueue_call_p50_ms']:.2f} ms, "
            f"p99 {latency['from_enqueue_call_p99_ms']:.2f} ms (enqueue call p50 "
            f"{latency['enqueue_call_p50_ms']:.2f} ms)"
        )
    for phase, message in b.errors.items():
        out.append(f"ERROR in {phase}: {message.splitlines()[0] if message else ''}")
    return "\n".join(out)
