"""`bench --plot FILE.png`: latency percentiles and RSS over time, since a curve is read
faster than a table.

One row per phase that has samples: the latency phase (every bridge, one colour each)
and the soak (the real bridge, with its spool's size on disk). matplotlib is an
optional extra (`pip install 'tutum-bridge[plot]'`); without it `--plot` is a usage
error before anything runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bridge.bench.harness import LIMITS
from bridge.bench.legs import RECEIVE_P99
from bridge.errors import ConfigError

MiB = 1024 * 1024
HEADROOM = 1.25          # of the highest value, above it, on the memory panels
PERCENTILES = (("p50_ms", "p50", ":"), ("p99_ms", "p99", "-"), ("max_ms", "max", "--"))


def check(args: argparse.Namespace) -> None:
    """Fail now, not after a long run, if the plot could not be drawn."""
    try:
        import matplotlib  # noqa: F401 - only whether it is there
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'tutum-bridge[plot]'") from None
    bridges = [b for b in args.bridges if b not in LIMITS]
    if not args.soak and (args.skip_latency or not bridges):
        raise ConfigError("--plot draws the latency and soak phases, and this run has neither")


def draw(figures: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = []
    latency = {name: f["latency"]["samples"] for name, f in figures.items()
               if f.get("latency", {}).get("samples")}
    if latency:
        rate = next(f["latency"]["rate"] for f in figures.values() if "latency" in f)
        rows.append((f"latency phase, {rate} events/s", latency, False))
    soak = figures.get("real", {}).get("soak")
    if soak and soak["samples"]:
        rows.append((f"soak, {soak['rate']} events/s", {"real": soak["samples"]}, True))

    fig, axes = pyplot.subplots(len(rows), 2, figsize=(13, 4.2 * len(rows)), squeeze=False)
    colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for (title, series, with_spool), (left, right) in zip(rows, axes):
        for i, (name, samples) in enumerate(series.items()):
            colour = colours[i % len(colours)]
            t0 = samples[0]["t"]
            xs = [s["t"] - t0 for s in samples]
            for key, label, style in PERCENTILES:
                left.plot(xs, [s[key] for s in samples], style, color=colour,
                          label=f"{name} {label}")
            if any(s.get(RECEIVE_P99) is not None for s in samples):     # the soak's
                left.plot(xs, [s.get(RECEIVE_P99) for s in samples], "-", color="grey",
                          alpha=0.8, label=f"{name} p99 receive to confirm, in the bridge")
            right.plot(xs, [s["rss_bytes"] / MiB for s in samples], color=colour,
                       label=f"{name} RSS")
        left.set(title=f"{title}: delivery latency", xlabel="seconds", ylabel="ms",
                 yscale="log")
        right.set(title=f"{title}: memory", xlabel="seconds", ylabel="RSS MiB")
        # From 0, so that a change reads at its true size, with headroom above the
        # highest value: autoscaling put a flat RSS line on the frame's top edge.
        right.set_ylim(0, HEADROOM * max(s["rss_bytes"] / MiB
                                         for samples in series.values() for s in samples))
        if with_spool:
            spool = right.twinx()
            sizes = [(s["spool_bytes"] or 0) / MiB for s in series["real"]]
            spool.plot(xs, sizes, "-.", color="grey", label="spool on disk")
            spool.set(ylabel="spool MiB")
            spool.set_ylim(0, HEADROOM * max(sizes) or 1)
            spool.legend(loc="lower right", fontsize="small")
        left.legend(fontsize="x-small", ncol=len(series), loc="upper right")
        right.legend(loc="lower left", fontsize="small")
        for ax in (left, right):
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot.close(fig)
