"""``--config=configs/k600_fp.py[:args]``: the config is ``larp_jax/configs/k600_fp.py`` (its docstring lists
the arguments); this file lets the path work from a checkout."""

from larp_jax.configs.k600_fp import get_config  # noqa: F401  pylint: disable=unused-import
