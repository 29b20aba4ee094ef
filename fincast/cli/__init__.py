"""The command line (layer L4, cli): ``fincast train|resume|data|study|sweep|advise-clip|report|backtest|keys``,
also as ``python -m fincast`` (what torchrun launches). The parser is in ``parser``, the commands in
``commands``."""

from fincast.cli.commands import main

__all__ = ["main"]
