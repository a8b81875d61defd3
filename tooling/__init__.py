"""Tooling over outputs, beside the engines (never importing them): inspect, validate, stats, plots, report."""
