"""Benchmarks that train and score many methods on the same inputs (`featurekit bench ...`)."""
