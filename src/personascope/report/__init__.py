"""Tables and plots from run directories."""

from personascope.report.stats import mean_ci, pearson_ci

__all__ = ["mean_ci", "pearson_ci"]
