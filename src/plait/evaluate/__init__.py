"""Evaluation with CLIP_benchmark's metric names: retrieval, zero-shot, probes, run reports."""

from plait.evaluate.probe import few_shot_indices, few_shot_probe, knn_accuracy, linear_probe
from plait.evaluate.report import compare_runs, write_report
from plait.evaluate.retrieval import retrieval_metrics, retrieval_ranks, topk_texts
from plait.evaluate.zero_shot import build_prompts, zero_shot_classifier, zero_shot_metrics

__all__ = [
    "build_prompts",
    "compare_runs",
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
