"""What a measure run writes: CSV matrices and the manifest (``files``), heatmaps (``heatmaps``) and the
self-contained HTML page (``page``)."""

from .files import matrix_csv, read_matrix_csv, write_results
from .heatmaps import heatmap_png, plot_matrix
from .page import REPORT_NAME, diagonal_svg, render_report, write_report

__all__ = [
    "REPORT_NAME",
    "diagonal_svg",
    "heatmap_png",
    "matrix_csv",
    "plot_matrix",
    "read_matrix_csv",
    "render_report",
    "write_report",
    "write_results",
]
