"""Reports over a store: an offline HTML report (`build_report`) and static figures (`plot_metric`).

Both only read the store; the SQL behind every figure lives in `queries` so the HTML report can
print it next to its chart.
"""

from ckptscope.reports.html import build_report
from ckptscope.reports.plot import metric_figure, plot_metric

__all__ = ["build_report", "metric_figure", "plot_metric"]
