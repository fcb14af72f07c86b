"""One package per task: its data view, steps, evaluation and task hooks. A task imports the
core, the data layer, models, decoding and metrics, never another task (see CONTRIBUTING.md)."""
