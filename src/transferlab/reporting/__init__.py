"""Reports: report.html from the files a run, evaluation or comparison wrote, its plots, and the
comparison table."""
