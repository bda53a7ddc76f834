"""How `olmoe.eval.runner` can batch a task's requests, importable without torch (`olmoe --help`).

packed: a question's choices share one pass over its context (the default); flat: one sequence per
choice.
"""

STRATEGIES = ("packed", "flat")
