"""The tools a person runs: the ``hwharness`` command, the benchmarks and the pytest
plugin. Nothing in the library imports them."""
