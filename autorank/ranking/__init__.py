"""Stage 2, who gets which rank: each client's criteria (``profiling``, AutoRank step 2),
CRITIC weights and TOPSIS closeness (``mcda``, steps 3-4), closeness to ranks (``mapping``), the
assigners and their registry (``assigners``, step 5), caps and the parameter budget
(``budget``), the decision every later stage reads (``assignment``) and re-ranking during
training (``reranking``).

Never imports: torch, or any package of ``autorank`` but ``config`` (ranks are decided from
numbers: histograms, loss curves, layer sizes).
"""
