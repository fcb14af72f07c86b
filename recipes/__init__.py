"""The recipes: scripts to run or copy, not a library (nothing imports them). The wheel ships this
folder as `xmodaler_accel.recipes`; `xmodaler-accel ls` lists it and `xmodaler-accel cp` copies a
recipe with its configs into a folder of your own."""
