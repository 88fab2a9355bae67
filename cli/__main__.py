"""``python -m cli``: the ``apa`` command line without its console script."""

from cli.main import main

main()
