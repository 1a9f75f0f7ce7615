"""Evaluation with CLIP_benchmark's metric names: retrieval, zero-shot, probes, run reports."""

# the order of the task modules is the order their tasks run and their metrics appear in eval.json
# isort: off
from plait.evaluate.retrieval import retrieval_metrics, retrieval_ranks, topk_texts
from plait.evaluate.zero_shot import build_prompts, zero_shot_classifier, zero_shot_metrics
from plait.evaluate.probe import few_shot_indices, few_shot_probe, knn_accuracy, linear_probe
# isort: on
from plait.evaluate.evaluator import EVALUATORS, FEATURES, EvaluationContext, evaluator
from plait.evaluate.report import compare_runs, write_report

__all__ = [
    "EVALUATORS",
    "EvaluationContext",
    "FEATURES",
    "build_prompts",
    "compare_runs",
    "evaluator",
    "few_shot_indices",
    "few_shot_probe",
    "knn_accuracy",
    "linear_probe",
    "retrieval_metrics",
    "retrieval_ranks",
    "topk_texts",
    "write_report",
    "zero_shot_classifier",
    "zero_shot_metrics",
]
