"""Evaluation: held-out bits per byte of a language model (`lm`) with the segmentation statistics
of its DLA layers (`segmentation`), and accuracy on synthetic recall tasks — the generators
(`tasks`), query-position accuracy (`metrics`), and scoring a model or a checkpoint
(`task_accuracy`). `dla.run.experiment` trains and scores grids of models on the tasks."""
