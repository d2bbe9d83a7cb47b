"""Aggregation factories: `create(value_spec) -> AggregationProcess`."""

from fedjax_lite.aggregators._factories import MeanFactory, SumFactory, UnweightedMeanFactory

__all__ = ['MeanFactory', 'SumFactory', 'UnweightedMeanFactory']
