"""Ablation studies: the paper's Figure 5 (exit module, init, loss, recipe) and Table 4 (from scratch) as reproducible runs.

`run_study` trains every variant of a study at equal compute (same tokens, steps and
optimizer settings; only the ablated factor changes), resumes where it stopped,
evaluates all variants in one `balcony.eval.run_evaluation` run paired against the
reference, and decides each of the paper's claims (held / not held / inconclusive)
from paired standard errors. `balcony ablate` is its command line.
"""

from .claims import ClaimResult, judge_claims
from .plan import STUDIES, Study, StudyVariant, get_study, study_configs
from .runner import StudyResult, run_study
from .scratch import ScratchSpec, build_scratch_base

__all__ = ["STUDIES", "ClaimResult", "ScratchSpec", "Study", "StudyResult", "StudyVariant", "build_scratch_base", "get_study", "judge_claims",
           "run_study", "study_configs"]
