"""Regenerate benchmarks/REPORT.md, its figures and README's headline table from benchmarks/results/.

    python -m benchmarks.report            # write REPORT.md, README.md's headline block, figures/*.png
    python -m benchmarks.report --check    # exit 1 if either file differs from what the results give
"""
