"""Studies: several training recipes (arms) x seeds on one data source, one schedule and one evaluation
protocol (PGD, APGD and AutoAttack), aggregated into a report with a verdict written from the numbers."""
from .arms import ARM_KEYS, ARMS, FAMILIES, PAPER_ARMS, Arm, ArmSelection, load_arms_file, parse_arm_spec, resolve_arms
from .layout import run_dir, run_state
from .aggregate import collect_study, study_markdown, verdict, write_report
from .runner import StudyConfig, StudyError, run_study

__all__ = [
    'Arm', 'ARMS', 'ARM_KEYS', 'FAMILIES', 'PAPER_ARMS', 'load_arms_file', 'parse_arm_spec', 'resolve_arms',
    'ArmSelection', 'StudyConfig', 'StudyError', 'run_study', 'run_dir', 'run_state',
    'collect_study', 'study_markdown', 'verdict', 'write_report',
]
