"""Pictures put side by side: the comparisons the benchmarks show as images."""
from __future__ import annotations


def image_row(panels: list[tuple[str, object]], path: str, *, cross: int | None = None) -> None:
    """Each (title, pixels) panel unscaled, in one row, saved to ``path``; ``cross``: red guide
    lines through that pixel of every panel (a tile corner, say)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, (title, pixels) in zip(axes[0], panels):
        ax.imshow(pixels, interpolation="nearest")
        if cross is not None:
            ax.axhline(cross - 0.5, color="red", linewidth=0.6, alpha=0.6)
            ax.axvline(cross - 0.5, color="red", linewidth=0.6, alpha=0.6)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
