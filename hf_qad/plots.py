"""The ``hf-qad eval`` figure: per-layer weight error and KL by position."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_evaluation"]


def plot_evaluation(
    layer_errors: dict[str, float], kl_by_position: dict[str, list[float]], path: str | Path,
    weight_reference: str = "master weight",
) -> Path:
    """Write a PNG with two panels and return its path.

    Args:
        layer_errors: relative weight error per NVFP4 layer
            (:func:`hf_qad.evaluation.layer_quantization_errors`).
        kl_by_position: mean KL to the teacher at each position, one curve per label.
        path: where to write the PNG.
        weight_reference: what the NVFP4 weights were compared with, for the axis label
            (a packed student's against the teacher's weights).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5))
    if layer_errors:
        names = list(layer_errors)
        top.bar(range(len(names)), list(layer_errors.values()), color="tab:blue")
        step = max(1, len(names) // 30)
        top.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)],
                       rotation=90, fontsize=6)
        top.set_ylabel(f"relative error vs {weight_reference}")
    else:
        top.text(0.5, 0.5, "no NVFP4 layer errors to show", ha="center", va="center")
    top.set_title("NVFP4 quantization error per layer")
    for label, values in kl_by_position.items():
        bottom.plot(range(len(values)), values, label=label)
    bottom.set_xlabel("position in sequence")
    bottom.set_ylabel("KL(teacher || student), nats")
    bottom.set_title("KL to the teacher by position")
    if kl_by_position:
        bottom.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
