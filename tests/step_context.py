"""The context the step tests run a step in: subject 1, CPU, no progress bars."""
from pipeline.layout import Layout
from pipeline.runner import Context


def step_context(cfg, force: bool = False) -> Context:
    return Context(cfg=cfg, layout=Layout(cfg, "1"), device="cpu", force=force, progress=False)
