"""Studies: several training recipes (arms) x seeds on one data source, one schedule and one evaluation
protocol (PGD, APGD and AutoAttack), aggregated into a report with a verdict written from the numbers."""
from .arms import ARM_KEYS, ARMS, FAMILIES, PAPER_ARMS, Arm, load_arms_file, parse_arm_spec, resolve_arms
from .layout import run_dir, run_state
from .report import collect_study, study_markdown, verdict, write_report
from .runner import DEMO_STUDY, PROTOCOL_ATTACKS, StudyConfig, StudyError, run_study

__all__ = [
    'Arm', 'ARMS', 'ARM_KEYS', 'FAMILIES', 'PAPER_ARMS', 'load_arms_file', 'parse_arm_spec', 'resolve_arms',
    'StudyConfig', 'StudyError', 'run_study', 'run_dir', 'run_state', 'DEMO_STUDY', 'PROTOCOL_ATTACKS',
    'collect_study', 'study_markdown', 'verdict', 'write_report',
]
