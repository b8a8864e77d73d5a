"""Standard benchmarks: real evaluation sets read offline, scored the way lm-eval-harness scores them.

``items``: the item types every task produces; ``benchmarks``: fetching the benchmark sets and reading each
task's items; ``harness``: log-likelihood and generative scoring, metrics, ``results.json``; ``sandbox``:
running model-written programs (HumanEval) confined; ``report``: the report card across a pipeline's stages.
"""
