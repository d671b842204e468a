"""The run configs, importable: ``from larp_jax.configs import ucf101; ucf101.get_config('size=B')``.

``configs/*.py`` at the repository root are thin files over these, so
``python -m larp_jax.main --config=configs/ucf101.py`` and ``--config=configs/demo.py`` work from
a checkout, and ``--config=<site-packages>/larp_jax/configs/demo.py`` from an installed package.

  ucf101   the released LARP-L-Long recipe on UCF101 (size presets, ``paper``, ``tiny``)
  demo     a tiny LARP for a 2-core CPU on the built-in synthetic videos (README's first command)
  bench    the benchmark presets of ``python -m larp_jax.bench``

Every config takes ``tiny`` (as big_vision's ``runlocal``): the test-size model of
``common.TINY_MODEL`` and a 4-step run, so tests and smoke runs share one tiny model.
"""
