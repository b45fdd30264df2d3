"""Applications built on the library: the ``torchq`` CLI, the demo, the evaluation helpers
and the end-to-end benchmark engines."""
