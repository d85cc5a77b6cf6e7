"""Runnable examples of `eqx_micro`: `python -m examples NAME [--quick]`."""
