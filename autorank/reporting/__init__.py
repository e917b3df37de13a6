"""Stage 6, comparisons and their views: a grid of methods x seeds and its cells (``grid``),
per-method summaries (``summary``), paired differences and their t-test (``paired``), the
tracked figures (``plots``) and the terminal's tables (``text``).

Never imports: torch, or any package of ``autorank`` but ``config`` and ``ranking`` (it reads
records and numbers, never models).
"""
