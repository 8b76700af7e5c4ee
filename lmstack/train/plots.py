"""The loss curve of a run as a PNG: training loss per step (raw and smoothed) and held-out loss."""

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


def _ema(values: list[float], decay: float) -> list[float]:
    """Bias-corrected exponential moving average (the first points are not dragged toward zero)."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = decay * average + (1 - decay) * value
        out.append(average / (1 - decay**i))
    return out
