"""Framework adapters: ``gsnr_stats.adapters.torch``, ``.jax`` and ``.sklearn``; training-loop
callbacks in ``.lightning`` (PyTorch Lightning) and ``.hf`` (Hugging Face ``Trainer``).

``docs/adapters.md`` shows each in a training loop and tabulates their differences.

Each imports only the core's public API and its own framework; importing this package
imports no framework.
"""
