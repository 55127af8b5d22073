"""The planner: settings from profiles, memory estimates, and the decision."""

from autoquant.backends.tier import Tier
from autoquant.planner.estimate import Estimate, Request
from autoquant.planner.plan import Plan, PlannedTier, plan
from autoquant.planner.rules import load_settings

__all__ = ["Estimate", "Plan", "PlannedTier", "Request", "Tier", "load_settings", "plan"]
