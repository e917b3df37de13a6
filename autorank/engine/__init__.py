"""Stage 3, training clients: what a client is asked to do and returns (``jobs``, the
``ClientBackend`` boundary), the local loop and the server's pre-training (``local``), the
optimisers (``optim``), the two engines (``sequential`` on peft models, ``batched`` over stacked
factors) and the registry that picks one (``factory``).

Never imports: the merge, the rounds, the recipe, reporting or serving; only ``config``,
``models`` and ``lora`` below it.
"""
