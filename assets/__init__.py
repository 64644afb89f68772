"""Asset factories: raw, parsed, projections, redrive, and their checks, built from a pipeline spec."""

from assets.factory import PipelineDefs, build_pipeline
from assets.refill import build_refill

__all__ = ["PipelineDefs", "build_pipeline", "build_refill"]
