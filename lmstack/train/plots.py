"""A run's curves as PNGs: the loss (raw and smoothed per step, and held-out), and a panel per logged
number for objectives with more than a loss to watch (RL: reward, KL, entropy, clip fraction; a mixture
of experts' router: ``plot_router_stats``)."""

from pathlib import Path

from lmstack.fileio import atomic_path
from lmstack.train.trainer import read_metrics


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "training loss") -> Path:
    """Write ``png_path`` from ``metrics_path`` (steps on x, nats/token on y); returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax.plot(steps, _ema(losses, 0.9), color="tab:blue", linewidth=1.6, label="train (smoothed)")
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", linewidth=1.4, markersize=4, label="held-out")
        last = evals[-1]
        bpb = next((r["eval_bpb"] for r in reversed(records) if "eval_bpb" in r), None)
        note = f"held-out {last[1]:.3f} nats/token" + (f", {bpb:.3f} bits/byte" if bpb is not None else "")
        ax.annotate(note, xy=last, xytext=(-10, 18), textcoords="offset points", ha="right", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(Path(png_path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(png_path)


def plot_metric_panels(metrics_path: Path, png_path: Path, keys: list[str | tuple[str, list[str]]],
                       title: str) -> Path | None:
    """One panel per key of ``keys`` that the run logged (raw per step and smoothed; ``eval_*`` keys as
    points), or per (panel title, keys) pair: their smoothed curves in one panel; None if it logged none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = [(k, [k]) if isinstance(k, str) else k for k in keys]
    panels = [(name, [k for k in group if any(k in r for r in records)]) for name, group in panels]
    panels = [(name, group) for name, group in panels if group]
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), dpi=110, squeeze=False)
    for ax, (name, group) in zip(axes.flat, panels):
        for key in group:
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            steps, values = zip(*points)
            if key.startswith("eval_"):
                ax.plot(steps, values, "o-", color="tab:orange", markersize=4)
            elif len(group) > 1:
                ax.plot(steps, _ema(list(values), 0.9), linewidth=1.2, label=key)
            else:
                ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
                ax.plot(steps, _ema(list(values), 0.9), color="tab:blue", linewidth=1.6)
        if len(group) > 1 and len(group) <= 16:
            ax.legend(fontsize=6, ncol=2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(Path(png_path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(png_path)


def plot_router_stats(metrics_path: Path, png_path: Path, num_experts: int, title: str) -> Path | None:
    """A mixture-of-experts run's router: LM and load-balancing losses, router entropy, the busiest expert's
    load (1.0 = even), the dropped share, and each expert's share of the assignments."""
    loads = ("tokens per expert (share)", [f"moe_load_{e}" for e in range(num_experts)])
    return plot_metric_panels(metrics_path, png_path, ["lm_loss", "moe_aux_loss", "moe_router_entropy",
                                                       "moe_load_max", "moe_dropped", loads], title)


def _ema(values: list[float], decay: float) -> list[float]:
    """Bias-corrected exponential moving average (the first points are not dragged toward zero)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = decay * average + (1 - decay) * value
        out.append(average / (1 - decay**i))
    return out
