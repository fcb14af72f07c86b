"""Bringing X-modaler work over: its configs (`python -m xmodaler_accel.port config <yaml>`),
its checkpoints (`model.weights=<X-modaler .pth>`) and names. See docs/porting.md."""
