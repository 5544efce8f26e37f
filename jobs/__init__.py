"""Entry points for scheduled runs: ``python -m jobs.<name>`` or ``vaepipe <name>``."""
