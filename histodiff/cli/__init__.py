"""Command-line entry points of histodiff (``python -m histodiff.<name>`` aliases point here)."""
