"""``--config=configs/bench.py[:args]``: the config is ``larp_jax/configs/bench.py`` (its docstring lists
the arguments); this file lets the path work from a checkout."""

from larp_jax.configs.bench import get_config  # noqa: F401  pylint: disable=unused-import
