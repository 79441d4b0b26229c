"""What a measure run writes: CSV matrices and the manifest (``files``), heatmaps (``heatmaps``), the
zoo views (``zoo``) and the self-contained HTML page (``page``, drawing ``overview``)."""

from .files import matrix_csv, read_matrix_csv, write_results
from .heatmaps import Heatmaps, heatmap_png, plot_matrix
from .page import REPORT_NAME, diagonal_svg, render_report, write_report

__all__ = [
    "REPORT_NAME",
    "Heatmaps",
    "diagonal_svg",
    "heatmap_png",
    "matrix_csv",
    "plot_matrix",
    "read_matrix_csv",
    "render_report",
    "write_report",
    "write_results",
]
