"""Stage 1, who holds which samples: the data sets and their sources (``datasets``), input
normalisation, the partition schemes and local/public splits (``partition``) and the
federation's layout (``federation``).

Never imports: torch, or any package of ``autorank`` but ``config`` (it knows nothing of models,
ranks or training).
"""
