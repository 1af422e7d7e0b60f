"""Quality at every budget: variants, lm-eval tasks, text metrics, paired statistics, the report and plots.

The lm-eval adapter (`balcony.eval.lm_eval_model`) is imported only when tasks run,
so this package works without lm-eval installed.
"""

from .report import EvalReport, make_report
from .run import run_evaluation
from .stats import paired_difference
from .texts import distillation_metrics
from .variants import Variant, build_variants, load_balcony

__all__ = ["EvalReport", "Variant", "build_variants", "distillation_metrics", "load_balcony", "make_report", "paired_difference", "run_evaluation"]
