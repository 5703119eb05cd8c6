"""The benchmark's figures as a table a person reads, and the ratios that sum them up."""

from __future__ import annotations

import statistics
from typing import Callable

from bridge.bench.harness import CEILINGS, HA, PIPE
from bridge.bench.legs import PUBLISH_P99, RECEIVE_P99

MiB = 1024 * 1024
SHARE = "real/min(ceilings)"
PIPE_SHARE = f"{PIPE}/min(ceilings)"


def _get(*path: str) -> Callable[[dict], float | None]:
    def get(figures: dict) -> float | None:
        for key in path:
            figures = figures.get(key) if isinstance(figures, dict) else None
        return figures
    return get


COLUMNS: list[tuple[str, Callable[[dict], float | None], str]] = [
    ("burst ev/s", _get("burst", "events_per_second"), "{:.0f}"),
    ("p50 ms", _get("latency", "latency_ms", "p50"), "{:.1f}"),
    ("p99 ms", _get("latency", "latency_ms", "p99"), "{:.1f}"),
    ("max ms", _get("latency", "latency_ms", "max"), "{:.1f}"),
    ("CPU s/10k", _get("burst", "cpu_seconds_per_10k"), "{:.2f}"),
    ("disk B/ev", _get("burst", "written_bytes_per_event"), "{:.0f}"),
    ("peak RSS MiB", lambda f: f["peak_rss_bytes"] / MiB if "peak_rss_bytes" in f else None,
     "{:.1f}"),
    ("idle CPU %", _get("idle", "cpu_percent"), "{:.3f}"),
]


def ratios(figures: dict) -> dict:
    """The real bridge against each naive one and the pipe (burst throughput and CPU per
    event), and its burst as a share of the lower ceiling: how close it comes to the
    machine's limit. The pipe's own share says how much of that limit is left to any
    bridge once its two halves share the machine."""
    real = figures.get("real")
    if real is None:
        return {}
    burst = _get("burst", "events_per_second")
    out = {}
    for name, other in figures.items():
        if name in ("real", HA) or name in CEILINGS:
            continue
        out[f"real/{name}"] = {
            "burst": _ratio(real, other, burst),
            "cpu_per_event": _ratio(real, other, _get("burst", "cpu_seconds_per_10k"))}
    ceilings = {name: burst(figures[name]) for name in CEILINGS if name in figures}
    if ceilings:
        limit = min(ceilings, key=ceilings.get)
        for key, row in ((SHARE, real), (PIPE_SHARE, figures.get(PIPE))):
            if row is None:
                continue
            out[key] = {"burst": _ratio(row, figures[limit], burst), "limit": limit}
            by_round = _share_by_round(row, [figures[name] for name in ceilings])
            if len(by_round) > 1:
                out[key].update(burst=statistics.median_low(by_round), rounds=by_round)
    if HA in figures:
        ha, cpu = figures[HA], _get("burst", "cpu_seconds_per_10k")
        standby = _get("burst", "standby", "cpu_seconds_per_10k")(ha)
        steady = _get("latency", "cpu_seconds_per_10k")
        out[f"{HA}/real"] = {"burst": _ratio(ha, real, burst), "cpu_per_event": _ratio(ha, real, cpu),
                             "standby_cpu_per_event": _div(standby, cpu(real)),
                             "standby_cpu_per_event_at_rate": _div(
                                 _get("latency", "standby", "cpu_seconds_per_10k")(ha),
                                 steady(real))}
    return out


def _share_by_round(row: dict, ceilings: list[dict]) -> list[float]:
    """A row's burst over the lower ceiling of the same round, round by round:
    a slow stretch of the machine slows every row of its round, not the others."""
    rows = [f["burst"].get("rounds") for f in (row, *ceilings)]
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return []
    rate = "events_per_second"
    return [ours[rate] / min(c[rate] for c in theirs)
            for ours, *theirs in zip(*rows)]


def _ratio(a: dict, b: dict, get: Callable[[dict], float | None]) -> float | None:
    return _div(get(a), get(b))


def _div(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _aligned(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column to the left, the others to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


CPU_ROLES = ("bridge", "standby", "broker", "simulator", "consumer", "other")


def cpu_shares(figures: dict) -> list[str]:
    """Each row's median burst: the CPU per event of every process and of the rest of
    the machine, and how many cores were busy (bridge/bench/shares.py)."""
    rows = [["burst of", *CPU_ROLES, "cores busy"]]
    for name, f in figures.items():
        machine = f.get("burst", {}).get("machine")
        if machine is None:
            continue
        cpu = machine["cpu_seconds_per_10k"]
        busy = machine["cores_busy"]
        rows.append([name, *("-" if cpu.get(role) is None else f"{cpu[role]:.2f}"
                             for role in CPU_ROLES),
                     "-" if busy is None else f"{busy:.2f} of {machine['cores']}"])
    if len(rows) == 1:
        return []
    return ["where the CPU went, in CPU s per 10k events (a broker not on this machine, "
            "or not visible, is in other):",
            *_aligned(rows)]


def table(figures: dict) -> str:
    rows = [["bridge", *(title for title, _, _ in COLUMNS)]]
    for name, f in figures.items():
        values = [get(f) for _, get, _ in COLUMNS]
        rows.append([name, *("-" if v is None else fmt.format(v)
                             for v, (_, _, fmt) in zip(values, COLUMNS))])
    lines = _aligned(rows)
    by_round = {name: f["burst"]["rounds"] for name, f in figures.items()
                if len(f.get("burst", {}).get("rounds", ())) > 1}
    if by_round:
        lines.append("burst ev/s by round (the table shows the median): " + "; ".join(
            f"{name} " + " ".join(f"{r['events_per_second']:.0f}" for r in rounds)
            for name, rounds in by_round.items()))
    for pair, r in ratios(figures).items():
        burst = "-" if r["burst"] is None else f"{r['burst']:.2f}x"
        if pair in (SHARE, PIPE_SHARE):
            share = "-" if r["burst"] is None else f"{100 * r['burst']:.0f}%"
            line = f"{pair}: burst throughput {burst} ({share} of the limit, set by {r['limit']})"
            if "rounds" in r:
                line += (f", the median of {len(r['rounds'])} rounds: "
                         + " ".join(f"{x:.2f}x" for x in r["rounds"]))
            lines.append(line)
            continue
        cpu = "-" if r["cpu_per_event"] is None else f"{r['cpu_per_event']:.2f}x"
        line = f"{pair}: burst throughput {burst}, CPU per event {cpu}"
        if "standby_cpu_per_event" in r:
            standby = r["standby_cpu_per_event"]
            at_rate = r["standby_cpu_per_event_at_rate"]
            line += (", the standby's CPU per event "
                     + ("-" if standby is None else f"{standby:.2f}x") + " the single bridge's"
                     + " (at the latency run's rate "
                     + ("-" if at_rate is None else f"{at_rate:.2f}x") + ")")
        lines.append(line)
    lines += cpu_shares(figures)
    backlog = figures.get("real", {}).get("backlog")
    if backlog:
        lines.append(f"real backlog of {backlog['events']} events: peak RSS while waiting "
                     f"{backlog['peak_rss_waiting_bytes'] / MiB:.1f} MiB, spool "
                     f"{backlog['spool_bytes'] / MiB:.1f} MiB, drained at "
                     f"{backlog['drain_events_per_second']:.0f} ev/s")
    soak = figures.get("real", {}).get("soak")
    if soak:
        lines += soak_summary(soak)
    return "\n".join(lines)


P99_TARGET_MS = 10.0     # a soak keeps its p99 under this in every sample (README, The benchmark)
WORST_SHOWN = 5          # samples over the target named in the summary, at most
SOAK_FIGURES = (("rss_bytes", "RSS MiB", MiB), ("cpu_seconds_per_10k", "CPU s/10k", 1),
                ("p99_ms", "p99 ms", 1), ("spool_bytes", "spool MiB", MiB),
                ("written_bytes_per_event", "disk B/ev", 1))


def soak_summary(soak: dict) -> list[str]:
    """First tenth against last tenth of the soak's samples, figure by figure."""
    latency = soak["latency_ms"]
    lines = [f"real soak: {soak['events']} events at {soak['rate']}/s for "
             f"{soak['seconds']:g} s, {len(soak['samples'])} samples of "
             f"{soak['sample_seconds']:g} s; whole run p50 {_fmt(latency['p50'])} ms, "
             f"p99 {_fmt(latency['p99'])} ms, max {_fmt(latency['max'])} ms"]
    for key, title, unit in SOAK_FIGURES:
        f = soak["summary"][key]
        first, last = (None if v is None else v / unit for v in (f["first_tenth"],
                                                                  f["last_tenth"]))
        change = "-" if f["change"] is None else f"{100 * f['change']:+.1f}%"
        verdict = "flat" if f["flat"] else "NOT flat"
        extra = f", worst sample {_fmt(f['max'])}" if "max" in f else ""
        lines.append(f"  {title:10} first tenth {_fmt(first)}, last tenth {_fmt(last)}: "
                     f"{change}, {verdict}{extra}")
    lines.append(_over_target(soak["samples"], soak["sample_seconds"]))
    legs = _legs_over_target(soak["samples"])
    if legs:
        lines.append(legs)
    return lines


def _legs_over_target(samples: list[dict]) -> str | None:
    """In how many samples the bridge's own legs were over the target: the part of a
    slow stretch the bridge and the broker's confirms account for."""
    counted = [s for s in samples if s.get(RECEIVE_P99) is not None]
    if not counted:
        return None
    over = {key: sum(s[key] > P99_TARGET_MS for s in counted if s.get(key) is not None)
            for key in (RECEIVE_P99, PUBLISH_P99)}
    return (f"  in the bridge, p99 over {P99_TARGET_MS:g} ms in {len(counted)} samples read: "
            f"receive to confirm in {over[RECEIVE_P99]}, publish to confirm "
            f"in {over[PUBLISH_P99]}")


def _over_target(samples: list[dict], every: float) -> str:
    """How many samples had a p99 over the target, the worst of them with the machine's
    CPU then: a slow stretch on a busy or shared machine is not the bridge's alone."""
    over = [s for s in samples if s["p99_ms"] is not None and s["p99_ms"] > P99_TARGET_MS]
    line = (f"  p99 over {P99_TARGET_MS:g} ms in {len(over)} of {len(samples)} samples of "
            f"{every:g} s")
    if not over:
        return line
    start = samples[0]["t"]
    worst = sorted(over, key=lambda s: s["p99_ms"], reverse=True)[:WORST_SHOWN]
    return line + ": " + ", ".join(
        f"{s['p99_ms']:.1f} ms at {s['t'] - start:.0f} s ({_legs(s)}{_machine(s)})"
        for s in sorted(worst, key=lambda s: s["t"]))


def _legs(sample: dict) -> str:
    """The bridge's own p99s of the stretch, when it was read (bridge/bench/legs.py)."""
    received, published = sample.get(RECEIVE_P99), sample.get(PUBLISH_P99)
    if received is None or published is None:
        return ""
    return (f"in the bridge: receive to confirm {received:.1f} ms, publish to confirm "
            f"{published:.1f} ms; ")


def _machine(sample: dict) -> str:
    if sample.get("machine_busy") is None:
        return "machine CPU unknown"
    line = (f"machine busy {100 * sample['machine_busy']:.0f}%, iowait "
            f"{100 * sample['machine_iowait']:.0f}%, steal {100 * sample['machine_steal']:.0f}%")
    cpu, io = sample.get("machine_cpu_pressure"), sample.get("machine_io_pressure")
    if cpu is None or io is None:
        return line
    return line + f"; waiting for a CPU {100 * cpu:.0f}%, for I/O {100 * io:.0f}%"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
