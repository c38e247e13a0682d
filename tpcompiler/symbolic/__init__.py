"""Symbolic stage: the Master theorem turns a graph into a Z program (``master``); ``existence`` refuses expectations that do not exist."""
