"""The routing study: recorded routing traces, the trace-driven simulator and the sweep report.

    traces      the trace format, the offline corpus, training of small models with real MoEs'
                routing shapes, the recorder, batch dedup; committed traces in ``traces/data/``
    simulator   replays a trace through the memory system's own decisions (``memory.residency``
                over a ``SlotTable``), with the copy engine timed from measured constants
    report      the sweep behind ``prophet simulate --sweep``: tables, figures, markdown

Depends on ``memory`` (decisions, predictors) and ``planner`` (model sizes); nothing outside the
study depends on it.
"""
