"""``--config=configs/ucf101_ar.py[:args]``: the config is ``larp_jax/configs/ucf101_ar.py`` (its docstring lists
the arguments); this file lets the path work from a checkout."""

from larp_jax.configs.ucf101_ar import get_config  # noqa: F401  pylint: disable=unused-import
