"""Stage 2, everything about adapters: the factors and the product-preserving resize
(``adapters``), which modules are adapted and at what scale (``targets``, ``settings``), peft's
wrapping (``peft``), the base with pluggable factors (``functional``) and peft's adapter folder
(``export``).

Never imports: the engines, the merge, the rounds or the recipe (``autorank.engine``,
``merge``, ``rounds``, ``recipe``); only ``config`` and ``models`` below it.
"""
