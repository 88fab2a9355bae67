"""The ``apa`` command line (Typer): the top layer, the one package that reaches every other.

One module per command group: ``data`` (assets, datasets, training), ``evaluation`` (eval, check,
verify), ``processes`` (the gateway and the worker), ``ledger`` (migrations, run import, audit);
``main`` assembles them.
"""
