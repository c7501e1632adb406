"""Reports: the per-run plot of `recipe eval` and the generated benchmarks/REPORT.md."""
import matplotlib.pyplot as plt
import pytest

from recipe.eval.report import metrics_figure, plot_metrics


def _summary(T: int, rel: float) -> dict:
    return {"T": T, "tf": {"reliability": rel, "generality": 0.5, "locality": 0.9},
            "em": {"reliability": rel - 0.1, "generality": 0.4, "locality": 0.8}}


def test_a_run_with_one_T_is_a_bar_chart():
    fig = metrics_figure([_summary(10, 0.9)], "ft on zsre")
    ax = fig.axes[0]
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert heights == [0.9, 0.5, 0.9, 0.8, 0.4, 0.8]  # teacher-forced bars, then exact-match bars
    assert len(ax.get_lines()) == 0
    assert [t.get_text() for t in ax.get_xticklabels()] == ["reliability", "generality", "locality"]
    plt.close(fig)


def test_a_run_with_several_T_is_a_line_per_metric_and_mode(tmp_path):
    fig = metrics_figure([_summary(1, 0.9), _summary(10, 0.7), _summary(100, 0.5)])
    ax = fig.axes[0]
    assert len(ax.patches) == 0
    assert len(ax.get_lines()) == 6
    assert list(ax.get_lines()[0].get_ydata()) == [0.9, 0.7, 0.5]
    assert ax.get_xscale() == "log"
    plt.close(fig)
    assert plot_metrics([_summary(1, 0.9)], tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_no_summaries_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one summary"):
        metrics_figure([])
