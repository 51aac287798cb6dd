"""PruneScope's backend: sources, runs, reports and the command line, over the compression and metrics libraries."""

__version__ = "0.4.0"
