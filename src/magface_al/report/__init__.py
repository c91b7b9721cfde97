"""Error folders, comparison images, plots and the HTML report of a face verification run.

Everything here reads one :class:`ScoredPairs` per model (pairs, cosine
scores, face magnitudes and the decision threshold) and face images from any
object with an ``image(key)`` method, such as ``data.faces.FaceRecordDataset``.
"""

from magface_al.report.folders import error_summary, write_error_folders
from magface_al.report.html import ModelResult, error_diff, write_html_report
from magface_al.report.images import FaceCache, comparison_image, placeholder_image
from magface_al.report.plots import write_plot_tables
from magface_al.report.scored import ScoredPairs

__all__ = [
    "FaceCache",
    "ModelResult",
    "ScoredPairs",
    "comparison_image",
    "error_diff",
    "error_summary",
    "placeholder_image",
    "write_error_folders",
    "write_html_report",
    "write_plot_tables",
]
