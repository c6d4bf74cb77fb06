"""termui: what the entry points share and the core never imports: rich output (tables,
progress, evaluation reports) and command-line parsing with one-line errors (`die`).

Its own package so that `resnet_dist` stays a library (torch, numpy, pyarrow, PIL), usable
from a notebook or torchrun without a terminal UI, and so that `cluster` can print progress
without the core depending on rich.
"""
