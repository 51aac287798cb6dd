"""The command line, `python -m backend COMMAND`: parser.py builds it, one module per command group runs it."""
