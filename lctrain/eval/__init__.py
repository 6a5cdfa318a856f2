"""Long-context evaluation: perplexity, MQAR, passkey and RULER-style needle-in-a-haystack tasks.

* :mod:`lctrain.eval.tasks`: the task registry (:data:`TASKS`), :class:`EvalContext`, :func:`run_tasks`.
* MQAR generation and the ``data.path=synthetic:mqar?...`` data source live in
  :mod:`lctrain.data.synthetic` (evaluation imports data, never the reverse).
* :mod:`lctrain.eval.haystack`: passkey and needle-in-a-haystack prompts (offline templates).
* :mod:`lctrain.eval.scoring`: teacher-forced and greedy-generation scorers.
* :mod:`lctrain.eval.run`: :func:`load_run` (model, checkpoint, tokenizer of a run directory) and
  :func:`run_training_eval`, the trainer's ``train.eval_tasks`` hook.
* :mod:`lctrain.eval.cli`: ``launch/eval.py`` and ``launch/generate.py``.
* :mod:`lctrain.eval.plots`: the PNG charts (matplotlib).
"""

from lctrain.eval.tasks import TASKS, EvalContext, Task, get_task, parse_task_spec, register_task, run_tasks

__all__ = ["TASKS", "EvalContext", "Task", "get_task", "parse_task_spec", "register_task", "run_tasks"]
