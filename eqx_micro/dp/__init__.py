"""Differential privacy on top of eqx_micro's microbatching: `import eqx_micro.dp as dp`."""

from ._clipping import clip_pytree as clip_pytree, ClipL2 as ClipL2
