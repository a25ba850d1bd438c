"""Experiment drivers that run many methods or models on the same inputs: `featurekit bench synthetic|frontier`,
`featurekit itda-match`, `featurekit mlp-sparsity`. They reuse `data` and `evaluate`."""
