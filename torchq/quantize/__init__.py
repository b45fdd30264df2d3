"""The quantize API: configs (:mod:`.configs`) -> handlers (:mod:`.handlers`) ->
:func:`quantize_` (:mod:`.api`), the per-layer plan and report, the scheme vocabulary, row
chunking for huge weights and :func:`explain`."""
