"""Stage 4, the server's aggregation: per-layer rules and the SVD re-factoring (``rules``), the
aggregators' registry (``aggregators``) and the early merge's label check (``tiers``). Every
function is pure: client updates in, a global adapter and each client's share out.

Never imports: the engines, the rounds, the recipe or reporting; only ``config`` and ``lora``.
"""
