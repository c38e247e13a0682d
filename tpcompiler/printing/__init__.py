"""Printing: the TeX printer (``latex``), program listings (``program.ProgramPrinter``) and
Markdown / LaTeX pages of Z programs (``render.ZProgramPrinter``), one printer class throughout."""
