"""``python -m sshjobs``: the command line."""

from .cli import main

main()
