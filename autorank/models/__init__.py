"""Stage 1, the base models clients adapt: the architectures (``zoo``) and how a model is scored
on a labelled split (``evaluation``).

Never imports: ``autorank.config`` aside, any other package of ``autorank`` (the base knows
nothing of LoRA, clients or rounds).
"""
