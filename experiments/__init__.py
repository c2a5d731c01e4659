"""The experiment wing: grids of training-set variants run as tasks over the pipeline's steps.

* :mod:`experiments.grid`: ``configs/experiments/<name>.toml`` → an :class:`~experiments.grid.Experiment`
  (variants expanded as a grid, tasks named ``sub<subject>__<variant>``).
* :mod:`experiments.builders`: method name → variant builder (dropout subsets, caption variants,
  adversarial perturbations, settings-only variants).
* :mod:`experiments.tasks`: run one task, its completion and its ``--status`` record.
* :mod:`experiments.report`: tables and plots across a grid.

It sits above everything else: it imports ``pipeline``, ``dropout``, ``ai_captions``, ``adv_pert``,
``models`` and ``evaluation``; nothing imports it except ``re_recon_main.py``.
"""
