"""CLI command groups. One module per area; each exposes ``register(app, evaluate_app)``.

Modules here import heavy libraries (TensorFlow, NNCF, runtimes) only inside the
command functions, so ``edgecells --help`` and device commands start fast.
"""
