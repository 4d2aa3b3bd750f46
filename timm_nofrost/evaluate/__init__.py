"""Honest robustness evaluation: attacks by name, sanity checks, distribution shifts, reports and plots, and reports
in RobustBench's ``model_info`` layout."""
from .analysis import decision_margin, local_smoothness, margin_and_smoothness
from .engine import EvalProgress, RobustCounter
from .eval_set import EvalSet, build_eval_set, read_id_list, select_subset
from .protocol import EvalSubset, Protocol
from .robust_report import WORST_CASE, RobustReport
from .journal import EvalJournal, JournalError
from .robust import evaluate, evaluation_identity
from .robustbench import robustbench_model_info
from .sanity import SanityFlag
from .shifts import SHIFT_BENCHMARKS, ShiftResult, evaluate_shift
