"""Stage 5, one federated round and what survives it: who trains (``cohorts``), the round's jobs,
the server's step and its report (``steps``), the global adapter grown after a re-ranking
(``growth``) and the atomic per-round checkpoints (``checkpoint``).

Never imports: the recipe, reporting or serving; everything else of the library is below it.
"""
