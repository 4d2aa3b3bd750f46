"""Honest robustness evaluation: attacks by name, sanity checks, distribution shifts, reports and plots."""
from .analysis import decision_margin, local_smoothness, margin_and_smoothness
from .engine import EvalProgress, RobustCounter
from .data import load_dataset, pixel_transform, read_id_list, select_subset
from .report import WORST_CASE, RobustReport
from .robust import evaluate
from .sanity import SanityFlag
from .shifts import SHIFT_BENCHMARKS, ShiftResult, evaluate_shift
