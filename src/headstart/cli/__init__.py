"""Command line: each subcommand parses its arguments, calls one library function, and prints the result.

:mod:`.app` builds the parser and dispatches; each command group module (:mod:`.core`, :mod:`.report`,
:mod:`.retrieval`, :mod:`.audit`, :mod:`.serve`) adds its sub-parsers and names its handlers.
"""

from headstart.cli.app import COMMANDS, get_args_parser, main, run

__all__ = ["COMMANDS", "get_args_parser", "main", "run"]
