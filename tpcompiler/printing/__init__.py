"""Printing: Markdown / LaTeX rendering of Z programs (``render``) with the TeX printer (``latex``)."""
