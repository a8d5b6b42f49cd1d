"""Framework adapters: ``gsnr_stats.adapters.torch``, ``.jax`` and ``.sklearn``.

Each imports only the core's public API and its own framework; importing this package
imports no framework.
"""
