"""The ``refusalkit`` command line: ``main()`` in :mod:`refusalkit.cli.app`, one module per command in
:mod:`refusalkit.cli.commands`, the parser generated from the configuration in :mod:`refusalkit.cli.parser`."""

from refusalkit.cli.app import main

__all__ = ["main"]
