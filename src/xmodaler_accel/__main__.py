"""`python -m xmodaler_accel ls | cp ...`: the `xmodaler-accel` command (see recipes_command)."""

from xmodaler_accel.recipes_command import main

if __name__ == "__main__":
    raise SystemExit(main())
