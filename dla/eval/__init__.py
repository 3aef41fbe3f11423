"""Evaluation on synthetic recall tasks: generators (`tasks`), query-position accuracy
(`metrics`), scoring a model or checkpoint (`evaluate`), and the grid runner behind
`dla experiment` (`experiment`)."""

from dla.eval.evaluate import evaluate_checkpoint_on_task, evaluate_task, model_for_length
from dla.eval.metrics import merge, query_accuracy
from dla.eval.tasks import IGNORE, TASKS, make_task

__all__ = ["IGNORE", "TASKS", "make_task", "query_accuracy", "merge", "evaluate_task",
           "evaluate_checkpoint_on_task", "model_for_length"]
